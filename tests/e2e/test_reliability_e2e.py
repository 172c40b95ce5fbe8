"""Keys, quotas, limits and faults on local Ray: an app with API keys, per-key quotas, engine
faults injected through settings (every 5th prefill fails, every 7th decode stream breaks after
8 tokens), two decode replicas, and a bounded load test that kills one decode replica mid-run.
Greedy `counter` output is the same for every request, so a resumed stream is checked
token-for-token against the uninterrupted answer."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time

import httpx
import pytest

from tests.e2e.conftest import SIM_PROFILE, deploy, deployed, undeploy, wait_ready
from tests.keyfiles import write_keys

pytestmark = pytest.mark.ray

KEYS = {"sk-good": {"name": "search", "tenant": "search"},
        "sk-tight": {"name": "batch", "tenant": "batch",
                     "quota": {"max_concurrent_streams": 1, "requests_per_s": 1}},
        "sk-revoked": {"name": "old", "tenant": "old", "revoked": True}}
MAX_TOKENS = 24
BODY = {"model": "mistral-small-4", "messages": [{"role": "user", "content": "count"}],
        "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}


def guard_profile(keys_file) -> dict:
    pool = {"max_queue": 256, "prefill": {"num_cpus": 0.05, "replicas": 2},
            "decode": {"num_cpus": 0.05, "replicas": 2, "max_ongoing_requests": 256}}
    return SIM_PROFILE | {
        "profile": "reliability-e2e",
        "auth": {"enabled": True, "keys_file": str(keys_file), "reload_s": 0.5},
        "model": {"context_length": 16384},
        "engine": {"kind": "simulated", "max_running_requests": 256,
                   # a 12k-token prompt takes 6 s to prefill: long enough to find it running
                   # (a stats call reaches a random replica) and kill it midway (every time:
                   # these tests resend it, so no prefix cache)
                   "prefix_cache": {"enabled": False},
                   "simulated": {"decode_step_ms": 20, "output": "counter",
                                 "prefill_ms_per_token": 0.5},
                   "faults": {"prefill_fail_every": 5, "decode_fail_every": 7,
                              "decode_fail_after_tokens": 8}},
        "pools": {"fast": {"effort": "none"} | pool,
                  "deep": {"effort": "high", "prefill": {"num_cpus": 0.05},
                           "decode": {"num_cpus": 0.05}}},
        "ingress": {"num_cpus": 0.05, "max_ongoing_requests": 512},
        "multimodal": {"num_cpus": 0.05},
        "limits": {"max_body_bytes": 200_000, "max_json_depth": 16},
    }


@pytest.fixture(scope="module")
def guard(stack, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "keys.yaml"
    write_keys(keys_file, KEYS)
    with deployed(guard_profile(keys_file), "guard", stack["ref"]) as url:
        yield url, keys_file


def auth(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def content_of(events: list[dict]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if e.get("choices"))


async def stream_one(client: httpx.AsyncClient, url: str, key: str = "sk-good",
                     body: dict = BODY) -> tuple:
    """(status, finish_reason, content, error) of one streamed request."""
    events, error = [], None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body,
                             headers=auth(key)) as response:
        if response.status_code != 200:
            return response.status_code, None, "", json.loads(await response.aread())
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
            else:
                events.append(event)
    finish = next((e["choices"][0]["finish_reason"] for e in events
                   if e.get("choices") and e["choices"][0].get("finish_reason")), None)
    return 200, finish, content_of(events), error


def reference_answer(guard_url: str) -> str:
    """The uninterrupted answer: a request whose stream no fault touched (no resume)."""
    body = BODY | {"stream": False}
    for _ in range(20):
        reply = httpx.post(f"{guard_url}/v1/chat/completions", json=body,
                           headers=auth("sk-good"), timeout=60)
        if reply.status_code == 200:
            return reply.json()["choices"][0]["message"]["content"]
    raise AssertionError(reply.text)


def test_keys_wrong_missing_and_revoked_get_401_and_leak_nothing(guard):
    url, _ = guard
    for headers in ({}, auth("sk-wrong"), auth("sk-revoked"), {"authorization": "Basic eA=="}):
        reply = httpx.post(f"{url}/v1/chat/completions", json=BODY, headers=headers, timeout=30)
        assert reply.status_code == 401, headers
        error = reply.json()["error"]
        assert error["type"] == "authentication_error"
        assert "sk-" not in reply.text and "search" not in reply.text
    assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401
    assert httpx.get(f"{url}/v1/models", headers=auth("sk-good"), timeout=30).status_code == 200
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    assert httpx.get(f"{url}/ready", timeout=30).status_code == 200


def test_keys_reload_without_restart(guard):
    url, keys_file = guard
    write_keys(keys_file, KEYS | {"sk-new": {"name": "new", "tenant": "new"}})
    body = BODY | {"stream": False}
    deadline = time.time() + 30
    while time.time() < deadline:
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth("sk-new"),
                           timeout=60)
        if reply.status_code == 200:
            break
        time.sleep(0.5)
    assert reply.status_code == 200
    write_keys(keys_file, KEYS)  # revoked again by removal


def test_quota_answers_429_with_retry_after(guard):
    url, _ = guard

    async def one(client):
        async with client.stream("POST", f"{url}/v1/chat/completions", json=BODY,
                                 headers=auth("sk-tight")) as response:
            return response.status_code, response.headers, await response.aread()

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*[one(client) for _ in range(4)])

    results = asyncio.run(burst())
    limited = [r for r in results if r[0] == 429]
    assert limited and any(r[0] == 200 for r in results)
    status, headers, body = limited[0]
    assert json.loads(body)["error"]["type"] == "rate_limit_error"
    assert int(headers["retry-after"]) >= 1


@pytest.mark.parametrize("body, headers, status, needle", [
    (b"{" * 40 + b"}" * 40, {}, 400, "nests deeper"),
    (b'{"model": "' + b"x" * 300_000 + b'"}', {}, 413, "bytes"),
    (json.dumps(BODY).encode(), {"x-request-timeout": "soon"}, 400, "x-request-timeout"),
])
def test_limits_are_checked_before_parsing(guard, body, headers, status, needle):
    url, _ = guard
    reply = httpx.post(f"{url}/v1/chat/completions", content=body,
                       headers=auth("sk-good") | {"content-type": "application/json"} | headers,
                       timeout=30)
    assert reply.status_code == status and needle in reply.json()["error"]["message"]


def test_deadline_ends_a_long_request_with_504(guard):
    url, _ = guard
    body = BODY | {"stream": False, "max_tokens": 400}  # ~8 s at 20 ms a step
    reply = httpx.post(f"{url}/v1/chat/completions", json=body,
                       headers=auth("sk-good") | {"x-request-timeout": "1"}, timeout=60)
    assert reply.status_code == 504 and reply.json()["error"]["code"] == "deadline_exceeded"


def test_a_prefill_replica_killed_mid_prefill_is_retried_on_another(guard, ask):
    """The replica running a long prefill is killed; the request is prefilled again on the
    other one and answers exactly what an undisturbed run answers; nothing is held after."""
    import ray

    url, _ = guard
    body = BODY | {"stream": False, "messages": [{"role": "user", "content": "count " * 12000}]}

    def ask_once() -> httpx.Response:
        return httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth("sk-good"),
                          timeout=120)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        killed = pool.submit(ask_once)
        deadline = time.time() + 30
        while time.time() < deadline and not killed.done():
            # a call reaches either replica: ask two at once until one is busy
            polls = [pool.submit(ask, "guard", "fast-prefill", "replica_stats")
                     for _ in range(2)]
            busy = [name for name, stats in (p.result() for p in polls) if stats.running]
            if busy:
                ray.kill(ray.get_actor(busy[0], namespace="serve"), no_restart=True)
                break
        else:
            outcome = killed.result().text[:300] if killed.done() else "still running"
            raise AssertionError(f"no prefill replica was seen running the long prompt "
                                 f"(the request: {outcome})")
        reply = killed.result(timeout=120)
    assert reply.status_code == 200, reply.text
    undisturbed = ask_once()
    assert undisturbed.status_code == 200, undisturbed.text
    assert (reply.json()["choices"][0]["message"]["content"]
            == undisturbed.json()["choices"][0]["message"]["content"])
    for _ in range(6):
        _, stats = ask("guard", "fast-prefill", "replica_stats")
        assert (stats.running, stats.waiting) == (0, 0)
        decode = ask("guard", "fast-decode", "stats")
        assert decode.kv_tokens == 0 and decode.running == 0


def test_a_client_gone_during_prefill_stops_the_prefill(guard, ask):
    """The client disconnects while its 6 s prefill runs: the prefill stops on the replica
    running it (Serve carries the cancellation across), well before it would have ended."""
    url, _ = guard
    body = BODY | {"messages": [{"role": "user", "content": "count " * 12000}]}

    def busy() -> list:
        return [s for _, s in (ask("guard", "fast-prefill", "replica_stats") for _ in range(6))
                if s.running]

    async def leave_during_prefill() -> float:
        async with httpx.AsyncClient(timeout=60) as client:
            request = asyncio.ensure_future(client.post(
                f"{url}/v1/chat/completions", json=body, headers=auth("sk-good")))
            deadline = time.time() + 10
            while not await asyncio.to_thread(busy) and time.time() < deadline:
                await asyncio.sleep(0.05)
            assert not request.done(), "the long prefill never showed as running"
            request.cancel()  # the connection closes: the client is gone
            return time.time()

    gone = asyncio.run(leave_during_prefill())
    while True:  # a poll is six Serve calls: timed from when it began, not when it ended
        polled = time.time()
        if not busy() or polled > gone + 10:
            break
        time.sleep(0.05)
    assert polled - gone < 4.0, "the prefill ran on after the client left (it takes 6 s)"
    decode = ask("guard", "fast-decode", "stats")
    assert decode.kv_tokens == 0 and decode.running == 0


def test_load_with_faults_and_a_killed_decode_replica(guard, stack, ask):
    """400 requests, 200 at a time; one decode replica killed mid-run. Every request completes
    with the full greedy answer or ends in a clean error event; none hangs; KV returns to 0."""
    import ray

    url, _ = guard
    reference = reference_answer(url)
    total, concurrent = 400, 200
    done: list[tuple] = []

    async def run():
        limits = httpx.Limits(max_connections=concurrent + 8)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            gate = asyncio.Semaphore(concurrent)

            async def one():
                async with gate:
                    done.append(await stream_one(client, url))

            async def killer():
                while len(done) < 60:
                    await asyncio.sleep(0.05)
                name = await asyncio.to_thread(ask, "guard", "fast-decode", "replica_name")
                ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)

            await asyncio.wait_for(asyncio.gather(killer(), *[one() for _ in range(total)]),
                                   timeout=300)

    started = time.time()
    asyncio.run(run())
    full = [r for r in done if r[:3] == (200, "length", reference)]
    # A clean error: an OpenAI error body (before the stream) or error event (during it).
    clean_errors = [r for r in done if r[3] is not None
                    and (r[3].get("error") or r[3]).get("type")]
    wrong = [r for r in done if r not in full and r not in clean_errors]
    print(json.dumps({"requests": len(done), "full": len(full), "error_events":
                      len(clean_errors), "wrong": len(wrong),
                      "wall_s": round(time.time() - started, 1)}))
    assert len(done) == total
    assert not wrong, wrong[:3]
    assert len(full) >= total * 0.95, clean_errors[:3]
    for _ in range(6):  # whichever replicas answer: nothing held
        stats = ask("guard", "fast-decode", "stats")
        assert stats.kv_tokens == 0 and stats.running == 0


def drain_profile(decode_replicas: int) -> dict:
    """No faults and no resumes: a stream cut by a leaving replica would end in an error."""
    pool = {"max_queue": 64, "prefill": {"num_cpus": 0.05},
            "decode": {"num_cpus": 0.05, "replicas": decode_replicas, "drain_deadline_s": 30}}
    return SIM_PROFILE | {
        "profile": "drain-e2e",
        "engine": {"kind": "simulated", "simulated": {"decode_step_ms": 50, "output": "counter"}},
        "limits": {"max_resumes": 0},
        "pools": {"fast": {"effort": "none"} | pool, "deep": {"effort": "high"} | pool},
        "ingress": {"num_cpus": 0.05},
        "multimodal": {"num_cpus": 0.05},
    }


def test_scale_down_drains_in_flight_streams(stack):
    """Streams in flight on two decode replicas; the app is redeployed with one. The leaving
    replica stops taking requests and finishes its streams: every one ends in full."""
    from ray import serve

    from cluster.app import build_app, run_app

    deploy(drain_profile(2), "drain", "/drain")
    url = stack["ref"] + "/drain"
    body = BODY | {"max_tokens": 80}  # 4 s at 50 ms a step

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            streams = [asyncio.ensure_future(stream_one(client, url, body=body))
                       for _ in range(8)]
            await asyncio.sleep(1.0)
            # bounded (`run_app`): Serve's run waits for ever for replicas it cannot place
            await asyncio.to_thread(run_app, build_app(drain_profile(1)), "drain", "/drain",
                                    240)
            return await asyncio.gather(*streams)

    try:
        wait_ready(url)
        results = asyncio.run(run())
        assert [r[:2] for r in results] == [(200, "length")] * 8, results
        assert len({r[2] for r in results}) == 1 and not any(r[3] for r in results)
        deadline = time.time() + 15
        while time.time() < deadline:  # the leaving replica is gone once its streams ended
            app = serve.status().applications["drain"]
            replicas = app.deployments["fast-decode"].replica_states
            if replicas == {"RUNNING": 1}:
                break
            time.sleep(0.5)
        assert replicas == {"RUNNING": 1}, replicas
    finally:
        undeploy("drain")
