"""Ordinary load, no fault injected: 64 concurrent streams of requests with and without images
through the real stack on Ray Serve, on each of Serve's transports between deployments. Every
request is answered in full (the prompt's KV and its images' pixels, handed between replicas by
reference, are never lost under concurrency), and nothing is held once the load has passed: no
KV in the engines, no objects left in Ray's workers."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import pytest

from tests.adversarial._load_fixtures import (body, load_stack, run_load,  # noqa: F401
                                              settle, stored_objects)

pytestmark = pytest.mark.ray

CONCURRENCY = 64
REQUESTS = 240


def has_images(payload: dict) -> bool:
    return isinstance(payload["messages"][0]["content"], list)


def message(outcome) -> str:
    """The error's message, from an error body or an SSE error event."""
    error = outcome.error or {}
    return str(error.get("error", error).get("message", ""))


def engines_holding(ask) -> list:
    """Engines of the pool (asked a few times: calls reach either replica) holding anything."""
    stats = [ask("fast-decode", "stats") for _ in range(4)]
    stats += [ask("fast-prefill", "replica_stats")[1] for _ in range(4)]
    return [s for s in stats if s.kv_tokens or s.running or s.waiting]


def grown(stack, images: int) -> dict:
    """Deployments holding more objects than before the load: pixels (at most `images`) in
    the multimodal replica that keeps them, next to nothing anywhere else."""
    now = stored_objects(stack.app)
    more = {d: now[d] - stack.baseline_objects[d] for d in now}
    return {d: n for d, n in more.items() if n > (images if d == "multimodal" else 4)}


def test_64_concurrent_streams_with_images_all_answer_in_full_and_nothing_stays_held(
        load_stack):
    """Every request answered in full; then the engines hold no KV, and the replicas no more
    objects than before the load: each KV export was freed once decode had it, and pixels stay
    only in the multimodal replica that made them, for their hold time (a resumed stream
    prefills them again), never pinned elsewhere."""
    payloads = [body(images=1 + i % 2, seed=i) if i % 3 == 0 else body()
                for i in range(REQUESTS)]
    started = time.time()
    outcomes = asyncio.run(run_load(load_stack.url, payloads, CONCURRENCY))
    failed = [(has_images(p), o) for p, o in zip(payloads, outcomes) if not o.ok]
    print(json.dumps({
        "transport": load_stack.transport, "requests": len(outcomes),
        "image_requests": sum(map(has_images, payloads)),
        "failed_image": sum(1 for image, _ in failed if image),
        "failed_text": sum(1 for image, _ in failed if not image),
        "errors": Counter(f"{o.status} {message(o)[:70]}" for _, o in failed).most_common(3),
        "wall_s": round(time.time() - started, 1)}))
    assert not failed, failed[:3]
    # Greedy `counter` output is the same for every request of one prompt.
    assert len({o.content for p, o in zip(payloads, outcomes) if not has_images(p)}) == 1

    assert not settle(lambda: engines_holding(load_stack.ask))
    images = sum(1 + i % 2 for i in range(0, REQUESTS, 3))
    assert not settle(lambda: grown(load_stack, images), timeout_s=30), "objects held"


def test_streams_cancelled_mid_flight_leave_no_kv_behind(load_stack):
    """64 streams with and without images, each client gone after its first event: every
    leg is aborted and its KV freed, in the engines and in Ray's object store."""
    import httpx

    ask = load_stack.ask
    payloads = [body(images=i % 2, seed=i, max_tokens=400) for i in range(CONCURRENCY)]

    async def leave_after_first_event(client, payload):
        async with client.stream("POST", f"{load_stack.url}/v1/chat/completions",
                                 json=payload) as response:
            async for _ in response.aiter_lines():
                return response.status_code  # closing the stream: the client is gone

    async def run():
        limits = httpx.Limits(max_connections=CONCURRENCY + 8)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            return await asyncio.wait_for(asyncio.gather(
                *[leave_after_first_event(client, p) for p in payloads]), 120)

    assert set(asyncio.run(run())) == {200}

    assert not settle(lambda: engines_holding(ask), timeout_s=30)
    images = sum(1 + i % 2 for i in range(0, REQUESTS, 3)) + CONCURRENCY // 2

    assert not settle(lambda: grown(load_stack, images), timeout_s=30), "objects held"


def test_image_streams_cut_by_a_dying_decode_replica_resume(load_stack, metrics_url):
    """Image streams run on both decode replicas; one is killed while they stream. Each cut
    is resumed on the other from where it was cut (its images prefilled again, so their
    pixels must still be there) and ends in full: same answer as one never cut. The kill is
    timed from the clients' side (the streams' first content), not by asking the replicas:
    that call queued behind the streams and was answered after them, and the test skipped."""
    import ray

    # 600 tokens at 10 ms a step: each stream runs for seconds after its first content
    payloads = [body(images=1, seed=7, max_tokens=600) for _ in range(16)]
    resumed_before = resumes(metrics_url)

    async def run():
        started, streaming = 0, asyncio.Event()

        def first():
            nonlocal started
            started += 1
            if started == 6:  # several streams under way, on both replicas (Serve's router
                streaming.set()  # spreads them by queue length)

        load = asyncio.ensure_future(run_load(load_stack.url, payloads, 16, on_first=first))
        waiting = asyncio.ensure_future(streaming.wait())
        await asyncio.wait({load, waiting}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        assert streaming.is_set() and not load.done(), "no stream was seen under way"
        replicas = sorted((a["name"], a["namespace"])
                          for a in ray.util.list_named_actors(all_namespaces=True)
                          if f"{load_stack.app}#fast-decode#" in a["name"])
        assert len(replicas) == 2, replicas
        live = [name.rsplit("#", 1)[1] for name, _ in replicas]
        busiest = await asyncio.to_thread(busiest_decode, metrics_url, load_stack.app, live)
        victim = next((r for r in replicas if busiest and r[0].endswith(f"#{busiest}")),
                      replicas[0])
        ray.kill(ray.get_actor(*victim), no_restart=True)
        return await load

    outcomes = asyncio.run(run())
    assert all(o.ok and o.finish == "length" for o in outcomes), [
        o for o in outcomes if not o.ok][:2]
    assert len({o.content for o in outcomes}) == 1
    deadline = time.time() + 30  # the ingress's count reaches Ray's exporter within seconds
    while resumes(metrics_url) <= resumed_before and time.time() < deadline:
        time.sleep(1)
    if resumes(metrics_url) <= resumed_before:
        # Serve's router put every stream under way on the other replica (seen once in CI):
        # the answers were checked, but no resume was
        pytest.skip("the killed replica held no stream: nothing was resumed")


def busiest_decode(metrics_url: str, app: str, live: list[str],
                   within_s: float = 4.0) -> str | None:
    """Of the `live` decode replicas of the fast pool (Serve replica ids), the one with the
    most calls under way, as Serve's own gauge has them in Ray's exporter (a second or two
    behind; replicas gone before keep their last value there); None if none shows one in
    time. Serve's router, its queue-length cache stale at a burst's start, sent every stream
    to one replica in two CI runs: killing the other resumed nothing."""
    import re

    import httpx

    deadline = time.time() + within_s
    while True:
        counts: dict[str, float] = {}
        for line in httpx.get(metrics_url, timeout=10).text.splitlines():
            if (line.startswith("ray_serve_replica_processing_queries{")
                    and 'deployment="fast-decode"' in line and f'application="{app}"' in line):
                replica = re.search(r'replica="([^"]+)"', line)
                if replica and replica.group(1) in live:
                    counts[replica.group(1)] = float(re.split(r"\s+", line.strip())[-1])
        if counts and max(counts.values()) > 0:
            return max(counts, key=counts.get)
        if time.time() > deadline:
            return None
        time.sleep(0.25)


def resumes(metrics_url: str) -> float:
    """Streams the fast pool resumed, as Ray's exporter has them (every process summed)."""
    import re

    import httpx

    total = 0.0
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith("ray_small4_decode_resumes_total{") and 'pool="fast"' in line:
            total += float(re.split(r"\s+", line.strip())[-1])
    return total
