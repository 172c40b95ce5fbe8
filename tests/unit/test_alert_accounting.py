"""What the alerts read of a request that got no first token (in-process workers, a simulated
engine whose prefill outlasts every deadline here): a 504 at the deadline the client set is
counted as the client's (`small4_client_deadlines_total`), one at the stack's own deadline is
not; either, once it waited longer than its pool's TTFT SLO, is a TTFT miss
(`small4_ttft_missed_total`). The rules that read them are evaluated in
tests/unit/test_monitoring_assets.py and tests/helm."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from cluster.inprocess import build_inprocess
from cluster.settings import parse_settings
from services.telemetry import metrics

PROFILE = {
    "profile": "alerts",
    "auth": {"enabled": False},
    "model": {"context_length": 4096},
    "limits": {"request_timeout_s": 0.6},
    "engine": {"kind": "simulated", "simulated": {"prefill_base_ms": 3000}},
    "pools": {"fast": {"effort": "none", "slo": {"ttft_s": 0.3}},
              "deep": {"effort": "high"}},
}
BODY = {"model": "mistral-small-4", "max_tokens": 4,
        "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture(scope="module")
def app():
    return build_inprocess(parse_settings(PROFILE)).build_asgi_app()


def counts() -> tuple[float, float, float]:
    return (metrics.CLIENT_DEADLINES.value(pool="fast"), metrics.TTFT_MISSED.value(pool="fast"),
            metrics.REQUESTS.value(tenant="all", pool="fast", status="504"))


@pytest.mark.parametrize(("headers", "theirs", "missed"), [
    ({"x-request-timeout": "0.5"}, 1, 1),  # the client's deadline, after the 0.3 s SLO
    ({}, 0, 1),  # the stack's own (limits.request_timeout_s)
    ({"x-request-timeout": "0.1"}, 1, 0),  # the client's, before the SLO: no TTFT verdict
])
def test_a_504_is_the_clients_when_its_deadline_fired_and_a_ttft_miss_after_the_slo(
        app, headers, theirs, missed):
    async def ask():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://small4") as client:
            return await client.post("/v1/chat/completions", json=BODY, headers=headers,
                                     timeout=30)

    before = counts()
    response = asyncio.run(ask())
    assert response.status_code == 504, response.text
    after = counts()
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (
        theirs, missed, 1)


def test_a_504_before_the_clients_deadline_is_the_stacks():
    """A deadline of the stack's own that fires first (an attempt's, a worker's) is not the
    client's, whatever header it sent: only a 504 at (or, across clocks, just before) the
    client's own deadline is left out of the error-rate alerts."""
    import time

    from services.api.service import _Record
    from services.errors import DeadlineExceeded
    from services.guard.keys import Principal

    service = build_inprocess(parse_settings(PROFILE)).service
    outcomes = []
    for left_s in (30.0, 0.0):
        record = _Record.open(service, Principal("k", "t"), {})
        record.pool, record.client_deadline = "fast", True
        record.deadline = time.time() + left_s
        before = metrics.CLIENT_DEADLINES.value(pool="fast")
        record.close(DeadlineExceeded("an attempt's deadline passed"))
        outcomes.append(metrics.CLIENT_DEADLINES.value(pool="fast") - before)
    assert outcomes == [0, 1]
