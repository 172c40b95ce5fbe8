"""Load on the whole serving stack with guidellm: concurrency runs and a rate sweep over HTTP.

Starts the stack on a local Ray (loopback only, auth off) with the simulated engine at zero
compute by default, so the figures are the serving stack's own (ingress, routing, prefill and
decode hops, streaming); `--engine reference` serves the stand-in model instead; `--url` loads a
stack that is already running. guidellm (vLLM project's load generator) drives it with
synthetic prompts of `--prompt-tokens`, asking for `--output-tokens`, counted with our own
stand-in `tekken.json` (a local tokenizer directory: nothing is fetched from Hugging Face), in two
modes: fixed concurrency (`--concurrency 1 8 32`) and a rate sweep (guidellm's `sweep` profile:
synchronous, saturated, then constant rates between the two; or `--rates` for given rates). Every
benchmark is bounded by `--max-requests` and `--max-seconds`, and each guidellm run by a deadline.
The figures are read from guidellm's own JSON report. guidellm's target is the server root (it
appends `/v1/chat/completions`); it runs as its own process, with the Hugging Face offline
switches set, and under `.ci/loopback-only` its only connections are to the stack on loopback and
its own worker processes (checked with `strace -f -e connect`). The ITL is guidellm's: a
request's stream time after its first token over its tokens after the first (a per-token mean,
its percentiles weighted by tokens); on the zero-compute engine a coalesced stream's chunk
(`stream.interval_tokens` tokens) comes that many ITLs apart, not one.

    .ci/loopback-only .venv/bin/python bench/load_sweep.py [--engine simulated|reference]
        [--mode both|concurrency|sweep] [--concurrency 1 8 32] [--rates 2 4 8 | --sweep-size 5]
        [--prompt-tokens 128] [--output-tokens 64] [--max-requests 200] [--max-seconds 20]
        [--url http://127.0.0.1:8000] [--json-out FILE] [--report-dir DIR]

Prints a JSON document and a table: requests/s, output tokens/s, TTFT p50/p90, ITL p50 and
errored/incomplete requests per concurrency or rate.

The hand-written benches stay where they measure what a load generator outside the process
cannot: `stack_overhead.py` (TTFT added by the stack over the same engine called in-process, and
the uncoalesced-streaming baseline in the same Ray), `engine_decode.py` (the engine's batched
decode against transformers `generate` in one process), and those that time one mechanism inside
the process (`structured_decoding.py`, `body_check.py`, `multimodal_preprocess.py`,
`tracing_overhead.py`'s traced/untraced apps, `prefix_routing.py`'s cache accounting, the
autoscaling simulator). Load shapes against a served stack belong here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Offline: guidellm and transformers must never reach Hugging Face (or anything off loopback).
for _key, _value in {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
                     "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                     "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
                     "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}.items():  # the profile's default
    os.environ.setdefault(_key, _value)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.ports import free_port  # noqa: E402

MODEL = "mistral-small-4"
READY_TIMEOUT_S = 300.0
POOL = {"max_queue": 128, "prefill": {"num_cpus": 0.1},
        "decode": {"num_cpus": 0.1, "max_ongoing_requests": 128}}
BASE = {"auth": {"enabled": False}, "model": {"context_length": 8192},
        "ingress": {"num_cpus": 0.1}, "multimodal": {"num_cpus": 0.1},
        "pools": {"fast": POOL | {"effort": "none"}, "deep": POOL | {"effort": "high"}}}
ENGINES = {
    "simulated": {"kind": "simulated", "simulated": {"output": "counter"}},
    "reference": {"kind": "reference"},
}


def stack_profile(engine: str) -> dict:
    return BASE | {"engine": ENGINES[engine]}


def wait_ready(url: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready within {timeout_s:g} s")


def start_stack(engine: str, port: int) -> str:
    """Local Ray, Serve's proxy on loopback, the stack at `/`; returns its base URL."""
    import ray
    from ray import serve

    from cluster.app import build_app, run_app

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
             logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    run_app(build_app(stack_profile(engine)), "load", "/", READY_TIMEOUT_S)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    return url


def stop_stack() -> None:
    """Stop the local Ray this process started; Serve's controller, proxy and replicas are its
    actors and go with it (Serve's own shutdown waits 30 s on a busy machine for nothing)."""
    import ray

    ray.shutdown()


def tokenizer_dir(parent: Path) -> Path:
    """A directory transformers' `AutoTokenizer` loads offline: our stand-in `tekken.json`."""
    from services.tokenizer import standin_tokenizer_path

    out = parent / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(standin_tokenizer_path(), out / "tekken.json")
    return out


def scenario(url: str, tokenizer: Path, profile: dict, args, report: Path) -> dict:
    """guidellm's scenario document: one benchmark per concurrency or rate in `profile`."""
    warmup = ({"warmup": {"value": args.warmup_requests, "mode": "requests"}}
              if args.warmup_requests else {})
    return {"metadata": {"name": f"small4-{profile['kind']}"}, "spec": {
        "backend": {"kind": "openai_http", "target": url, "model": MODEL,
                    "request_format": "/v1/chat/completions", "http2": False,
                    "timeout": args.request_timeout_s},
        "profile": profile | warmup,
        "tokenizer": {"kind": "hf_auto", "model": str(tokenizer)},
        "data": [{"kind": "synthetic_text", "prompt_tokens": args.prompt_tokens,
                  "output_tokens": args.output_tokens}],
        "constraints": [{"kind": "max_requests", "count": args.max_requests},
                        {"kind": "max_duration", "seconds": args.max_seconds}],
        "seed": {"kind": "static", "value": 0},
        "outputs": [{"kind": "json", "path": str(report)}]}}


def run_guidellm(doc: dict, workdir: Path, benchmarks: int, args) -> dict:
    """Run guidellm's CLI on the scenario (its own processes, its own event loops) under a
    deadline; return its JSON report."""
    config = workdir / f"{doc['metadata']['name']}.json"
    config.write_text(json.dumps(doc, indent=1))
    deadline = 120 + benchmarks * (args.max_seconds + args.request_timeout_s + 15)
    env = os.environ | {"GUIDELLM__MAX_WORKER_PROCESSES": str(args.workers),
                        "GUIDELLM__LOG_FILE": str(workdir / "guidellm.log")}
    # its own session, so a run past its deadline is stopped with its worker processes
    proc = subprocess.Popen([sys.executable, "-m", "guidellm", "run", "--config", str(config),
                             "--disable-console-interactive"], cwd=workdir, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise TimeoutError(f"guidellm still running after {deadline:g} s; stopped") from None
    if proc.returncode != 0:
        raise RuntimeError(f"guidellm exited {proc.returncode}:\n{stdout[-3000:]}"
                           f"\n{stderr[-3000:]}")
    return json.loads(Path(doc["spec"]["outputs"][0]["path"]).read_text())


def successful(summary: dict | None, key: str) -> float | None:
    """A statistic of the successful requests in one of guidellm's status distributions."""
    stats = (summary or {}).get("successful") or {}
    if key.startswith("p"):
        return (stats.get("percentiles") or {}).get(key)
    return stats.get(key)


def row(benchmark: dict) -> dict:
    """One table row from one of guidellm's benchmarks."""
    config, metrics = benchmark["config"], benchmark["metrics"]
    strategy = config["strategy"]
    totals = metrics["request_totals"]
    tokens = metrics.get("output_tokens_per_second")
    return {
        "strategy": strategy.get("type_"),
        "streams": strategy.get("streams"),
        "rate": strategy.get("rate"),
        "max_concurrency": strategy.get("max_concurrency"),
        "requests": totals.get("successful", 0),
        "errored": totals.get("errored", 0),
        "incomplete": totals.get("incomplete", 0),
        "requests_per_s": successful(metrics["requests_per_second"], "mean"),
        "output_tokens_per_s": successful(tokens, "mean"),
        "ttft_p50_ms": successful(metrics["time_to_first_token_ms"], "p50"),
        "ttft_p90_ms": successful(metrics["time_to_first_token_ms"], "p90"),
        "itl_p50_ms": successful(metrics["inter_token_latency_ms"], "p50"),
    }


def profiles(args) -> dict[str, tuple[dict, int]]:
    """guidellm profiles to run, each with the number of benchmarks it makes."""
    out = {}
    if args.mode in ("both", "concurrency"):
        out["concurrency"] = ({"kind": "concurrent", "streams": args.concurrency},
                              len(args.concurrency))
    if args.mode in ("both", "sweep") and args.rates:
        out["sweep"] = ({"kind": "constant", "rate": args.rates,
                         "max_concurrency": args.max_concurrency}, len(args.rates))
    elif args.mode in ("both", "sweep"):
        out["sweep"] = ({"kind": "sweep", "sweep_size": args.sweep_size,
                         "max_concurrency": args.max_concurrency}, args.sweep_size)
    return out


def measure(url: str, args, workdir: Path) -> dict:
    tokenizer = tokenizer_dir(workdir)
    result = {}
    for mode, (profile, benchmarks) in profiles(args).items():
        report_path = workdir / f"{mode}-report.json"
        doc = scenario(url, tokenizer, profile, args, report_path)
        report = run_guidellm(doc, workdir, benchmarks, args)
        if args.report_dir:
            Path(args.report_dir).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(report_path, Path(args.report_dir) / report_path.name)
        result[mode] = [row(b) for b in report["benchmarks"]]
    return result


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def label(r: dict) -> str:
    """The load a row was measured under, as the table shows it."""
    if r["strategy"] == "concurrent":
        return f"{r['streams']} streams"
    if r["rate"]:
        return f"{r['rate']:.2f} req/s"
    if r["strategy"] == "throughput":
        return f"saturated@{r['max_concurrency']}"
    return str(r["strategy"])


def print_table(report: dict) -> None:
    print(f"\n{'mode':>11} | {'load':>14} | {'req/s':>7} | {'out tok/s':>9} | "
          f"{'TTFT p50':>8} | {'TTFT p90':>8} | {'ITL p50':>7} | {'ok':>4} | {'err':>3} | "
          f"{'inc':>3}   (ms)")
    for mode, rows in report["rows"].items():
        for r in rows:
            load = label(r)
            print(f"{mode:>11} | {load:>14} | {fmt(r['requests_per_s'], '7.2f')} | "
                  f"{fmt(r['output_tokens_per_s'], '9.1f')} | {fmt(r['ttft_p50_ms'], '8.1f')} | "
                  f"{fmt(r['ttft_p90_ms'], '8.1f')} | {fmt(r['itl_p50_ms'], '7.2f')} | "
                  f"{r['requests']:>4} | {r['errored']:>3} | {r['incomplete']:>3}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", choices=sorted(ENGINES), default="simulated")
    p.add_argument("--url", help="load this running stack instead of starting one")
    p.add_argument("--port", type=int, default=0, help="Serve's port (default: a free one)")
    p.add_argument("--mode", choices=("both", "concurrency", "sweep"), default="both")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rates", type=float, nargs="+", help="constant rates (req/s) to sweep")
    p.add_argument("--sweep-size", type=int, default=5,
                   help="guidellm's sweep: synchronous, saturated and N-2 rates between")
    p.add_argument("--max-concurrency", type=int, default=64,
                   help="cap on open requests in the sweep")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--max-requests", type=int, default=200, help="per benchmark")
    p.add_argument("--max-seconds", type=float, default=20.0, help="per benchmark")
    p.add_argument("--warmup-requests", type=int, default=4,
                   help="first requests of each benchmark left out of its figures")
    p.add_argument("--request-timeout-s", type=float, default=60.0)
    p.add_argument("--workers", type=int, default=2, help="guidellm's worker processes")
    p.add_argument("--json-out", help="also write the JSON document here")
    p.add_argument("--report-dir", help="keep guidellm's own JSON reports here")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    started = not args.url
    url = args.url.rstrip("/") if args.url else start_stack(args.engine, args.port or free_port())
    try:
        with tempfile.TemporaryDirectory(prefix="small4-guidellm-") as tmp:
            rows = measure(url, args, Path(tmp))
    finally:
        if started:
            stop_stack()
    report = {"bench": "load_sweep", "tool": "guidellm", "api_base": f"{url}/v1",
              "engine": args.engine if started else "external",
              "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
              "max_requests": args.max_requests, "max_seconds": args.max_seconds, "rows": rows}
    print(json.dumps(report, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    print_table(report)


if __name__ == "__main__":
    main()
