"""A busy day at the ingress: past its replicas' slots (`ingress.max_ongoing_requests`) and
its queue (`ingress.max_queued_requests`), requests are refused at once with a 503 and a
Retry-After, not parked without bound (each parked request holds its body, read before it
waits and before its key is checked). Serve's HTTP path serves the ingress directly here
(throughput-optimized, one node), as `small4 up` does."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.e2e.conftest import SIM_PROFILE, deployed

pytestmark = pytest.mark.ray

SLOTS, QUEUE = 2, 2


@pytest.fixture(scope="module")
def busy(serve_url):
    profile = SIM_PROFILE | {
        "profile": "adv-backpressure",
        "engine": {"kind": "simulated", "simulated": {"decode_step_ms": 20, "output": "counter"}},
        "ingress": {"num_cpus": 0.1, "max_ongoing_requests": SLOTS, "max_queued_requests": QUEUE},
        "pools": {name: pool | {"max_queue": 16} for name, pool in SIM_PROFILE["pools"].items()}}
    with deployed(profile, "adv-backpressure", serve_url) as url:
        yield url


async def _stream(http: httpx.AsyncClient, url: str) -> tuple[int, str | None, int]:
    """(status, Retry-After, content events) of one streamed answer of 100 tokens."""
    body = {"model": "mistral-small-4", "max_tokens": 100, "stream": True,
            "messages": [{"role": "user", "content": "count"}]}
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
        events = sum([1 async for line in reply.aiter_lines() if line.startswith("data: {")])
        return reply.status_code, reply.headers.get("retry-after"), events


def test_requests_past_the_slots_and_the_queue_are_refused_at_once(busy):
    async def burst():
        async with httpx.AsyncClient(timeout=60) as http:
            await _stream(http, busy)  # warm
            return await asyncio.gather(*(_stream(http, busy) for _ in range(4 * (SLOTS + QUEUE))))

    outcomes = asyncio.run(burst())
    statuses = sorted(status for status, _, _ in outcomes)
    assert set(statuses) <= {200, 503}, statuses
    served = [o for o in outcomes if o[0] == 200]
    refused = [o for o in outcomes if o[0] == 503]
    assert len(served) >= SLOTS and refused, statuses  # the rest were not parked
    assert all(events > 1 for _, _, events in served)  # answered in full
    assert all(retry == "1" for _, retry, _ in refused)
    # once the burst has passed, the ingress takes requests again
    assert asyncio.run(_once(busy))[0] == 200


async def _once(url: str):
    async with httpx.AsyncClient(timeout=60) as http:
        return await _stream(http, url)
