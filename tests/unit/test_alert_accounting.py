"""What the alerts read of a request that ended in a 504 or without a first token (in-process
workers, a simulated engine): a 504 at the deadline the client set, while the stack was keeping
its SLOs, is the client's (`small4_client_deadlines_total`, left out of the error-rate alerts);
one at the stack's own deadline, or at a client's deadline the stack was already late for, is
the stack's. A request that got no first token within its pool's TTFT SLO (as the alerts read
it: up to the latency bucket at or above it) is a TTFT miss (`small4_ttft_missed_total`). The
rules that read them are evaluated in tests/unit/test_monitoring_assets.py and tests/helm."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from cluster.inprocess import build_inprocess
from cluster.settings import parse_settings
from services.telemetry import metrics

BASE = {"auth": {"enabled": False}, "model": {"context_length": 4096}}
# prefill outlasts every deadline here; the fast pool's TTFT SLO reads as 0.5 s (its bucket)
SLOW_PREFILL = BASE | {
    "profile": "alerts", "limits": {"request_timeout_s": 0.8},
    "engine": {"kind": "simulated", "simulated": {"prefill_base_ms": 3000}},
    "pools": {"fast": {"effort": "none", "slo": {"ttft_s": 0.3}}, "deep": {"effort": "high"}}}
# first tokens at once, then one token per 0.1 s: late for fast's 0.05 s ITL SLO, on time for
# deep's 0.5 s
SLOW_DECODE = BASE | {
    "profile": "alerts-decode",
    "engine": {"kind": "simulated", "simulated": {"decode_step_ms": 100, "output": "counter"}},
    "pools": {"fast": {"effort": "none", "slo": {"itl_s": 0.05}},
              "deep": {"effort": "high", "slo": {"itl_s": 0.5}}}}
BODY = {"model": "mistral-small-4", "max_tokens": 4,
        "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture(scope="module")
def apps():
    return {name: build_inprocess(parse_settings(profile)).build_asgi_app()
            for name, profile in (("prefill", SLOW_PREFILL), ("decode", SLOW_DECODE))}


def counts(pool: str) -> tuple[float, float, float]:
    return (metrics.CLIENT_DEADLINES.value(pool=pool), metrics.TTFT_MISSED.value(pool=pool),
            metrics.REQUESTS.value(tenant="all", pool=pool, status="504"))


def ask(app, body: dict, headers: dict, pool: str) -> tuple[int, int, int]:
    """The request's status and what it added to the client-deadline and TTFT-miss counts."""
    async def post():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://small4") as client:
            return await client.post("/v1/chat/completions", json=body, headers=headers,
                                     timeout=30)

    before = counts(pool)
    response = asyncio.run(post())
    after = counts(pool)
    assert after[2] - before[2] == (response.status_code == 504)
    return response.status_code, after[0] - before[0], after[1] - before[1]


@pytest.mark.parametrize(("headers", "theirs", "missed"), [
    ({"x-request-timeout": "0.2"}, 1, 0),  # the client's, within the SLO: no verdict on TTFT
    ({"x-request-timeout": "1.5"}, 0, 1),  # the client's, but the first token was late by then
    ({}, 0, 1),  # the stack's own deadline (limits.request_timeout_s)
])
def test_no_first_token_a_504_is_the_clients_only_while_the_stack_was_on_time(
        apps, headers, theirs, missed):
    assert ask(apps["prefill"], BODY, headers, "fast") == (504, theirs, missed)


@pytest.mark.parametrize(("effort", "pool", "theirs"), [
    ("none", "fast", 0),  # streaming slower than its ITL SLO when the client's deadline came
    ("high", "deep", 1),  # on time: the client asked for less than 40 tokens take
])
def test_after_the_first_token_a_504_is_the_clients_only_if_decode_kept_its_slo(
        apps, effort, pool, theirs):
    body = BODY | {"max_tokens": 40, "reasoning_effort": effort}
    assert ask(apps["decode"], body, {"x-request-timeout": "1.0"}, pool) == (504, theirs, 0)


def test_a_request_past_its_ttft_slo_counts_overdue_until_it_ends(apps):
    """The fast pool's SLO reads as 0.5 s: from then until the request ends (its 0.8 s
    deadline here, minutes in production) it shows in `small4_first_token_overdue`, which a
    stalled pool's alert reads; a request that got its first token in time never shows."""
    async def scenario():
        transport = httpx.ASGITransport(app=apps["prefill"])
        async with httpx.AsyncClient(transport=transport, base_url="http://small4") as client:
            post = asyncio.ensure_future(client.post("/v1/chat/completions", json=BODY,
                                                     timeout=30))
            await asyncio.sleep(0.3)
            early = metrics.FIRST_TOKEN_OVERDUE.value(pool="fast")
            await asyncio.sleep(0.35)
            during = metrics.FIRST_TOKEN_OVERDUE.value(pool="fast")
            response = await post
            return early, during, response.status_code, metrics.FIRST_TOKEN_OVERDUE.value(
                pool="fast")

    early, during, status, after = asyncio.run(scenario())
    assert (early or 0, during, status, after) == (0, 1, 504, 0)

    async def answered():  # first tokens at once: never overdue
        transport = httpx.ASGITransport(app=apps["decode"])
        async with httpx.AsyncClient(transport=transport, base_url="http://small4") as client:
            return await client.post("/v1/chat/completions", json=BODY, timeout=30)

    assert asyncio.run(answered()).status_code == 200
    assert metrics.FIRST_TOKEN_OVERDUE.value(pool="fast") == 0


def test_the_overdue_gauge_is_published_again_while_it_stays_put(apps, monkeypatch):
    """Ray's metrics agent drops a gauge nobody sets within ~20 s, and a stalled pool's count
    does not change: every pool's count is set again every GAUGE_REPUBLISH_S."""
    monkeypatch.setattr(metrics, "GAUGE_REPUBLISH_S", 0.05)
    published = []
    set_gauge = metrics.FIRST_TOKEN_OVERDUE.set
    monkeypatch.setattr(metrics.FIRST_TOKEN_OVERDUE, "set",
                        lambda value, **tags: published.append((tags["pool"], value))
                        or set_gauge(value, **tags))
    assert ask(apps["prefill"], BODY, {}, "fast")[0] == 504
    assert published.count(("deep", 0)) >= 5  # deep: nothing ever changed


def test_a_504_before_the_clients_deadline_is_the_stacks():
    """A deadline of the stack's own that fires first (an attempt's, a worker's) is not the
    client's, whatever header it sent: only a 504 at (or, across clocks, just before) the
    client's own deadline is left out of the error-rate alerts."""
    import time

    from services.api.service import _Record
    from services.errors import DeadlineExceeded
    from services.guard.keys import Principal

    service = build_inprocess(parse_settings(SLOW_PREFILL)).service
    outcomes = []
    for left_s in (30.0, 0.0):
        record = _Record.open(service, Principal("k", "t"), {})
        record.pool, record.client_deadline = "fast", True
        record.deadline = time.time() + left_s
        before = metrics.CLIENT_DEADLINES.value(pool="fast")
        record.close(DeadlineExceeded("an attempt's deadline passed"))
        outcomes.append(metrics.CLIENT_DEADLINES.value(pool="fast") - before)
    assert outcomes == [0, 1]


def test_a_slow_upload_is_the_clients_link_not_a_late_first_token():
    """The stack's latencies count from the body in: a client that took 1.5 s to send its
    body, answered in milliseconds after, neither missed the 0.3 s TTFT SLO nor showed as a
    1.5 s first token (it paged the TTFT burn alerts)."""
    import json

    quick = BASE | {"profile": "alerts-upload", "engine": {"kind": "simulated"},
                    "pools": {"fast": {"effort": "none", "slo": {"ttft_s": 0.3}},
                              "deep": {"effort": "high"}}}
    app = build_inprocess(parse_settings(quick)).build_asgi_app()
    body = json.dumps(BODY).encode()

    async def slowly():
        yield body[:10]
        await asyncio.sleep(1.5)  # the client's link
        yield body[10:]

    async def post():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://small4") as client:
            return await client.post("/v1/chat/completions", content=slowly(), timeout=30,
                                     headers={"content-type": "application/json"})

    before = (metrics.TTFT.count(pool="fast", role="ingress"),
              metrics.TTFT.sum(pool="fast", role="ingress"), metrics.TTFT_MISSED.value(pool="fast"))
    reply = asyncio.run(post())
    assert reply.status_code == 200, reply.text
    assert metrics.TTFT.count(pool="fast", role="ingress") == before[0] + 1
    assert metrics.TTFT.sum(pool="fast", role="ingress") - before[1] < 0.5
    assert metrics.TTFT_MISSED.value(pool="fast") == before[2]


def test_a_wait_for_an_upload_slot_counts_as_the_stacks_own():
    """Only the body's transfer is the client's: a request that waited for an upload slot
    behind another client's slow upload waited on the stack (its TTFT counts that wait)."""
    import json

    one_slot = BASE | {"profile": "alerts-slots", "engine": {"kind": "simulated"},
                       "limits": {"max_uploads": 1, "upload_wait_s": 5},
                       "pools": {"fast": {"effort": "none"}, "deep": {"effort": "high"}}}
    app = build_inprocess(parse_settings(one_slot)).build_asgi_app()
    body = json.dumps(BODY).encode()

    async def slowly():
        yield body[:10]
        await asyncio.sleep(1.0)  # the first client's link, holding the only slot
        yield body[10:]

    async def post(client, content):
        return await client.post("/v1/chat/completions", content=content, timeout=30,
                                 headers={"content-type": "application/json"})

    async def both():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://small4") as client:
            slow = asyncio.ensure_future(post(client, slowly()))
            await asyncio.sleep(0.2)  # the slow one holds the slot
            before = metrics.TTFT.sum(pool="fast", role="ingress")
            quick = await post(client, body)
            waited = metrics.TTFT.sum(pool="fast", role="ingress") - before
            return (await slow).status_code, quick.status_code, waited

    slow, quick, waited = asyncio.run(both())
    assert slow == quick == 200
    assert waited > 0.5  # the quick request's ~0.8 s behind the slot, counted
