"""What the serving stack adds: TTFT over a direct engine call, and streamed tokens/s.

Deploys, on a local Ray, the stack with the simulated engine at zero compute (isolating the
stack's own cost) and with the reference engine, plus a simulated app without token coalescing
(one Ray message per token) as the in-run baseline for streaming throughput, and one whose
first leg's prefill is called by decode (`kv_handoff.ingress_prefill: false`, one more hop before
the first token). Then measures
(a) p50/p99 time to first token over HTTP minus the same engine's direct in-process TTFT,
(b) aggregate streamed tokens/s through the ingress to 1 and 16 concurrent clients, and
(c) the CPU milliseconds each deployment's replicas spend per request during (a), from /proc
(what sizes the ingress: its replicas' CPU, not the engines', bounds requests/s). The
baseline for (a) and (c) is a one-deployment Serve app streaming an SSE echo, measured the same
way in the same run, its requests alternating with each app's: the least any Serve HTTP
streaming path costs on this machine, under the same background load.

    .ci/loopback-only python bench/stack_overhead.py [--requests 40] [--tokens 512]

Targets: <= 15 ms p50 added TTFT (issue 3, 2-core machine); added TTFT p50 <= 1.5x the echo's
TTFT p50 (issue 19); >= 5,000 streamed tokens/s with coalescing. Prints JSON and a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")  # the profile's default
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # noqa: E402

from cluster.settings import parse_settings  # noqa: E402
from services.engines.protocol import EngineRequest, SamplingParams  # noqa: E402
from services.engines.registry import build_engine  # noqa: E402
from services.tokenizer import PromptTokenizer  # noqa: E402

MESSAGES = [{"role": "user", "content": "Count for me, please."}]
POOL = {"effort": "none", "max_queue": 64, "prefill": {"num_cpus": 0.05},
        "decode": {"num_cpus": 0.05, "max_ongoing_requests": 128}}
BASE = {"auth": {"enabled": False}, "model": {"context_length": 8192},
        "ingress": {"num_cpus": 0.05}, "multimodal": {"num_cpus": 0.05},
        "pools": {"fast": POOL, "deep": POOL | {"effort": "high"}}}
READY_TIMEOUT_S = 300.0
ZERO = {"kind": "simulated", "simulated": {"output": "counter"}}
APPS = {
    "sim": BASE | {"engine": ZERO},
    "sim_uncoalesced": BASE | {"engine": ZERO, "stream": {"interval_tokens": 1, "interval_ms": 0}},
    # the first leg's prefill called by decode, as before kv_handoff.ingress_prefill: the first
    # token takes one more Serve hop
    "sim_via_decode": BASE | {"engine": ZERO, "kv_handoff": {"ingress_prefill": False}},
    "ref": BASE,
}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def direct_ttft(profile: dict, n: int) -> list[float]:
    """TTFT of the engine called in-process: prefill, then the first token is known."""
    settings = parse_settings({"auth": {"enabled": False}} | profile)
    tokenizer = PromptTokenizer()
    engine = build_engine(settings.model, settings.engine, role="both", tokenizer=tokenizer)
    ids = tokenizer.encode_chat(MESSAGES, effort="none").ids
    out = []
    for i in range(n + 2):
        start = time.perf_counter()
        await engine.prefill(EngineRequest(f"d{i}", ids, SamplingParams(max_tokens=8)))
        out.append(time.perf_counter() - start)
    return out[2:]


async def http_stream(http: httpx.AsyncClient, url: str, max_tokens: int) -> tuple[float, int]:
    """(seconds to the first token event, completion tokens) of one streamed request."""
    body = {"model": "mistral-small-4", "messages": MESSAGES, "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start, ttft, tokens = time.perf_counter(), None, 0
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
        async for line in reply.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if ttft is None:
                ttft = time.perf_counter() - start
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return ttft, tokens


async def measure_ttft(app: str, url: str, n: int, echo_url: str
                       ) -> tuple[list[float], list[float], dict[str, float]]:
    """TTFTs of app `app` at `url` and of the echo, requests alternating between them, so both
    are measured under the same load from the rest of the machine (on 2 shared cores it drifts
    by tens of percent within a run); and the CPU milliseconds each of the app's deployments
    and the echo spent per request meanwhile (`replica_cpu`)."""
    async with httpx.AsyncClient(timeout=60) as http:
        for _ in range(3):
            await http_stream(http, url, 2)
            await http_stream(http, echo_url, 2)
        stack, echo = [], []
        before = replica_cpu(app) | replica_cpu("echo")
        for _ in range(n):
            stack.append((await http_stream(http, url, 2))[0])
            echo.append((await http_stream(http, echo_url, 2))[0])
        after = replica_cpu(app) | replica_cpu("echo")
        return stack, echo, {k: 1e3 * (after[k] - before[k]) / n for k in after if k in before}


def replica_cpu(app: str) -> dict[str, float]:
    """CPU seconds used so far by each replica process of `app`, by deployment (summed over its
    replicas), from /proc: Ray titles a replica's process `ray::ServeReplica:<app>:<deployment>`
    (then the method it runs). Empty where there is no /proc."""
    prefix, total = f"ray::ServeReplica:{app}:", {}
    tick = os.sysconf("SC_CLK_TCK")
    for pid in (p for p in (os.listdir("/proc") if os.path.isdir("/proc") else ()) if p.isdigit()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
            if not title.startswith(prefix):
                continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        deployment = title[len(prefix):].split(".")[0].split()[0]
        total[deployment] = total.get(deployment, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return total


async def measure_throughput(url: str, clients: int, tokens: int, streams: int = 16) -> float:
    """Streamed tokens/s to `clients` at once, over `streams` streams in all (rounds of
    `clients`: one stream of 512 tokens lasts tens of milliseconds, too short to measure
    alone), after two untimed streams (an app measured first, like the uncoalesced baseline,
    would count its first request's cold path)."""
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as http:
        for _ in range(2):
            await http_stream(http, url, tokens)
        start, total = time.perf_counter(), 0
        for _ in range(max(1, streams // clients)):
            results = await asyncio.gather(*(http_stream(http, url, tokens)
                                             for _ in range(clients)))
            total += sum(t for _, t in results)
        return total / (time.perf_counter() - start)


def echo_app():
    """One Serve deployment streaming a chat-chunk-shaped SSE answer: the baseline hop."""
    from fastapi import FastAPI
    from ray import serve
    from starlette.responses import StreamingResponse

    api = FastAPI()

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
    @serve.ingress(api)
    class Echo:
        @api.post("/v1/chat/completions")
        async def chat(self, body: dict):
            async def events():
                for i in range(int(body.get("max_tokens") or 1)):
                    yield f'data: {{"choices": [{{"delta": {{"content": "{i}"}}}}]}}\n\n'
                yield 'data: {"choices": [], "usage": {"completion_tokens": %d}}\n\n' % int(
                    body.get("max_tokens") or 1)
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")

        @api.get("/ready")
        async def ready(self):
            return {"ok": True}

    return Echo.bind()


def deploy(port: int, apps: dict[str, dict] = APPS, echo: bool = False) -> dict[str, str]:
    import ray
    from ray import serve

    from cluster.app import build_app, run_app

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
             logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    urls = {}
    for name, profile in apps.items():
        prefix = f"/{name}"
        run_app(build_app(profile), name, prefix, READY_TIMEOUT_S)
        urls[name] = f"http://127.0.0.1:{port}{prefix}"
    if echo:  # the baseline: one Serve deployment, the same HTTP path
        run_app(echo_app(), "echo", "/echo", READY_TIMEOUT_S)
        urls["echo"] = f"http://127.0.0.1:{port}/echo"
    deadline = time.monotonic() + READY_TIMEOUT_S
    for url in urls.values():
        while httpx.get(f"{url}/ready", timeout=10).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready within {READY_TIMEOUT_S:g} s")
            time.sleep(0.5)
    return urls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    urls = deploy(args.port, echo=True)
    report = {"bench": "stack_overhead", "requests": args.requests, "tokens": args.tokens,
              "ttft": {}, "throughput_tokens_per_s": {}, "cpu_ms_per_request": {}}
    for name in ("sim", "sim_via_decode", "ref"):
        direct = asyncio.run(direct_ttft(APPS[name], args.requests))
        stack, echo, report["cpu_ms_per_request"][name] = asyncio.run(
            measure_ttft(name, urls[name], args.requests, urls["echo"]))
        report["ttft"][name] = {
            "echo_p50_ms": 1e3 * statistics.median(echo),
            "direct_p50_ms": 1e3 * statistics.median(direct), "direct_p99_ms": 1e3 * pct(direct, .99),
            "stack_p50_ms": 1e3 * statistics.median(stack), "stack_p99_ms": 1e3 * pct(stack, .99),
            "added_p50_ms": 1e3 * (statistics.median(stack) - statistics.median(direct)),
            "added_p99_ms": 1e3 * (pct(stack, .99) - pct(direct, .99))}
    for name in ("sim", "sim_via_decode", "sim_uncoalesced"):
        report["throughput_tokens_per_s"][name] = {
            str(c): asyncio.run(measure_throughput(urls[name], c, args.tokens)) for c in (1, 16)}
    streamed = report["throughput_tokens_per_s"]
    report["coalescing_x"] = {c: streamed["sim"][c] / streamed["sim_uncoalesced"][c]
                              for c in streamed["sim"]}  # what coalescing buys, same run
    report["echo_ttft_p50_ms"] = report["ttft"]["sim"]["echo_p50_ms"]
    added = report["ttft"]["sim"]["added_p50_ms"]
    best = max(report["throughput_tokens_per_s"]["sim"].values())
    report["added_over_echo"] = added / report["echo_ttft_p50_ms"]
    report["targets"] = {"added_ttft_p50_le_15ms": added <= 15.0,
                         "added_ttft_p50_le_1.5x_echo": report["added_over_echo"] <= 1.5,
                         "streamed_ge_5000_tok_s": best >= 5000.0}
    print(json.dumps(report, indent=2))
    print(f"\n{'app':>14} | {'direct p50':>10} | {'stack p50':>9} | {'added p50':>9} | "
          f"{'added p99':>9} | {'echo p50':>8} | added/echo  (ms; echo requests alternate with "
          "the app's)")
    for name, row in report["ttft"].items():
        print(f"{name:>14} | {row['direct_p50_ms']:10.2f} | {row['stack_p50_ms']:9.2f} | "
              f"{row['added_p50_ms']:9.2f} | {row['added_p99_ms']:9.2f} | "
              f"{row['echo_p50_ms']:8.2f} | {row['added_p50_ms'] / row['echo_p50_ms']:.2f}x")
    print("\nCPU ms per request during the TTFT run, by deployment (the echo's replica beside "
          "it; Serve's proxy, which both pass, not counted; an idle replica's is its background)")
    for name, row in report["cpu_ms_per_request"].items():
        print(f"{name:>14} | " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(
            row.items(), key=lambda kv: -kv[1]) if k != "Echo" and v >= 0.05)
              + f" | echo {row.get('Echo', 0.0):.2f}")
    print(f"\n{'app':>16} | {'1 client':>9} | {'16 clients':>10}  (streamed tokens/s)")
    for name, row in report["throughput_tokens_per_s"].items():
        print(f"{name:>16} | {row['1']:9.0f} | {row['16']:10.0f}")
    print(f"{'coalescing buys':>16} | {report['coalescing_x']['1']:8.2f}x | "
          f"{report['coalescing_x']['16']:9.2f}x  (sim over sim_uncoalesced)")


if __name__ == "__main__":
    main()
