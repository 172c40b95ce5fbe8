"""What routing by prefix buys: multi-turn conversations and agent sessions on the reference
engine, one pool with several prefill replicas, the same trace through three prefill routers.

Sessions of several apps: each app has its own long system prompt (agent apps also their own tool
list, a few thousand tokens together), shared by its sessions; chat turns add short messages,
agent turns tool results, 4-8 turns each (every turn resends the whole session), sessions arriving
staggered and interleaved. With enough apps and replicas a blind router seldom finds a session's
own history where it sends the next turn (about 1/N of the time at N replicas). Per router:
Serve's default (power of two choices), Ray's `PrefixCacheAffinityRouter` (reading the prompt as
one character per token), ours (`cache_aware`). Reported per router: cached-token ratio (usage's
`prompt_tokens_details.cached_tokens` over prompt tokens), prefill tokens computed, TTFT p50/p90
by turn, requests per prefill replica (from the prefill spans, sent to a local OTLP sink); and the
ratio a single replica holding every conversation would get (the same trace through one
unbounded prefix cache), the ceiling the routers are measured against.

    .ci/loopback-only python bench/prefix_routing.py [--conversations 16] [--families 8]
        [--replicas 4] [--ingress-replicas 2] [--engine reference|simulated]
        [--prefill-ms-per-token 0.15]
        [--prefix '{"recompute_weight": 4, "load_blocks": 0}']

Two ingress replicas by default, as in production: each routes the first legs it prefills, so
a session's turns reach the prefill pool through different routers (Serve's proxy picks the
ingress replica), as they do there. The reference engine's replicas share this machine's two
cores, so spreading load buys them no compute; `--engine simulated` gives each replica its own
prefill time (a sleep per uncached token, one prefill at a time), as separate GPUs have.
`--capacity-tokens` sets each replica's prefix cache: below the trace's distinct prompt tokens
(coding agents' long sessions outgrow one engine's KV), where sessions are placed decides what
is evicted, and no router can reach the single-replica ratio. `--prefix` sets cache_aware's
`routing.prefix` settings.

A hot prefix: `--families 2` (a chat app and an agent app, eight sessions each on one system
prompt, as a fleet of coding agents on one product's prompt) with `--capacity-tokens 16384`.
Ray's router sends every session of an app to the replica that holds the app's prompt (its
`imbalanced_threshold` is unbounded by default), so two of four replicas serve everything and
evict each other's sessions; ours spreads the sessions and pays one prompt's prefill per replica.

Targets (issue 16): ours >= 90 % of the single-replica ratio; requests max/min across replicas
<= 1.5; TTFT p50 from turn 3 on at least 2x better than Serve's default; ahead of Ray's router on
cached-token ratio and on TTFT p90. Prints JSON and a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
# Clients reach the ingress through Serve's proxy, not a load balancer that must deregister its
# replicas: an app deleted between routers need not stay up for Serve's 30 s draining floor.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # noqa: E402

from services.engines.prefix_cache import PrefixCache  # noqa: E402
from services.tokenizer import PromptTokenizer  # noqa: E402

ROUTERS = ("serve_default", "ray_prefix_affinity", "cache_aware")
READY_TIMEOUT_S = 300.0
SPANS_TIMEOUT_S = 30.0  # for every request's prefill span to reach the sink
BLOCK = 64
CAPACITY = 262144  # each prefill replica's prefix cache (engine.kv_capacity_tokens' default)


WORDS = ("the a to of and in on for with by from as at is are be was were this that these "
         "those it its file files code test tests build run check write read change keep "
         "always never only when where which what who how why before after then else if "
         "not no yes all any each every some more most less few many user users request "
         "answer reply tool tools call result results error errors value values name names "
         "path paths line lines list lists item items step steps task tasks plan plans "
         "note notes rule rules format output input data table row rows field fields type "
         "types model models server service services client clients cache key keys time "
         "times date dates number numbers text word words page pages one two three four "
         "five first last next new old good bad small large long short fast slow safe clear "
         "simple careful exact brief full empty open close start stop send receive save load "
         "find search sort merge split join copy move delete create update use make give "
         "take show tell ask help explain describe summarise compare review fix report").split()


def prose(rng: random.Random, words: int) -> str:
    """English-like text of about `words` tokens (the stand-in tokenizer reads a common word
    as one token)."""
    return " ".join(rng.choice(WORDS) for _ in range(words))


def system_prompt(family: int, words: int) -> str:
    rng = random.Random(f"system-{family}")
    return f"You are the assistant of app {family}. " + prose(rng, words)


def tools_of(family: int) -> list[dict]:
    """An agent app's tool list: its own names and descriptions, about a thousand tokens."""
    rng = random.Random(f"tools-{family}")
    return [{"type": "function", "function": {
        "name": f"app{family}_tool_{i}", "description": prose(rng, 50),
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string", "description": prose(rng, 8)},
            "mode": {"type": "string", "enum": ["read", "write", "check"]}},
            "required": ["path"]}}} for i in range(12)]


def profile(router: str, replicas: int, endpoint: str, engine: str = "reference",
            prefill_ms_per_token: float = 0.15, prefix: dict | None = None,
            ingress_replicas: int = 2, capacity: int = CAPACITY) -> dict:
    pool = {"effort": "none", "max_queue": 64,
            "prefill": {"replicas": replicas, "num_cpus": 0.1},
            "decode": {"num_cpus": 0.1, "max_ongoing_requests": 128}}
    return {"auth": {"enabled": False}, "model": {"context_length": 32768},
            "engine": {"kind": engine, "prefill_chunk_tokens": 512,
                       "kv_capacity_tokens": capacity,
                       "simulated": {"prefill_ms_per_token": prefill_ms_per_token}},
            "ingress": {"replicas": ingress_replicas, "num_cpus": 0.1},
            "multimodal": {"num_cpus": 0.1},
            "pools": {"fast": pool},
            "routing": {"effort_map": {"none": "none"}, "default_effort": "none",
                        "spillover": False, "prefix": {"router": router} | (prefix or {})},
            "telemetry": {"tracing": {"enabled": True, "endpoint": endpoint,
                                      "sampling_ratio": 1.0, "export_interval_ms": 200}}}


# ---- the trace --------------------------------------------------------------------------

def conversations(n: int, families: int, words: int, seed: int) -> list[dict]:
    """`n` sessions over `families` apps, each app with its own long system prompt (agent apps,
    the odd ones, also their own tool list), so each prompt is shared by n/families sessions.
    Chat turns add a short user message; agent turns a tool result (a file's worth of lines),
    so a session's own history soon outweighs its app's prefix, as coding agents' do. Sessions
    start staggered over the first seconds and think between turns: they interleave."""
    rng = random.Random(seed)
    out = []
    for c in range(n):
        family = c % families
        agent = family % 2 == 1
        size = int(words * rng.uniform(0.75, 1.25))
        out.append({"id": c, "family": family, "system": system_prompt(family, size),
                    "tools": tools_of(family) if agent else None, "turns": rng.randint(4, 8),
                    "start_s": rng.uniform(0.0, 0.5 * n),
                    "think_s": [rng.uniform(0.2, 1.0) for _ in range(8)],
                    "users": [user_turn(rng, c, t, agent) for t in range(8)]})
    return out


def user_turn(rng: random.Random, c: int, t: int, agent: bool) -> str:
    if agent:  # what the last tool call returned: a file's worth of lines
        return f"tool result {t} of session {c}:\n" + "\n".join(
            f"{i} " + prose(rng, rng.randint(6, 14)) for i in range(rng.randint(15, 35)))
    return f"step {t} of chat {c}: " + prose(rng, rng.randint(40, 120))


# ---- spans: which prefill replica served each request ------------------------------------

class SpanSink:
    """A real OTLP/HTTP receiver on loopback that keeps the prefill spans' process ids."""

    def __init__(self):
        self.prefills: list[dict] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                sink.ingest(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ingest(self, body: bytes) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest)

        for resource in ExportTraceServiceRequest.FromString(body).resource_spans:
            attrs = {a.key: a.value for a in resource.resource.attributes}
            pid = attrs["process.pid"].int_value if "process.pid" in attrs else -1
            for scope in resource.scope_spans:
                for span in scope.spans:
                    if span.name == "prefill":
                        self.prefills.append({"pid": pid, "trace": span.trace_id.hex()})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- one router's run -------------------------------------------------------------------

async def one_turn(http: httpx.AsyncClient, url: str, convo: dict, messages: list[dict]):
    body = {"model": "mistral-small-4", "messages": messages, "max_tokens": 8,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if convo["tools"]:
        body["tools"] = convo["tools"]
    start, ttft, text, usage, trace = time.perf_counter(), None, "", {}, None
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
        reply.raise_for_status()
        trace = reply.headers.get("x-trace-id")
        async for line in reply.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if ttft is None and event.get("choices"):
                ttft = time.perf_counter() - start
            for choice in event.get("choices", ()):
                text += choice.get("delta", {}).get("content") or ""
            usage = event.get("usage") or usage
    return ttft, text, usage, trace


async def run_trace(url: str, convos: list[dict], tokenizer: PromptTokenizer,
                    order: list) -> list[dict]:
    rows: list[dict] = []

    async def session(convo: dict):
        messages = [{"role": "system", "content": convo["system"]}]
        await asyncio.sleep(convo["start_s"])
        for turn in range(convo["turns"]):
            await asyncio.sleep(convo["think_s"][turn])
            messages.append({"role": "user", "content": convo["users"][turn]})
            order.append(tokenizer.encode_chat(messages, effort="none",
                                               tools=convo["tools"]).ids)
            ttft, text, usage, trace = await one_turn(http, url, convo, messages)
            details = usage.get("prompt_tokens_details") or {}
            rows.append({"conversation": convo["id"], "turn": turn + 1, "ttft_s": ttft,
                         "prompt_tokens": usage.get("prompt_tokens", 0),
                         "cached_tokens": details.get("cached_tokens", 0), "trace": trace})
            messages.append({"role": "assistant", "content": text or "ok"})

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as http:
        await asyncio.gather(*(session(c) for c in convos))
    return rows


def ideal_ratio(order: list[list[int]]) -> float:
    """Cached-token ratio of one replica holding every conversation: the trace, in the order it
    was sent, through one unbounded prefix cache."""
    cache, cached, total = PrefixCache(BLOCK, 1 << 40), 0, 0
    for ids in order:
        hit = cache.acquire(ids, "", limit=len(ids) - 1)
        cache.release(hit)
        cached, total = cached + hit.tokens, total + len(ids)
        cache.insert(ids, "", None, lambda i: None)
    return cached / max(1, total)


def distinct_tokens(order: list[list[int]]) -> int:
    """Prompt KV the whole trace needs held at once (its distinct full blocks): below a
    replica's cache capacity (the default), eviction never limits what a router can hit."""
    cache = PrefixCache(BLOCK, 1 << 40)
    return BLOCK * len({key for ids in order for _, key in cache.chain(ids, "")})


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else 0.0


def summarise(rows: list[dict], replicas: Counter, ideal: float, deployed: int) -> dict:
    """`replicas`: prefill requests per replica that served any; `deployed` replicas in all (one
    left idle counts as 0, and max/min is then infinite)."""
    prompt = sum(r["prompt_tokens"] for r in rows)
    cached = sum(r["cached_tokens"] for r in rows)
    by_turn = defaultdict(list)
    for r in rows:
        by_turn[r["turn"]].append(r["ttft_s"])
    late = [r["ttft_s"] for r in rows if r["turn"] >= 3]
    counts = sorted(list(replicas.values()) + [0] * max(0, deployed - len(replicas)))
    return {"requests": len(rows), "prompt_tokens": prompt, "cached_tokens": cached,
            "cached_ratio": cached / max(1, prompt), "of_single_replica": cached / max(1, prompt)
            / max(ideal, 1e-9), "prefill_tokens_computed": prompt - cached,
            "ttft_ms_by_turn": {t: {"p50": 1e3 * statistics.median(v), "p90": 1e3 * pct(v, .9)}
                                for t, v in sorted(by_turn.items())},
            "ttft_p50_ms_turn3plus": 1e3 * statistics.median(late) if late else 0.0,
            "ttft_p90_ms": 1e3 * pct([r["ttft_s"] for r in rows], .9),
            "requests_per_replica": counts,
            "load_max_over_min": counts[-1] / counts[0] if len(counts) > 1 and counts[0] else
            float("inf") if len(counts) > 1 else 1.0}


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready within {READY_TIMEOUT_S:g} s")
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--families", type=int, default=0,
                        help="apps, each with its own system prompt (and tools); default: "
                        "one per two sessions")
    parser.add_argument("--system-words", type=int, default=1500, help="about a token each")
    parser.add_argument("--replicas", type=int, default=4, help="prefill replicas")
    parser.add_argument("--ingress-replicas", type=int, default=2,
                        help="as in production (h200x16): each routes the first legs it "
                        "prefills, so a session's turns reach the prefill pool through "
                        "different routers")
    parser.add_argument("--capacity-tokens", type=int, default=CAPACITY,
                        help="each prefill replica's prefix cache; below the trace's distinct "
                        "prompt tokens, where sessions are placed decides what is evicted")
    parser.add_argument("--routers", nargs="+", default=list(ROUTERS), choices=ROUTERS)
    parser.add_argument("--engine", choices=("reference", "simulated"), default="reference",
                        help="simulated: each replica's prefill time is its own (a sleep per "
                        "uncached token, one prefill at a time), as on GPUs; the reference "
                        "engine's replicas share this machine's cores")
    parser.add_argument("--prefill-ms-per-token", type=float, default=0.15,
                        help="the simulated engine's prefill time per uncached token")
    parser.add_argument("--prefix", type=json.loads, default={},
                        help='cache_aware\'s routing.prefix settings, as JSON '
                        '(e.g. \'{"recompute_weight": 2}\')')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8767)
    args = parser.parse_args()

    import logging

    import ray
    from ray import serve

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise

    from cluster.app import build_app, delete_app, run_app

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
             logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    sink, tokenizer = SpanSink(), PromptTokenizer()
    families = args.families or max(1, args.conversations // 2)
    convos = conversations(args.conversations, families, args.system_words, args.seed)
    report = {"bench": "prefix_routing", "engine": args.engine,
              "conversations": args.conversations,
              "families": families, "prefill_replicas": args.replicas,
              "ingress_replicas": args.ingress_replicas, "block_tokens": BLOCK,
              "replica_cache_capacity_tokens": args.capacity_tokens, "routers": {}}
    try:
        for router in args.routers:
            url = f"http://127.0.0.1:{args.port}/{router}"
            run_app(build_app(profile(router, args.replicas, sink.endpoint, args.engine,
                                      args.prefill_ms_per_token,
                                      args.prefix if router == "cache_aware" else None,
                                      args.ingress_replicas, args.capacity_tokens)),
                    router, f"/{router}", READY_TIMEOUT_S)
            wait_ready(url)
            order: list = []
            rows = asyncio.run(run_trace(url, convos, tokenizer, order))
            traces = {r["trace"] for r in rows}
            # the replicas' span exporters flush every 200 ms: every request's prefill span
            # is waited for (a share of them would make the per-replica load up)
            deadline = time.monotonic() + SPANS_TIMEOUT_S
            while True:
                per_replica = Counter(s["pid"] for s in sink.prefills if s["trace"] in traces)
                if sum(per_replica.values()) >= len(rows) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            report["ideal_cached_ratio"] = ideal_ratio(order)
            report["distinct_prompt_tokens"] = distinct_tokens(order)
            report["routers"][router] = summarise(rows, per_replica,
                                                  report["ideal_cached_ratio"], args.replicas)
            report["routers"][router]["prefill_spans_missing"] = max(
                0, len(rows) - sum(per_replica.values()))
            assert delete_app(router, 150), f"app {router} not deleted in 150 s"
    finally:
        sink.close()
        serve.shutdown()
        ray.shutdown()
    report["targets"] = targets(report)
    print(json.dumps(report, indent=2))
    table(report)


def targets(report: dict) -> dict:
    r = report["routers"]
    if "cache_aware" not in r:
        return {}
    ours = r["cache_aware"]
    out = {"cached_ratio_ge_90pct_of_single_replica": ours["of_single_replica"] >= 0.9,
           "load_max_over_min_le_1_5": ours["load_max_over_min"] <= 1.5}
    if "serve_default" in r:
        out["ttft_p50_turn3plus_2x_better_than_serve_default"] = (
            2 * ours["ttft_p50_ms_turn3plus"] <= r["serve_default"]["ttft_p50_ms_turn3plus"])
    if "ray_prefix_affinity" in r:
        ray_own = r["ray_prefix_affinity"]
        out["ahead_of_ray_on_cached_ratio"] = ours["cached_ratio"] > ray_own["cached_ratio"]
        out["ahead_of_ray_on_ttft_p90"] = ours["ttft_p90_ms"] < ray_own["ttft_p90_ms"]
    return out


def table(report: dict) -> None:
    print(f"\n{report['engine']} engine, {report['conversations']} sessions over "
          f"{report['families']} apps, "
          f"{report['prefill_replicas']} prefill replicas; distinct prompt tokens "
          f"{report.get('distinct_prompt_tokens', 0)} (cache per replica "
          f"{report['replica_cache_capacity_tokens']})")
    print(f"single replica holding every conversation: cached ratio "
          f"{report['ideal_cached_ratio']:.3f}")
    print(f"{'router':>20} | {'cached':>6} | {'of ideal':>8} | {'computed':>8} | "
          f"{'p50 t>=3':>8} | {'p90':>7} | {'max/min':>7} | per replica")
    for name, row in report["routers"].items():
        print(f"{name:>20} | {row['cached_ratio']:6.3f} | {row['of_single_replica']:8.2f} | "
              f"{row['prefill_tokens_computed']:8d} | {row['ttft_p50_ms_turn3plus']:8.1f} | "
              f"{row['ttft_p90_ms']:7.1f} | {row['load_max_over_min']:7.2f} | "
              f"{row['requests_per_replica']}")
    print(f"\n{'router':>20} | TTFT p50/p90 ms by turn")
    for name, row in report["routers"].items():
        turns = "  ".join(f"t{t}: {v['p50']:.0f}/{v['p90']:.0f}"
                          for t, v in row["ttft_ms_by_turn"].items())
        print(f"{name:>20} | {turns}")
    print("\ntargets:", json.dumps(report.get("targets", {})))


if __name__ == "__main__":
    main()
