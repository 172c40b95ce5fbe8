"""Admission control: with every pool at `max_queue` and nowhere to spill, a request gets a 503
with `Retry-After` at once instead of waiting without bound; room frees when requests end
(in-process workers, simulated engine with 1 s answers)."""

from __future__ import annotations

import asyncio

import httpx

from cluster.inprocess import build_inprocess
from cluster.settings import parse_settings
from services.telemetry import metrics

PROFILE = {
    "profile": "admission",
    "auth": {"enabled": False},
    "model": {"context_length": 4096},
    "engine": {"kind": "simulated", "simulated": {"decode_step_ms": 50, "output": "counter"}},
    "pools": {"fast": {"effort": "none", "max_queue": 1},
              "deep": {"effort": "high", "max_queue": 1}},
}
BODY = {"model": "mistral-small-4", "max_tokens": 20,
        "messages": [{"role": "user", "content": "count"}]}


def test_full_pools_answer_503_with_retry_after_then_admit_again():
    app = build_inprocess(parse_settings(PROFILE)).build_asgi_app()

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://small4") as client:
            post = lambda: client.post("/v1/chat/completions", json=BODY, timeout=30)  # noqa: E731
            # two in flight fill both pools (the second spills over to deep)
            busy = [asyncio.ensure_future(post()) for _ in range(2)]
            await asyncio.sleep(0.3)
            shed = metrics.REQUESTS.value(tenant="all", pool="none", status="503")
            refused = await post()
            shed = metrics.REQUESTS.value(tenant="all", pool="none", status="503") - shed
            answered = await asyncio.gather(*busy)
            return refused, shed, answered, await post()

    refused, shed, answered, after = asyncio.run(scenario())
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "overloaded_error"
    # what the error-rate alert counts (the refusal has no pool and no latency sample)
    assert shed == 1
    assert sorted(r.headers["x-small4-pool"] for r in answered) == ["deep", "fast"]
    assert [r.status_code for r in answered] == [200, 200]
    assert after.status_code == 200
