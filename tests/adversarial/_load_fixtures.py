"""The load tier's stack: the simulated engine behind Ray Serve, two replicas of each leg of the
`fast` pool, requests with and without images sent over HTTP at a fixed concurrency."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from collections import Counter
import time
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.e2e.conftest import SIM_PROFILE, undeploy, wait_ready

ROUTE = "/adv-load"
MAX_TOKENS = 16


def load_profile(**overrides) -> dict:
    """Two prefill and two decode replicas in `fast`, the multimodal deployment, no faults."""
    pool = {"max_queue": 256,
            "prefill": {"num_cpus": 0.05, "replicas": 2, "max_ongoing_requests": 256},
            "decode": {"num_cpus": 0.05, "replicas": 2, "max_ongoing_requests": 256}}
    return SIM_PROFILE | {
        "profile": "adversarial-load",
        "engine": {"kind": "simulated", "max_running_requests": 256,
                   "simulated": {"decode_step_ms": 10, "output": "counter"}},
        "pools": {"fast": {"effort": "none"} | pool,
                  "deep": {"effort": "high", "prefill": {"num_cpus": 0.05},
                           "decode": {"num_cpus": 0.05}}},
        "ingress": {"num_cpus": 0.05, "max_ongoing_requests": 512},
        "multimodal": {"num_cpus": 0.05, "max_ongoing_requests": 256},
    } | overrides


def png_url(size: tuple[int, int], seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def body(images: int = 0, seed: int = 0, max_tokens: int = MAX_TOKENS) -> dict:
    """A greedy streamed chat; with `images` PNGs of a few sizes beside its text."""
    parts = [{"type": "text", "text": "count"}] + [
        {"type": "image_url", "image_url": {"url": png_url((48 + 16 * i, 40), seed + i)}}
        for i in range(images)]
    return {"model": "mistral-small-4", "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "messages": [{"role": "user",
                                          "content": parts if images else "count"}]}


@dataclass
class Outcome:
    """One streamed request: HTTP status, finish reason, text, and the error body or event."""

    status: int
    finish: str | None
    content: str
    error: dict | None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.finish is not None and self.error is None


async def stream_one(client: httpx.AsyncClient, url: str, payload: dict,
                     on_first=None) -> Outcome:
    """One streamed request's outcome; `on_first()` is called when its first content came."""
    events, error = [], None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=payload) as response:
        if response.status_code != 200:
            return Outcome(response.status_code, None, "", json.loads(await response.aread()))
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
            elif event.get("choices"):
                events.append(event["choices"][0])
                if on_first is not None and events[-1]["delta"].get("content"):
                    on_first()
                    on_first = None
    finish = next((c["finish_reason"] for c in events if c.get("finish_reason")), None)
    return Outcome(200, finish, "".join(c["delta"].get("content") or "" for c in events), error)


async def run_load(url: str, payloads: list[dict], concurrency: int,
                   timeout_s: float = 150.0, on_first=None) -> list[Outcome]:
    """Send `payloads`, `concurrency` streams at a time; every request ends within the bound
    (`on_first()` called as each stream's first content arrives)."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def one(payload):
            async with gate:
                try:
                    return await stream_one(client, url, payload, on_first)
                except httpx.HTTPError as exc:
                    return Outcome(0, None, "", {"transport": repr(exc)})

        return await asyncio.wait_for(asyncio.gather(*[one(p) for p in payloads]), timeout_s)


@dataclass
class LoadStack:
    transport: str
    app: str
    url: str
    ask: Asker
    baseline_objects: Counter


class Asker:
    """Calls deployments' methods from the test driver on one loop thread (handles bind their
    router to one event loop)."""

    def __init__(self, app: str):
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def __call__(self, deployment: str, method: str, *args, timeout: float = 30.0):
        from ray import serve

        async def call():
            handle = serve.get_deployment_handle(deployment, app_name=self.app)
            return await getattr(handle, method).remote(*args)

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def deploy(profile: dict, name: str, route: str, transport: str) -> None:
    """The e2e tier's deploy (a deadline; deleted if it does not start) with the handles between
    deployments on one of Serve's two transports: `actor` (Ray actor calls; what a driver that
    imported Serve before setting RAY_SERVE_THROUGHPUT_OPTIMIZED gets) or `grpc` (the
    throughput-optimized default). The handles take the option when the app is built, in this
    process (the patched module attribute holds in the deploy's thread too)."""
    import ray.serve.handle
    from ray.serve._private.handle_options import DynamicHandleOptions

    from tests.e2e import conftest as e2e

    def options(**kwargs):
        return DynamicHandleOptions(**({"_by_reference": transport == "actor"} | kwargs))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray.serve.handle, "create_dynamic_handle_options", options)
        e2e.deploy(profile, name, route)


@pytest.fixture(scope="module", params=["actor", "grpc"])
def load_stack(request, serve_url):
    """The load app on each of Serve's transports, deployed once per module and transport,
    warmed up, with the objects Ray's workers held before any load."""
    name = f"adv-load-{request.param}"
    deploy(load_profile(), name, f"{ROUTE}-{request.param}", request.param)
    asker = None
    try:
        url = f"{serve_url}{ROUTE}-{request.param}"
        wait_ready(url)
        asker = Asker(name)
        warm = asyncio.run(run_load(url, [body(), body(images=1)] * 2, 4))
        assert all(o.ok for o in warm), warm
        yield LoadStack(request.param, name, url, asker, stored_objects(name))
    finally:
        if asker is not None:
            asker.close()
        undeploy(name)


def stored_objects(app: str) -> Counter:
    """Objects with a value that the replicas of `app` refer to, by deployment."""
    import ray
    from ray._private.internal_api import node_stats

    deployments = {a["Pid"]: a["Name"].split("#")[1] for a in ray._private.state.actors().values()
                   if a.get("State") == "ALIVE" and (a.get("Name") or "").startswith(
                       f"SERVE_REPLICA::{app}#")}
    held: Counter = Counter()
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        stats = node_stats(node["NodeManagerAddress"], node["NodeManagerPort"])
        for worker in stats.core_workers_stats:
            if worker.pid in deployments:
                held[deployments[worker.pid]] += sum(1 for ref in worker.object_refs
                                                     if ref.object_size > 0)
    return held


def settle(check, timeout_s: float = 20.0, every_s: float = 0.25):
    """Poll `check()` until it returns a falsy value (nothing wrong) or the time runs out;
    return the last value (what is still wrong)."""
    deadline = time.time() + timeout_s
    while True:
        wrong = check()
        if not wrong or time.time() > deadline:
            return wrong
        time.sleep(every_s)
