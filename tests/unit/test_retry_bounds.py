"""How much one request's failures can cost (in-process workers, simulated engine): a choice
reaches at most `prefill_attempts` + `max_resumes` prefills whatever fails (each resume made
all its own attempts: 3 × (1 + 2) = 9, so an input that kills its engine killed nine), a decode
step that fails a whole batch resumes its requests instead of failing them with 500s, and no
resumed leg is opened past the request's deadline."""

from __future__ import annotations

import time

from starlette.testclient import TestClient

from cluster.inprocess import build_inprocess
from cluster.settings import parse_settings
from services.errors import EngineUnavailable
from tests.log_lines import LogLines

PROFILE = {"profile": "retry-bounds", "auth": {"enabled": False},
           "model": {"context_length": 4096},
           "engine": {"kind": "simulated", "simulated": {"output": "counter"}},
           "stream": {"interval_tokens": 1}}
BODY = {"model": "mistral-small-4", "max_tokens": 24, "temperature": 0,
        "messages": [{"role": "user", "content": "count"}]}


def build(**changes):
    settings = parse_settings(PROFILE | changes)
    ingress = build_inprocess(settings)
    return settings, ingress, ingress.service.pools["fast"]


def test_a_choice_reaches_at_most_its_attempts_plus_its_resumes_in_prefills():
    settings, ingress, decoder = build(engine=PROFILE["engine"] | {
        "faults": {"decode_fail_every": 1, "decode_fail_after_tokens": 2}})
    worker, prefills = decoder.prefill, []
    real = worker.prefill

    async def failing_after_the_first(ctx, request, ticket):
        prefills.append(request.request_id)
        if len(prefills) > 1:  # every leg after the first: its prefill replica dies
            raise EngineUnavailable("injected: the prefill replica died")
        return await real(ctx, request, ticket)

    worker.prefill = failing_after_the_first
    with TestClient(ingress.build_asgi_app()) as client:
        reply = client.post("/v1/chat/completions", json=BODY)
    assert reply.status_code == 502, reply.text
    attempts, resumes = settings.kv_handoff.prefill_attempts, settings.limits.max_resumes
    assert len(prefills) == 1 + resumes <= attempts + resumes, prefills
    assert all("-resume" in rid for rid in prefills[1:])  # each resume tried, once


def test_a_decode_step_that_fails_its_batch_resumes_its_requests():
    """One failed forward pass (an out-of-memory, say) failed every stream of the batch with
    a 500, never resumed: none of them caused it."""
    _, ingress, decoder = build()
    batcher, steps = decoder.engine._batcher, []
    real = batcher.step

    async def failing_once(batch):
        steps.append(len(batch))
        if len(steps) == 3:
            raise RuntimeError("injected: out of memory in one forward pass")
        return await real(batch)

    batcher.step = failing_once
    with LogLines() as logged, TestClient(ingress.build_asgi_app()) as client:
        reply = client.post("/v1/chat/completions", json=BODY)
        again = client.post("/v1/chat/completions", json=BODY)
    # the request's log line (and its span) says it was resumed, the next one that it was not
    assert [r.resumes for r in logged.named("request done")] == [1, 0]
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == BODY["max_tokens"]
    assert reply.json()["choices"][0]["message"]["content"] == \
        again.json()["choices"][0]["message"]["content"]  # no gap, no repeat


def test_no_resumed_leg_opens_past_the_deadline():
    """The back-off before a resume slept past the deadline, then opened a leg anyway."""
    _, ingress, decoder = build(engine=PROFILE["engine"] | {
        "faults": {"decode_fail_every": 1, "decode_fail_after_tokens": 2}},
        limits={"max_resumes": 50})
    opened, real = [], decoder.generate

    def generate(ctx, request):
        opened.append(time.time())
        return real(ctx, request)

    decoder.generate = generate
    with TestClient(ingress.build_asgi_app()) as client:
        start = time.time()
        reply = client.post("/v1/chat/completions", json=BODY,
                            headers={"x-request-timeout": "0.25"})
    assert reply.status_code == 504, reply.text
    assert opened and all(t < start + 0.25 for t in opened), [t - start for t in opened]


def test_a_stream_past_its_deadline_ends_with_the_deadline_event():
    """The event saying the deadline passed was sent with no time left: a send that waited at
    all cut the stream without it (no error event, no [DONE]), charged as a stalled reader."""
    _, ingress, _ = build(engine={"kind": "simulated", "simulated": {
        "output": "counter", "decode_step_ms": 20}})
    with TestClient(ingress.build_asgi_app()) as client:
        reply = client.post("/v1/chat/completions", json=BODY | {
            "max_tokens": 400, "stream": True}, headers={"x-request-timeout": "0.5"})
    events = [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]
    assert '"error"' in events[-1] and "deadline" in events[-1], events[-3:]


def test_a_request_that_breaks_every_step_it_joins_ends_in_a_500_after_its_resumes():
    """A failed step resumes its batch's requests; one that breaks the step wherever it runs
    fails each batch it is resumed into, up to `max_resumes`, then is answered 500 (it got a
    503, overloaded, as if capacity would come back)."""
    settings, ingress, decoder = build()
    batcher, failed = decoder.engine._batcher, []
    real = batcher.step

    async def breaks_on_long_prompts(batch):
        if any(len(seq.request.prompt_ids) > 40 for seq in batch):
            failed.append(len(batch))
            raise RuntimeError("injected: this input breaks the step")
        return await real(batch)

    batcher.step = breaks_on_long_prompts
    with TestClient(ingress.build_asgi_app()) as client:
        reply = client.post("/v1/chat/completions", json=BODY | {"messages": [
            {"role": "user", "content": "word " * 60}]})
    assert reply.status_code == 500, reply.text
    assert reply.json()["error"]["code"] == "decode_step_failed"
    assert len(failed) == 1 + settings.limits.max_resumes


def test_resumes_are_counted_as_the_legs_they_open():
    """The resume counter (and the span's and log line's count) went up before the deadline
    check that refused the leg: a resume that never ran was counted."""
    from services.telemetry import metrics

    for _ in range(3):  # where the deadline falls differs run to run: each run must agree
        _, ingress, decoder = build(engine=PROFILE["engine"] | {
            "faults": {"decode_fail_every": 1, "decode_fail_after_tokens": 2}},
            limits={"max_resumes": 50})
        opened, real = [], decoder.generate

        def generate(ctx, request, opened=opened, real=real):
            opened.append(request.request_id)
            return real(ctx, request)

        decoder.generate = generate
        before = metrics.RESUMES.value(pool="fast")
        with TestClient(ingress.build_asgi_app()) as client:
            reply = client.post("/v1/chat/completions", json=BODY,
                                headers={"x-request-timeout": "0.25"})
        assert reply.status_code == 504, reply.text
        resumed = [r for r in opened if "-resume" in r]
        assert metrics.RESUMES.value(pool="fast") - before == len(resumed)


def test_tokens_sent_before_a_failure_count_in_the_pools_token_rates():
    """`small4_completion_tokens_total` (the pool's tokens/s panel) counted only answers that
    finished: tokens streamed before an error were missing from it during the incident, while
    the tenant counter had them."""
    from services.telemetry import metrics

    _, ingress, _ = build(engine=PROFILE["engine"] | {
        "faults": {"decode_fail_every": 1, "decode_fail_after_tokens": 3}},
        limits={"max_resumes": 0})
    before = (metrics.COMPLETION_TOKENS.value(pool="fast"), metrics.PROMPT_TOKENS.value(
        pool="fast"), metrics.TENANT_TOKENS.value(tenant="all", kind="completion"))
    with TestClient(ingress.build_asgi_app()) as client:
        reply = client.post("/v1/chat/completions", json=BODY | {"stream": True})
    assert '"error"' in reply.text  # the premise: it failed after some tokens were sent
    sent = metrics.TENANT_TOKENS.value(tenant="all", kind="completion") - before[2]
    assert sent > 0
    assert metrics.COMPLETION_TOKENS.value(pool="fast") - before[0] == sent
    assert metrics.PROMPT_TOKENS.value(pool="fast") > before[1]


def test_a_choice_closed_while_its_resume_pauses_opens_no_leg(monkeypatch):
    """A stalled reader's close closed every choice's stream while a choice whose replica had
    just failed was pausing before its resume; the pause ended and a new leg opened, with no
    one left to close it: it ran, its KV held, until the request's deadline. Here the answer
    is closed as the failed leg is (the pause follows)."""
    import asyncio

    from services.api import service as module
    from services.api.service import Answer
    from services.errors import RequestAborted
    from services.guard.keys import ANONYMOUS

    _, ingress, decoder = build(engine=PROFILE["engine"] | {
        "faults": {"decode_fail_every": 1, "decode_fail_after_tokens": 2}})
    opened, real = [], decoder.generate

    def generate(ctx, request):
        opened.append(request.request_id)
        return real(ctx, request)

    decoder.generate = generate
    answers, closing, close_stream = [], [], module.close_stream

    async def closing_the_answer_too(iterator, **kwargs):
        await close_stream(iterator, **kwargs)
        if not closing:  # the failed leg's: its choice pauses next
            closing.append(asyncio.ensure_future(answers[0].close(RequestAborted("test"))))

    monkeypatch.setattr(module, "close_stream", closing_the_answer_too)

    async def body():
        return BODY | {"stream": True}

    async def go():
        answer = await ingress.service.chat(ANONYMOUS, {}, body)
        assert isinstance(answer, Answer), answer
        answers.append(answer)
        events = [event async for event in answer.events()]
        await asyncio.gather(*closing)
        return events

    events = asyncio.run(go())
    assert closing and opened == [], opened  # (the first leg is decode_handed; no resume)
    assert events and "[DONE]" not in events[-1]  # it ended, and said why
