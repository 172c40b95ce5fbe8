"""A prefill the caller gave up on stops on the prefill replica and frees what it holds: each
attempt's deadline travels with the call and the prefill worker enforces it itself (in-process
workers, the simulated engine with a 3 s prefill)."""

from __future__ import annotations

import time

import pytest
from starlette.testclient import TestClient

from cluster.inprocess import build_inprocess
from cluster.settings import parse_settings
from tests.unit.test_reference_engine import record_request_ids

PROFILE = {
    "profile": "prefill-deadline",
    "auth": {"enabled": False},
    "model": {"context_length": 4096},
    "engine": {"kind": "simulated", "simulated": {"prefill_base_ms": 3000, "output": "counter"}},
    "kv_handoff": {"prefill_timeout_s": 0.3, "prefill_attempts": 2},
}
BODY = {"model": "mistral-small-4", "max_tokens": 4,
        "messages": [{"role": "user", "content": "count"}]}


@pytest.fixture(scope="module")
def app():
    ingress = build_inprocess(parse_settings(PROFILE))
    with TestClient(ingress.build_asgi_app()) as client:
        yield client, ingress.service.pools["fast"]


def idle(worker) -> bool:
    stats = worker.engine.stats()
    return (stats.running, stats.waiting, stats.kv_tokens) == (0, 0, 0)


def test_prefill_attempts_that_time_out_are_stopped_where_they_ran(app):
    client, decode = app
    started = time.monotonic()
    reply = client.post("/v1/chat/completions", json=BODY)
    assert reply.status_code == 502, reply.text
    assert "prefill failed on 2 attempts" in reply.json()["error"]["message"]
    # two 0.3 s attempts, not two 3 s prefills run to the end
    assert time.monotonic() - started < 2.5
    assert idle(decode.prefill) and idle(decode)


def test_a_request_deadline_shorter_than_the_prefill_stops_it(app):
    client, decode = app
    reply = client.post("/v1/chat/completions", json=BODY,
                        headers={"x-request-timeout": "0.2"})
    assert reply.status_code == 504, reply.text
    assert reply.json()["error"]["code"] == "deadline_exceeded"
    assert idle(decode.prefill) and idle(decode)


def test_each_attempt_is_its_own_engine_request(app, monkeypatch):
    """The abort sent after a late attempt names the attempt's engine request, and may
    arrive while the retry waits on the same replica: the retry must carry an id of its own
    (with one id, that abort stopped the retry)."""
    client, decode = app
    seen = record_request_ids(monkeypatch, decode.prefill.engine, "prefill")
    reply = client.post("/v1/chat/completions", json=BODY)
    assert reply.status_code == 502, reply.text
    assert len(seen) == 2 and seen[1] == f"{seen[0]}.retry1"


def test_a_decode_leg_waiting_on_a_stalled_engine_ends_at_the_deadline():
    """The deadline was checked only when a chunk came: an engine that stalled (here a 4 s
    step) kept the sequence's KV and batch slot past it, for a caller gone by then. Nor does
    the leg keep its own copy of the prompt's KV once the engine has it."""
    import asyncio

    from services.context import RequestContext
    from services.engines.protocol import EngineRequest, SamplingParams
    from services.errors import DeadlineExceeded
    from services.workers.decode import DecodeWorker
    from services.workers.prefill import PrefillWorker

    worker = parse_settings({"profile": "stall", "auth": {"enabled": False},
                             "kv_handoff": {"backend": "local"},
                             "engine": {"kind": "simulated", "simulated": {
                                 "output": "counter", "decode_step_ms": 4000}}}).worker("fast")
    decode = DecodeWorker(worker, PrefillWorker(worker))

    async def run():
        ctx = RequestContext("r", deadline=time.time() + 0.5)
        start, got = time.monotonic(), []
        with pytest.raises(DeadlineExceeded):
            async for chunk in decode.generate(ctx, EngineRequest(
                    "r", list(range(1, 20)), SamplingParams(max_tokens=50))):
                got.append(chunk)
        return time.monotonic() - start, got

    took, got = asyncio.run(run())
    assert len(got) == 1 and took < 3.0, took  # the first token, then the deadline, not 4 s
    stats = decode.engine.stats()
    assert stats.running == 0 and stats.kv_tokens == 0


def test_a_decode_leg_lets_go_of_the_prompts_kv_once_its_engine_has_it():
    """The leg kept the KV it received for its whole decode: beside the engine's own, a second
    copy of the prompt's KV per running sequence (on Ray, the object store's, pinned)."""
    import asyncio
    import gc
    import weakref

    from services.context import RequestContext
    from services.engines.protocol import EngineRequest, SamplingParams
    from services.workers.decode import DecodeWorker
    from services.workers.prefill import PrefillWorker

    worker = parse_settings({"profile": "kv-copy", "auth": {"enabled": False},
                             "kv_handoff": {"backend": "local"},
                             "engine": {"kind": "simulated", "simulated": {
                                 "output": "counter", "decode_step_ms": 20}}}).worker("fast")
    decode = DecodeWorker(worker, PrefillWorker(worker))
    received, real = [], decode.engine.decode

    def recorded(request, first_token, kv):
        received.append(weakref.ref(kv))
        return real(request, first_token, kv.copy() if hasattr(kv, "copy") else type(kv)(
            kv.num_tokens))

    decode.engine.decode = recorded

    async def run():
        alive = []
        async for chunk in decode.generate(RequestContext("r"), EngineRequest(
                "r", list(range(1, 20)), SamplingParams(max_tokens=6))):
            gc.collect()
            alive.append(received[0]() is not None if received else None)
        return alive

    alive = asyncio.run(run())
    assert alive and not any(alive[1:]), alive  # gone once the engine started
