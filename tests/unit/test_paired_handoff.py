"""The concurrent (SGLang-style) handoff path of the workers, on the CPU: the in-process `paired`
backend opens a room per attempt, the prefill replica says where it serves the KV before it runs,
the decode side waits for the KV beside the prefill. Same answers as the sequential path; failed
prefills retried in new rooms; nothing left open (rooms, KV) after success, failure or a client
leaving mid-prefill."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from cluster.inprocess import build_inprocess
from cluster.settings import parse_settings
from services.errors import EngineUnavailable, KVHandoffFailed
from services.kv.backends import open_rooms
from services.kv.protocol import PairedKV

BODY = {"model": "mistral-small-4", "max_tokens": 12, "temperature": 0,
        "messages": [{"role": "user", "content": "count"}]}


def profile(backend: str, **engine) -> dict:
    return {"profile": f"handoff-{backend}", "auth": {"enabled": False},
            "model": {"context_length": 4096}, "kv_handoff": {"backend": backend},
            "engine": {"kind": "simulated", "simulated": {"output": "counter"}} | engine}


def serve(settings: dict, requests: list[dict], leave_after_s: float | None = None,
          one_by_one: bool = False, setup=None):
    """Answers (status, body) of `requests` sent at once (or `one_by_one`) to an in-process
    stack, and its fast pool's decode worker; with `leave_after_s`, the client gives up on
    them after that long; `setup(decode)` runs before the first request."""
    ingress = build_inprocess(parse_settings(settings))
    if setup is not None:
        setup(ingress.service.pools["fast"])

    async def run():
        transport = httpx.ASGITransport(app=ingress.build_asgi_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://small4") as client:
            calls = [client.post("/v1/chat/completions", json=r, timeout=30) for r in requests]
            if one_by_one:
                return [(r.status_code, r.json()) for r in [await c for c in calls]]
            if leave_after_s is None:
                return [(r.status_code, r.json()) for r in await asyncio.gather(*calls)]
            tasks = [asyncio.ensure_future(c) for c in calls]
            await asyncio.sleep(leave_after_s)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.sleep(0.1)
            return []

    return asyncio.run(run()), ingress.service.pools["fast"]


def nothing_held(decode) -> bool:
    legs = (decode.engine.stats(), decode.prefill.engine.stats())
    return open_rooms() == 0 and all((s.running, s.waiting, s.kv_tokens) == (0, 0, 0)
                                     for s in legs)


def content(body: dict) -> str:
    return body["choices"][0]["message"]["content"]


def test_paired_answers_equal_the_sequential_ones():
    requests = [BODY | {"max_tokens": n} for n in (1, 5, 12)]
    paired, decode = serve(profile("paired"), requests)
    sequential, colocated = serve(profile("local"), requests)
    assert (decode.handoff.backend, colocated.handoff.backend) == ("paired", "local")
    assert [s for s, _ in paired] == [200, 200, 200], paired
    assert [content(b) for _, b in paired] == [content(b) for _, b in sequential]
    assert [b["usage"] for _, b in paired] == [b["usage"] for _, b in sequential]
    assert nothing_held(decode)


def test_failed_prefills_are_retried_in_new_rooms():
    faults = {"faults": {"prefill_fail_every": 2}}  # every other attempt fails
    answers, decode = serve(profile("paired", **faults), [BODY] * 6, one_by_one=True)
    assert [s for s, _ in answers] == [200] * 6, answers
    assert len({content(b) for _, b in answers}) == 1
    assert nothing_held(decode)


class LosesEachFirstKV:
    """The decode side's handoff, losing the first KV each request was sent (a prefill replica
    that died after replying, an object the store lost, a transfer that stalled): the receive
    fails as the real backends fail, with `KVHandoffFailed`."""

    def __init__(self, handoff):
        self.handoff, self.lost = handoff, set()

    def __getattr__(self, name):
        return getattr(self.handoff, name)

    async def receive(self, ticket, request=None):
        kv = await self.handoff.receive(ticket, request)
        # a retry and a resume are engine requests of their own: the request's first is lost
        leg = ticket.request_id.split(".retry")[0].split("-resume")[0]
        if leg not in self.lost:
            self.lost.add(leg)
            raise KVHandoffFailed(f"KV for {ticket.request_id} was lost: injected")
        return kv


@pytest.mark.parametrize("backend", ["paired", "local"])
def test_a_kv_that_never_arrives_is_prefilled_again(backend):
    """An attempt is the prefill and the arrival of its KV: a lost KV is retried like a failed
    prefill, and the answer is the one a clean run gives. (On the sequential path the first
    leg's prefill runs from the ingress; its lost KV resumes the request, prefilled again by
    decode.)"""
    clean, _ = serve(profile(backend), [BODY] * 3, one_by_one=True)
    lossy = None

    def lose(decode):
        nonlocal lossy
        decode.handoff = lossy = LosesEachFirstKV(decode.handoff)

    answers, decode = serve(profile(backend), [BODY] * 3, one_by_one=True, setup=lose)
    assert [s for s, _ in answers] == [200] * 3, answers
    assert [content(b) for _, b in answers] == [content(b) for _, b in clean]
    assert len(lossy.lost) == 3  # each lost its first
    assert nothing_held(decode)


def test_a_kv_lost_on_every_attempt_is_a_502_naming_the_loss():
    class LosesAll(LosesEachFirstKV):
        async def receive(self, ticket, request=None):
            await self.handoff.receive(ticket, request)
            self.lost.add(ticket.request_id)
            raise KVHandoffFailed(f"KV for {ticket.request_id} was lost: injected")

    losing = None

    def lose(decode):
        nonlocal losing
        decode.handoff = losing = LosesAll(decode.handoff)

    settings = profile("local")
    settings["kv_handoff"] |= {"prefill_attempts": 2}
    answers, decode = serve(settings, [BODY], setup=lose)
    assert answers[0][0] == 502, answers
    message = answers[0][1]["error"]["message"]
    assert "prefill failed on 1 attempts" in message and "was lost" in message
    # the first leg's KV (prefilled from the ingress), then one prefill per resume (2)
    assert len(losing.lost) == 3 and sum("-resume" in rid for rid in losing.lost) == 2
    assert nothing_held(decode)


class SlowDecodeSide:
    """The decode side's handoff, its KV taking `delay_s` to be taken once it is there (SGLang's
    decode engine waiting for a batch slot, or in its pre-allocation queue, under load)."""

    def __init__(self, handoff, delay_s: float):
        self.handoff, self.delay_s = handoff, delay_s

    def __getattr__(self, name):
        return getattr(self.handoff, name)

    async def receive(self, ticket, request=None):
        kv = await self.handoff.receive(ticket, request)
        await asyncio.sleep(self.delay_s)
        return kv


def test_a_prefill_that_replied_is_not_run_again_while_decode_is_slow_to_take_its_kv():
    """The attempt's clock is the prefill's: once it replied, what is left is the decode
    engine's own wait, bounded by the request's deadline. The clock ran it out: three
    prefills that each succeeded, then a 502 saying prefill failed."""
    prefills = []

    def slow(decode):
        decode.handoff = SlowDecodeSide(decode.handoff, 2.5)  # past 0.2 s + the grace
        engine = decode.prefill.engine
        real = engine.prefill
        engine.prefill = lambda request: prefills.append(request.request_id) or real(request)

    settings = profile("paired")
    settings["kv_handoff"] |= {"prefill_timeout_s": 0.2, "prefill_attempts": 3}
    answers, decode = serve(settings, [BODY | {"max_tokens": 3}], setup=slow)
    assert answers[0][0] == 200, answers
    assert len(prefills) == 1, prefills
    assert nothing_held(decode)


def test_a_kv_that_decode_takes_past_the_requests_deadline_is_a_504_not_a_new_prefill():
    prefills = []

    def slow(decode):
        decode.handoff = SlowDecodeSide(decode.handoff, 3.0)
        engine = decode.prefill.engine
        real = engine.prefill
        engine.prefill = lambda request: prefills.append(request.request_id) or real(request)

    settings = profile("paired") | {"limits": {"request_timeout_s": 1.5}}
    settings["kv_handoff"] |= {"prefill_timeout_s": 0.2, "prefill_attempts": 3}
    answers, decode = serve(settings, [BODY | {"max_tokens": 3}], setup=slow)
    assert answers[0][0] == 504, answers  # the deadline's (the ingress's or this leg's)
    assert len(prefills) == 1, prefills
    assert nothing_held(decode)


def test_a_client_leaving_during_prefill_leaves_nothing_open():
    slow = {"simulated": {"output": "counter", "prefill_base_ms": 2000}}
    _, decode = serve(profile("paired", **slow), [BODY] * 2, leave_after_s=0.3)
    assert nothing_held(decode)


@pytest.mark.parametrize("backend", ["paired", "local"])
def test_a_prefill_that_outlives_its_timeout_is_retried_then_refused(backend):
    settings = profile(backend, simulated={"output": "counter", "prefill_base_ms": 2000})
    settings["kv_handoff"] |= {"prefill_timeout_s": 0.2, "prefill_attempts": 2}
    answers, decode = serve(settings, [BODY])
    assert answers[0][0] == 502 and "2 attempts" in answers[0][1]["error"]["message"]
    assert nothing_held(decode)


@pytest.mark.parametrize("backend", ["paired", "local"])
def test_a_serve_app_refuses_in_process_handoffs(backend):
    from cluster.app import build_app
    from cluster.settings import SettingsError

    with pytest.raises(SettingsError, match=f"kv_handoff.backend '{backend}'"):
        build_app(profile(backend))


def test_peer_calls_name_the_workers_function_not_a_string():
    """A method named by a string (a typo survives until the call) is refused at once."""
    import asyncio

    import pytest

    from services.workers.peer import call, stream
    from services.workers.prefill import PrefillWorker

    class Peer:
        async def abort(self, request_id):
            return request_id == "r1"

    assert asyncio.run(call(Peer(), PrefillWorker.abort, "r1")) is True
    with pytest.raises(TypeError, match="by the worker class's function"):
        asyncio.run(call(Peer(), "abort", "r1"))
    with pytest.raises(TypeError):
        stream(Peer(), "prefill_held")


def test_paired_answers_report_cached_tokens_as_the_sequential_ones_do():
    """The concurrent handoff's prefill reply may come after decoding started: its cached
    tokens still reach `usage.prompt_tokens_details`, streamed or not."""
    long = BODY | {"messages": [{"role": "user", "content": "count " * 300}]}

    def cached(answers):
        return [b["usage"]["prompt_tokens_details"]["cached_tokens"] for _, b in answers]

    paired, decode = serve(profile("paired"), [long, long], one_by_one=True)
    sequential, _ = serve(profile("local"), [long, long], one_by_one=True)
    assert cached(paired) == cached(sequential)
    assert cached(paired)[0] == 0 and cached(paired)[1] > 0
    assert nothing_held(decode)


def test_streamed_paired_answers_report_cached_tokens():
    long = BODY | {"messages": [{"role": "user", "content": "count " * 300}]}
    streamed = long | {"stream": True, "stream_options": {"include_usage": True}}
    ingress = build_inprocess(parse_settings(profile("paired")))

    async def run():
        transport = httpx.ASGITransport(app=ingress.build_asgi_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://small4") as client:
            await client.post("/v1/chat/completions", json=long, timeout=30)
            reply = await client.post("/v1/chat/completions", json=streamed, timeout=30)
            events = [json.loads(line[6:]) for line in reply.text.splitlines()
                      if line.startswith("data: {")]
            return [e["usage"] for e in events if e.get("usage")]
    [usage] = asyncio.run(run())
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0


def test_a_prefill_failing_after_its_kv_arrived_resumes_the_decode():
    """Paired handoffs: the decode leg starts on the KV beside the prefill call, and is
    aborted if that call fails after all (`_watch_prefill`). The abort ends the engine's
    stream with a retryable error, as SGLang's does: the request is resumed elsewhere and
    answered whole, not ended as if its client had left."""
    body = BODY | {"max_tokens": 60}
    engine = {"simulated": {"output": "counter", "decode_step_ms": 10}}
    clean, _ = serve(profile("paired", **engine), [body])
    failed = []

    def fail_after_sending(decode):
        original = decode.prefill.prefill

        async def prefill(ctx, request, ticket):
            reply = await original(ctx, request, ticket)
            if not failed:  # the first leg only: its decode is streaming by now
                failed.append(request.request_id)
                await asyncio.sleep(0.1)
                raise EngineUnavailable("the prefill replica went after sending: injected")
            return reply

        decode.prefill.prefill = prefill

    answers, decode = serve(profile("paired", **engine), [body], setup=fail_after_sending)
    assert failed and answers[0][0] == 200, answers
    assert content(answers[0][1]) == content(clean[0][1])
    assert answers[0][1]["usage"]["completion_tokens"] == 60
    assert nothing_held(decode)


def test_a_kv_received_as_its_attempt_fails_is_aborted_in_the_decode_engine():
    """SGLang's receive opens the decode engine's request for the room. An attempt that ends in
    the turn its KV came (its prefill failed beside it, its time ran out, its client left)
    leaves that request to nobody: it is aborted, or SGLang decodes it to `max_tokens`,
    holding its KV and a batch slot."""
    opened, aborted = [], []

    class FailsAfterTicket:
        """A prefill replica that says where it serves the KV, then fails at once."""

        async def prefill_paired(self, ctx, request, ticket):
            yield ticket
            raise EngineUnavailable("the prefill replica went: injected")

    class OpensAtOnce:
        """The decode side's handoff: the KV there in the same turn (a decode request open)."""

        def __init__(self, handoff):
            self.handoff = handoff

        def __getattr__(self, name):
            return getattr(self.handoff, name)

        async def receive(self, ticket, request=None):
            opened.append(ticket.request_id)
            return PairedKV(None, object())

    def setup(decode):
        decode.prefill, decode.handoff = FailsAfterTicket(), OpensAtOnce(decode.handoff)
        abort = decode.engine.abort

        async def recorded(request_id):
            aborted.append(request_id)
            return await abort(request_id)

        decode.engine.abort = recorded

    settings = profile("paired")
    settings["kv_handoff"] |= {"prefill_attempts": 2}
    answers, decode = serve(settings, [BODY], setup=setup)
    assert answers[0][0] == 502, answers
    assert len(opened) == 2 and set(opened) <= set(aborted), (opened, aborted)
    assert open_rooms() == 0


def test_a_paired_prefill_leaves_the_routers_queue_when_it_replies_not_when_decode_ends():
    """The routers count a prefill's uncached tokens as queued at its replica until it
    reports done. The sequential path reports with its reply; the concurrent one's call
    closes with the decode stream (minutes), so its tokens stayed queued that long: it
    reports with its reply too (what the replica holds is not known there: no trim)."""
    from services.workers import router_state

    class Listening:
        def __init__(self):
            self.done, self.trimmed = [], []

        def prefilled(self, request_id, cached_tokens):
            self.done.append(request_id)

        def correct_replica(self, replica, held_tokens):
            self.trimmed.append(replica)

        def report(self, replica, held_tokens, request_id, cached_tokens):  # as the router's
            if request_id is not None:
                self.prefilled(request_id, cached_tokens)
            if held_tokens is not None:
                self.correct_replica(replica, held_tokens)

    router = Listening()
    router_state.register(router)
    answers, _ = serve(profile("paired"), [BODY])
    assert answers[0][0] == 200
    assert len(router.done) == 1 and router.trimmed == []

