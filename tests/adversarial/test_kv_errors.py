"""Errors are classified where they arise: input the engine cannot take is the caller's
mistake, answered once as a 400 naming the field, and never retried on another replica as if
the replica had died; a replica that dies is retried. In-process workers, the reference engine
(its real vision tower) and the reference prefill → decode handoff."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from cluster.settings import parse_settings
from services.context import RequestContext
from services.engines.protocol import EngineRequest, SamplingParams
from services.errors import DeadlineExceeded, EngineUnavailable, InputRejected, from_exception
from services.workers.decode import DecodeWorker
from services.workers.prefill import PrefillWorker

PROFILE = {"profile": "kv-errors", "auth": {"enabled": False},
           "kv_handoff": {"backend": "local", "prefill_attempts": 3}}


class CountingPrefill(PrefillWorker):
    """The real prefill worker, counting the attempts that reach it."""

    attempts = 0

    async def prefill_held(self, *args):
        self.attempts += 1
        async for item in super().prefill_held(*args):
            yield item


@pytest.fixture(scope="module")
def workers():
    settings = parse_settings(PROFILE).worker("fast")
    prefill = CountingPrefill(settings)
    return DecodeWorker(settings, prefill), prefill


def image_request(tokenizer, pixels) -> EngineRequest:
    """A prompt with one image's tokens, its pixels replaced by `pixels`."""
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (20, 40, 60)).save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    prompt = tokenizer.encode_chat([{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": url}}]}], effort="none")
    return EngineRequest("bad-image", prompt.ids, SamplingParams(max_tokens=2, temperature=0),
                         images=[pixels])


async def first_chunk(decode, request):
    ctx = RequestContext(request.request_id)
    async for chunk in decode.generate(ctx, request):
        return chunk


def test_pixels_the_vision_tower_cannot_take_are_a_400_answered_once(workers, tokenizer):
    decode, prefill = workers
    prefill.attempts = 0
    bad = np.zeros((3, 1, 1), dtype=np.float32)  # no patch fits: the tower fails on it
    with pytest.raises(InputRejected) as err:
        asyncio.run(first_chunk(decode, image_request(tokenizer, bad)))
    error = from_exception(err.value)
    assert (error.status, error.param, error.code) == (400, "messages", "input_rejected")
    assert "RuntimeError" not in error.message or "vision" in error.message
    assert prefill.attempts == 1
    assert (decode.engine.stats().kv_tokens, prefill.engine.stats().kv_tokens) == (0, 0)


def test_a_replica_failure_is_still_retried(workers, tokenizer):
    decode, prefill = workers
    prefill.attempts = 0
    real = prefill.engine.prefill
    calls = []

    async def dies_once(request):
        calls.append(request.request_id)
        if len(calls) == 1:
            raise EngineUnavailable("the prefill engine died")
        return await real(request)

    prefill.engine.prefill = dies_once
    try:
        request = EngineRequest("retried", [1, 2, 3], SamplingParams(max_tokens=2,
                                                                     temperature=0))
        assert asyncio.run(first_chunk(decode, request)).token_ids
    finally:
        del prefill.engine.prefill
    assert prefill.attempts == 2


def test_a_decode_stream_nobody_closes_stops_at_its_deadline():
    """A caller that vanished without closing its stream (an ingress replica lost mid-answer)
    leaves no sequence decoding on to `max_tokens`: the decode replica keeps the deadline."""
    settings = parse_settings(PROFILE | {"engine": {
        "kind": "simulated", "simulated": {"decode_step_ms": 20, "output": "counter"}}}
    ).worker("fast")
    decode = DecodeWorker(settings, PrefillWorker(settings))
    request = EngineRequest("abandoned", [1, 2, 3], SamplingParams(max_tokens=500,
                                                                   temperature=0))

    async def run() -> tuple[int, float, int]:
        ctx = RequestContext(request.request_id, deadline=time.time() + 0.5)
        received, stream = 0, decode.generate(ctx, request)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            async for chunk in stream:  # read, as Serve's machinery would, but never closed
                received += len(chunk.token_ids)
        await asyncio.sleep(0.1)
        # freed when the error left the worker, not when the loop shuts its generators down
        return received, time.monotonic() - started, decode.engine.stats().kv_tokens

    received, seconds, held = asyncio.run(run())
    assert 0 < received < 100 and seconds < 5
    assert held == 0 and decode.engine.stats().kv_tokens == 0


def test_an_engines_gauges_move_while_its_requests_run(monkeypatch):
    """From a worker's first request on, its engine's queue and running gauges are published
    every few seconds, not only when a request ends: a stuck engine's load shows as it grows."""
    from services.telemetry import metrics
    from services.workers import engine_host

    monkeypatch.setattr(engine_host, "GAUGE_S", 0.05)
    settings = parse_settings(PROFILE | {"engine": {
        "kind": "simulated", "simulated": {"decode_step_ms": 20, "output": "counter"}}}
    ).worker("fast")
    decode = DecodeWorker(settings, PrefillWorker(settings))
    request = EngineRequest("long", [1, 2, 3], SamplingParams(max_tokens=400, temperature=0))

    async def run() -> float | None:
        async def read():  # as Serve's machinery reads a stream
            async for _ in decode.generate(RequestContext(request.request_id), request):
                pass

        reader = asyncio.ensure_future(read())
        await asyncio.sleep(0.2)
        metrics.RUNNING.set(0, pool="fast", role="decode")  # what a finished request left
        await asyncio.sleep(0.3)
        running = metrics.RUNNING.value(pool="fast", role="decode")
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        return running

    assert asyncio.run(run()) == 1


def test_decode_reports_its_own_wait_not_the_prefills():
    """A slow prefill is the prefill role's time: counted as decode's queue wait, a
    prefill-bound pool asked the autoscaler for decode engines."""
    settings = parse_settings(PROFILE | {"engine": {
        "kind": "simulated", "simulated": {"prefill_base_ms": 400, "decode_step_ms": 1,
                                           "output": "counter"}}}).worker("fast")
    decode = DecodeWorker(settings, PrefillWorker(settings))
    request = EngineRequest("slow-prefill", [1, 2, 3], SamplingParams(max_tokens=4,
                                                                      temperature=0))

    async def run() -> dict[str, float]:
        async for _ in decode.generate(RequestContext(request.request_id), request):
            pass
        return await decode.record_autoscaling_stats()

    report = asyncio.run(run())
    assert report["queue_wait_p90_s"] < 0.2
