"""Goodput at SLO of three ways to size the pools on 16 H200s (8 TP2 engines), in simulation:
a static split (fast 1P+2D, deep 2P+3D), Ray Serve's default policy per deployment
(target_ongoing_requests=2, upscale_delay 30 s, downscale_delay 600 s) in the same budget, and
our SLO policies under the GPU-budget arbiter, on the same traces (same seed, same requests).

    python bench/simulate_autoscaling.py [--traces step diurnal steady bursty] [--seeds 5]
                                         [--jobs 2] [--out DIR] [--plot FILE.png]

Prints a JSON document and a table. Targets (issue): >= 1.3x the static split's goodput on the
step and diurnal traces, and the SLO recovered within 60 s of the step. `ceiling` is the offered
load over the static split's goodput: no policy can beat the static split by more than that.
Figures are means over `--seeds` request draws (5 by default: one draw's recovery time swings
from 0 to 500 s), with each seed's ratio and recovery listed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from statistics import mean

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autoscaling.simulator.capacity import best_split  # noqa: E402
from autoscaling.simulator.scenario import (CONTROLLERS, SimSettings, capacity_rps,  # noqa: E402
                                             run)
from autoscaling.simulator.workload import TRACES  # noqa: E402

TARGET_RATIO, TARGET_RECOVERY_S = 1.3, 60.0


def one(job: tuple) -> tuple:
    """Run one (trace, controller, seed); top level so a process pool can call it."""
    trace, controller, seed, capacity = job
    return trace, controller, seed, run(trace, controller, SimSettings(), seed, capacity=capacity)


def model_facts(s: SimSettings, capacity: float) -> dict:
    """The performance model's derived numbers, so a reader can check them against anchors."""
    p = s.perf
    split, _ = best_split(p, s.workload, s.budget_engines)
    return {
        "prefill_tokens_per_s_per_engine": {n: round(n / (p.prefill_s([n]) -
                                                          p.prefill_batch_overhead_s))
                                            for n in (2048, 8192, 32768)},
        "decode_step_ms_batch_128_ctx_4k": round(1000 * p.decode_step_s(128, 128 * 4096), 2),
        "decode_tokens_per_s_per_engine_batch_128": round(128 / p.decode_step_s(128, 128 * 4096)),
        "kv_capacity_tokens_per_engine": p.kv_capacity_tokens,
        "cold_start_s": p.cold_start_s,
        "capacity_rps_best_split": round(capacity, 2),
        "best_split": {f"{k[0]}/{k[1]}": n for k, n in split.items()},
        "static_split": s.static_split,
        "slos": {k: v.model_dump() for k, v in s.slos.items()},
    }


def summarise(results: dict) -> list[dict]:
    """One row per trace and controller, averaged over seeds, with ratios to the static split."""
    rows = []
    for trace, by_controller in results.items():
        statics = [r["goodput_rps"] for r in by_controller["static"]]
        static = mean(statics)
        offered = mean(r["offered_rps"] for r in by_controller["static"])
        for controller, runs in by_controller.items():
            goodput = mean(r["goodput_rps"] for r in runs)
            recovery = [r.get("recovery_s") for r in runs]
            rows.append({
                "trace": trace, "controller": controller, "goodput_rps": round(goodput, 3),
                "vs_static": round(goodput / static, 3), "ceiling": round(offered / static, 3),
                "vs_static_by_seed": [round(r["goodput_rps"] / b, 3)
                                      for r, b in zip(runs, statics)],
                "slo_attainment": round(mean(r["slo_attainment"] for r in runs), 4),
                "gpu_hours": round(mean(r["gpu_hours_allocated"] for r in runs), 3),
                "gpu_hours_busy": round(mean(r["gpu_hours_busy"] for r in runs), 3),
                "engine_moves": round(mean(r["engine_moves"] for r in runs), 1),
                "recovery_s": recovery if "recovery_s" in runs[0] else None})
    return rows


def verdict(rows: list[dict]) -> dict:
    """Whether the issue's targets are met by our controller."""
    ours = {r["trace"]: r for r in rows if r["controller"] == "slo_arbiter"}
    out = {}
    for trace in ("step", "diurnal"):
        if trace in ours:
            out[f"{trace}_goodput_x_static"] = ours[trace]["vs_static"]
            out[f"{trace}_ceiling_x_static"] = ours[trace]["ceiling"]
            out[f"{trace}_target_met"] = ours[trace]["vs_static"] >= TARGET_RATIO
    if "step" in ours:
        recovered = ours["step"]["recovery_s"]
        out["step_recovery_s"] = recovered
        out["step_recovery_target_met"] = all(r is not None and r <= TARGET_RECOVERY_S
                                              for r in recovered)
    return out


def table(rows: list[dict]) -> str:
    """The rows as a fixed-width table."""
    head = (f"{'trace':>8} | {'controller':>12} | {'goodput/s':>9} | {'x static':>8} | "
            f"{'ceiling':>7} | {'SLO met':>7} | {'GPU-h':>6} | {'busy':>6} | {'moves':>5} | "
            f"recovery s")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['trace']:>8} | {r['controller']:>12} | {r['goodput_rps']:9.2f} | "
                     f"{r['vs_static']:8.2f} | {r['ceiling']:7.2f} | "
                     f"{100 * r['slo_attainment']:6.1f}% | {r['gpu_hours']:6.2f} | "
                     f"{r['gpu_hours_busy']:6.2f} | {r['engine_moves']:5.1f} | "
                     f"{'' if r['recovery_s'] is None else r['recovery_s']}")
    return "\n".join(lines)


def plot(document: dict, path: str) -> None:
    """SLO attainment over time per controller (left) and our engines per role (right), one
    row per trace, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = list(document["runs"])
    fig, axes = plt.subplots(len(traces), 2, figsize=(13, 3.2 * len(traces)), squeeze=False)
    for row, trace in zip(axes, traces):
        for controller, runs in document["runs"][trace].items():
            points = [(t / 60, a) for t, a in runs[0]["attainment_windows"] if a is not None]
            row[0].plot(*zip(*points), label=controller)
        row[0].set(title=f"{trace}: SLO attainment (60 s windows, seed 0)", xlabel="minutes",
                   ylim=(0, 1.05))
        row[0].legend(fontsize=8)
        timeline = document["runs"][trace]["slo_arbiter"][0]["allocation_timeline"]
        keys = sorted({k for _, alloc in timeline for k in alloc})
        for key in keys:
            row[1].step([t / 60 for t, _ in timeline], [a.get(key, 0) for _, a in timeline],
                        where="post", label=key)
        row[1].set(title=f"{trace}: engines per pool/role (slo_arbiter)", xlabel="minutes")
        row[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--traces", nargs="+", default=list(TRACES), choices=TRACES)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", help="directory to write simulate_autoscaling.json into")
    parser.add_argument("--plot", help="write a PNG of attainment and allocation over time")
    args = parser.parse_args()

    settings, start = SimSettings(), time.perf_counter()
    capacity = capacity_rps(settings)
    jobs = [(t, c, seed, capacity) for t in args.traces for c in CONTROLLERS
            for seed in range(args.seeds)]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            done = list(pool.map(one, jobs))
    else:
        done = [one(j) for j in jobs]
    results: dict = {t: {c: [] for c in CONTROLLERS} for t in args.traces}
    for trace, controller, seed, report in sorted(done, key=lambda d: d[2]):
        results[trace][controller].append(report)
    rows = summarise(results)
    document = {"model": model_facts(settings, capacity), "seeds": args.seeds,
                "summary": rows, "targets": verdict(rows), "runs": results,
                "wall_s": round(time.perf_counter() - start, 1)}
    print(json.dumps(document))
    print()
    print(table(rows))
    print()
    print(json.dumps(document["targets"], indent=2))
    print(f"wall {document['wall_s']} s")
    if args.plot:
        plot(document, args.plot)
        print(f"plot {args.plot}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "simulate_autoscaling.json"), "w") as f:
            json.dump(document, f, indent=2)


if __name__ == "__main__":
    main()
