"""Every bench still runs, at tiny sizes (figures are not checked here: they live in the benches'
own output). Each runs as its own process, as an operator would start it, with a deadline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autoscaling.simulator.tracefile import TraceSource, load_trace
from bench.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
BENCH_TIMEOUT_S = 600  # a bench's deadline: stack_overhead's smoke alone takes ~230 s here
# pytest's own limit (300 s for every test) sits above each bench's deadline, so a slow bench
# fails on its deadline, with its stderr, not on pytest's with only a stack of the wait
pytestmark = pytest.mark.timeout(BENCH_TIMEOUT_S + 60)


def run_bench(script: str, *args: str, timeout: float = BENCH_TIMEOUT_S) -> dict:
    """Run `bench/<script>` and return the JSON report it prints first."""
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    report, _ = json.JSONDecoder().raw_decode(done.stdout[done.stdout.index("{"):])
    return report


def test_engine_decode_bench_runs():
    report = run_bench("engine_decode.py", "--tokens", "4", "--concurrency", "1", "2",
                       "--baseline-requests", "1")
    assert report["baseline_generate_tokens_per_s"] > 0
    assert [r["concurrency"] for r in report["batched"]] == [1, 2]
    assert all(r["tokens_per_s"] > 0 and r["speedup_vs_generate"] > 0
               for r in report["batched"])
    assert [(r["concurrency"], r["temperature"]) for r in report["sampled"]] == [(1, 1.0), (2, 1.0)]
    assert all(r["over_greedy"] > 0 for r in report["sampled"])


def test_structured_decoding_bench_runs():
    report = run_bench("structured_decoding.py", "--tokens", "4", "--concurrency", "1", "2")
    assert report["constrained_outputs_full_length"] and len(report["rows"]) == 2


def test_multimodal_preprocess_bench_runs():
    report = run_bench("multimodal_preprocess.py", "--images", "2", "--concurrency", "2")
    assert set(report["results"]) == {"mistral_common_direct", "small4_preprocessor",
                                      "small4_preprocessor_c2"}
    assert all(row["images_per_s"] > 0 for row in report["results"].values())


def test_holdout_trace_bench_writes_a_file_the_simulator_replays(tmp_path):
    """Not a JSON report: the trace file `small4 simulate --trace` reads, every pool in it."""
    out = tmp_path / "holdout.csv"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "holdout_trace.py"), str(out),
                           "--minutes", "40"], cwd=ROOT, capture_output=True, text=True,
                          timeout=BENCH_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    trace = load_trace([TraceSource(out)])
    assert trace.requests and {r.pool for r in trace.requests} == {"fast", "deep"}


@pytest.mark.ray
def test_stack_overhead_bench_runs():
    report = run_bench("stack_overhead.py", "--requests", "2", "--tokens", "8",
                       "--port", str(free_port()))
    assert set(report["ttft"]) == {"sim", "sim_via_decode", "ref"}
    assert report["throughput_tokens_per_s"]["sim"]["16"] > 0
    assert set(report["coalescing_x"]) == {"1", "16"}
    assert report["echo_ttft_p50_ms"] > 0 and "added_ttft_p50_le_1.5x_echo" in report["targets"]
    # every app's replicas and the echo's are found (their CPU at 2 requests may be 0 ticks)
    for app in ("sim", "sim_via_decode", "ref"):
        cpu = report["cpu_ms_per_request"][app]
        assert {"ingress", "fast-prefill", "fast-decode", "Echo"} <= set(cpu), cpu
        assert all(v >= 0 for v in cpu.values())


@pytest.mark.ray
def test_tracing_overhead_bench_runs():
    report = run_bench("tracing_overhead.py", "--requests", "2", "--port", str(free_port()))
    # at two requests the batch exporter may not have flushed yet: only the shape is checked
    assert set(report["ttft"]) == {"traced", "untraced"} and "extra_p50_ms" in report


def test_body_check_bench_runs():
    report = run_bench("body_check.py", "--max-mb", "0.1", "--repeat", "1",
                       "--dense-max-mb", "0.1")
    assert {r["shape"] for r in report["rows"]} == {"text", "base64", "escapes",
                                                    "small_messages"}
    assert all(r["check_ms_per_mb"] > 0 for r in report["rows"])


def test_simulate_autoscaling_bench_runs():
    report = run_bench("simulate_autoscaling.py", "--traces", "steady", "mix-shift",
                       "--duration-s", "90", "--seeds", "1", "--holdout-minutes", "1",
                       "--jobs", "2")  # the process pool the full run uses
    assert {r["trace"] for r in report["summary"]} == {"steady", "mix-shift", "holdout"}
    assert {r["policy"] for r in report["summary"]} == {"static", "ray_default", "planner",
                                                         "ours", "hindsight"}
    assert "ceiling" in report["targets"]["mix-shift"]
    assert 0 <= report["targets"]["mix-shift"]["hindsight_slo_attainment"] <= 1


@pytest.mark.ray
def test_prefix_routing_bench_runs():
    report = run_bench("prefix_routing.py", "--conversations", "2", "--families", "2",
                       "--system-words", "60", "--replicas", "2", "--routers",
                       "serve_default", "ray_prefix_affinity", "cache_aware",
                       "--port", str(free_port()))
    assert set(report["routers"]) == {"serve_default", "ray_prefix_affinity", "cache_aware"}
    assert all(row["requests"] >= 8 for row in report["routers"].values())
    # every deployed replica is counted, an idle one as 0, and every request's prefill is
    for row in report["routers"].values():
        assert len(row["requests_per_replica"]) == 2
        assert sum(row["requests_per_replica"]) >= row["requests"], row
    assert 0 < report["ideal_cached_ratio"] < 1
    assert 0 < report["distinct_prompt_tokens"] < report["replica_cache_capacity_tokens"]


@pytest.mark.ray
def test_prefix_routing_bench_runs_on_the_simulated_engine_with_router_settings():
    report = run_bench("prefix_routing.py", "--engine", "simulated", "--conversations", "2",
                       "--families", "2", "--system-words", "60", "--replicas", "2",
                       "--routers", "cache_aware",
                       "--prefix", '{"recompute_weight": 4, "load_blocks": 0}',
                       "--port", str(free_port()))
    assert report["engine"] == "simulated"
    ours = report["routers"]["cache_aware"]
    assert ours["requests"] >= 8 and ours["cached_tokens"] > 0


@pytest.mark.ray
def test_load_sweep_bench_runs():
    """guidellm against the stack it starts: rows read from its report, no request failed."""
    report = run_bench("load_sweep.py", "--mode", "concurrency", "--concurrency", "1",
                       "--max-requests", "3", "--max-seconds", "30", "--prompt-tokens", "16",
                       "--output-tokens", "8", "--warmup-requests", "0",
                       "--port", str(free_port()))
    [row] = report["rows"]["concurrency"]
    assert row["streams"] == 1 and row["requests"] == 3
    assert row["errored"] == 0 and row["incomplete"] == 0
    assert row["output_tokens_per_s"] > 0 and row["ttft_p50_ms"] > 0


def test_perf_model_check_bench_runs():
    report = run_bench("perf_model_check.py", "--smoke", "--prompt-tokens", "32",
                       "--prompts-per-batch", "1", "2", "--decode-batches", "1", "8",
                       "--repeats", "1", "--device", "cpu")
    assert [(r["tokens"], r["prompts"]) for r in report["prefill"]] == [(32, 1), (32, 2)]
    assert [r["batch"] for r in report["decode"]] == [1, 8]
    # the router spreads a batch over experts as the model's formula says (random weights)
    assert report["decode"][0]["distinct_experts"] == 4
    assert 4 < report["decode"][1]["distinct_experts"] <= 32
    assert all(r["layer_s"] > 0 and r["layer_bytes"] > 0 for r in report["decode"])
