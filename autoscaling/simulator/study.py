"""A capacity study: policies x traces x seeds in the simulator, the figures that compare them,
and the answer an ops person acts on. `small4 simulate` and `bench/simulate_autoscaling.py`
both run this.

- `run_study` runs every (trace, policy, seed) (a trace file once: its requests are fixed),
  in a process pool, reporting progress.
- `summarise` gives one row per trace and policy: goodput at SLO, its ratio to the static split
  and to the planner, per seed, and the ceiling (offered / static goodput: no policy beats the
  static split by more).
- `verdict` checks the issue's targets; `answer` finds the smallest budget and split meeting
  the SLOs: a fixed split sized for the traffic's busiest five minutes, and our policy at the
  smallest budget that keeps `SLO_TARGET` of requests within SLO, both checked by simulation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from autoscaling.simulator.capacity import KEYS, demand_peaks, request_cost
from autoscaling.simulator.scenario import (CONTROLLERS, SimSettings, capacity_rps, run_trace)
from autoscaling.simulator.tracefile import TraceSource, load_trace
from autoscaling.simulator.workload import (POOLS, SHIFTING, Trace, TraceKind, arrivals,
                                            make_trace)

SLO_TARGET = 0.95  # of requests within SLO, where the budget carries the load
RECOVERY_TARGET = 0.9
RATIO_SHIFTING = 1.3
NOT_CARRIED = ("bursty",)  # bursts at 1.6x the best split's capacity: no budget-bound policy

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class TraceSpec:
    """A synthetic trace kind, or trace files replayed (picklable, rebuilt in each worker)."""

    label: str
    kind: TraceKind | None = None
    sources: tuple[TraceSource, ...] = ()
    speedup: float = 1.0
    duration_s: float | None = None
    # the settings whose capacity sizes a synthetic trace's rate; None: those it is run with.
    # The answer fixes them (the user's budget): a candidate budget is tried on the same
    # traffic, not on traffic scaled to it
    traffic: SimSettings | None = None

    @property
    def replayed(self) -> bool:
        """Whether the requests come from files (the same whatever the seed)."""
        return bool(self.sources)

    def build(self, s: SimSettings, seed: int) -> Trace:
        """The trace for `seed`."""
        if self.replayed:
            return load_trace(list(self.sources), self.speedup, self.label)
        sized = self.traffic or s
        return make_trace(self.kind, capacity_rps(sized), sized.workload, self.duration_s,
                          seed, capacity_of=lambda w: capacity_rps(sized, w))


def file_spec(sources: list[TraceSource], speedup: float) -> TraceSpec:
    """One spec replaying every file together (checked here, so errors come before runs)."""
    trace = load_trace(sources, speedup)
    return TraceSpec(trace.name, sources=tuple(sources), speedup=speedup)


def _one(job: tuple) -> tuple:
    spec, controller, seed, s = job
    return spec.label, controller, seed, run_trace(spec.build(s, seed), controller, s, seed)


def run_jobs(jobs: list[tuple], workers: int, progress: Progress | None) -> list[tuple]:
    """Run `jobs` (spec, controller, seed, settings), reporting each as it ends."""
    done: list[tuple] = []
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            for result in pool.map(_one, jobs):
                done.append(result)
                if progress:
                    progress(len(done), len(jobs), " ".join(map(str, result[:3])))
    else:
        for job in jobs:
            done.append(_one(job))
            if progress:
                progress(len(done), len(jobs), " ".join(map(str, done[-1][:3])))
    return done


def run_study(specs: list[TraceSpec], policies: list[str], seeds: int, s: SimSettings,
              workers: int = 2, progress: Progress | None = None) -> dict:
    """Reports by trace label, then policy: one per seed (one for a replayed file)."""
    unknown = [p for p in policies if p not in CONTROLLERS]
    if unknown:
        raise KeyError(f"unknown policy {unknown[0]!r}; known: {', '.join(CONTROLLERS)}")
    jobs = [(spec, c, seed, s) for spec in specs for c in policies
            for seed in range(1 if spec.replayed else seeds)]
    results: dict = {spec.label: {c: [] for c in policies} for spec in specs}
    for label, controller, _, report in sorted(run_jobs(jobs, workers, progress),
                                               key=lambda d: d[2]):
        results[label][controller].append(report)
    return results


def summarise(results: dict, s: SimSettings) -> list[dict]:
    """One row per trace and policy, averaged over seeds, with ratios and the ceiling."""
    rows = []
    for trace, by_policy in results.items():
        statics = [r["goodput_rps"] for r in by_policy.get("static", [])]
        planners = [r["goodput_rps"] for r in by_policy.get("planner", [])]
        for policy, runs in by_policy.items():
            goodput = mean(r["goodput_rps"] for r in runs)
            offered = mean(r["offered_rps"] for r in runs)
            row = {"trace": trace, "policy": policy, "goodput_rps": round(goodput, 3),
                   "offered_rps": round(offered, 3),
                   "goodput_by_seed": [round(r["goodput_rps"], 3) for r in runs],
                   "slo_attainment": round(mean(r["slo_attainment"] or 0 for r in runs), 4),
                   "gpu_hours": round(mean(r["gpu_hours_allocated"] for r in runs), 3),
                   "engine_moves": round(mean(r["engine_moves"] for r in runs), 1),
                   "recovery_s": _recovery(runs)}
            if statics:  # a baseline that served nothing within SLO has no ratio (None)
                row["vs_static"] = _ratio(goodput, mean(statics))
                row["vs_static_by_seed"] = [round(r["goodput_rps"] / b, 3) if b else None
                                            for r, b in zip(runs, statics)]
                row["ceiling"] = _ratio(offered, mean(statics))  # not from the rounded
            if planners:
                row["vs_planner"] = _ratio(goodput, mean(planners))
                row["vs_planner_by_seed"] = [round(r["goodput_rps"] / b, 3) if b else None
                                             for r, b in zip(runs, planners)]
            rows.append(row)
    return rows


def _ratio(value: float, baseline: float) -> float | None:
    return round(value / baseline, 3) if baseline else None


def _recovery(runs: list[dict]) -> list | None:
    """Per seed: seconds to recover after the step, or after each shift."""
    if "recovery_after_shift_s" in runs[0]:
        return [r["recovery_after_shift_s"] for r in runs]
    if "recovery_s" in runs[0]:
        return [r["recovery_s"] for r in runs]
    return None


def verdict(rows: list[dict], s: SimSettings) -> dict:
    """The issue's targets for our policy, each with the figures behind it."""
    ours = {r["trace"]: r for r in rows if r["policy"] == "ours"}
    seen = {r["trace"]: r for r in rows if r["policy"] == "hindsight"}
    limit = s.perf.cold_start_s + 60.0
    out: dict = {"recovery_limit_s": limit}
    for trace, r in ours.items():
        t: dict = {}
        if r.get("vs_static") is not None:
            t["vs_static"], t["ceiling"] = r["vs_static"], r["ceiling"]
            t["vs_static_by_seed"] = r["vs_static_by_seed"]
            t["at_least_static"] = min((x for x in r["vs_static_by_seed"] if x is not None),
                                       default=r["vs_static"]) >= 1.0
            if trace in ("mix-shift", "length-shift"):
                t["target_1_3x_met"] = r["vs_static"] >= RATIO_SHIFTING
        if r.get("vs_planner") is not None:
            t["vs_planner"], t["vs_planner_by_seed"] = r["vs_planner"], r["vs_planner_by_seed"]
            t["at_least_planner"] = r["vs_planner"] >= 1.0
        if trace not in NOT_CARRIED:
            t["slo_attainment"] = r["slo_attainment"]
            t["slo_target_met"] = r["slo_attainment"] >= SLO_TARGET
        if trace in seen:  # what knowing the future reaches with this budget
            t["hindsight_slo_attainment"] = seen[trace]["slo_attainment"]
            t["hindsight_recovery_s"] = seen[trace]["recovery_s"]
        if trace in SHIFTING and r["recovery_s"] is not None:
            flat = [x for seed in r["recovery_s"] for x in seed]
            t["recovery_target_met"] = all(x is not None and x <= limit for x in flat)
        out[trace] = t
    return out


def answer(spec: TraceSpec, s: SimSettings, seeds: int, workers: int = 2,
           progress: Progress | None = None, max_budget: int = 32) -> dict:
    """The smallest budget and split that keep `SLO_TARGET` of this traffic within SLO.

    A fixed split: each role sized for its busiest five minutes at 85 % utilisation, then
    grown one engine at a time at the role with the most work per engine until the static
    split meets the target in simulation. Our policy: from the busiest five minutes of all
    roles together at 95 % (no budget below carries it), grown until our policy meets the
    target.
    """
    n_seeds = 1 if spec.replayed else seeds
    spec = dataclasses.replace(spec, traffic=spec.traffic or s)
    drawn = [arrivals(spec.build(s, k), s.workload, k) for k in range(n_seeds)]
    found = [demand_peaks(s.perf, requests) for requests in drawn]
    reachable = _reachable(s, drawn)
    peak = {k: max(p[k] for p, _ in found) for k in KEYS}
    split = {k: max(1, math.ceil(peak[k] / 0.85 - 1e-9)) for k in KEYS}
    fixed = _grow(spec, s, n_seeds, split, peak, workers, progress, max_budget, reachable)
    together = max(total for _, total in found)
    # no budget below the roles' minimums (a profile's `min_replicas`) can hold them
    start = max(len(KEYS), math.ceil(together / 0.95 - 1e-9),
                sum(lowest for lowest, _ in s.bounds.values()))
    budget, ours = start, None
    while budget <= max_budget:
        # started from the fixed split's shape (the traffic's peaks), not the settings' own:
        # a trace shorter than a cold start leaves no time to move engines from a wrong one
        settings = _with(s, _fit(split, peak, budget))
        att = _attainment(spec, settings, "ours", n_seeds, workers, progress, reachable)
        if att >= SLO_TARGET:
            ours = {"budget_engines": budget, "gpus": budget * s.perf.gpus_per_engine,
                    "slo_attainment": round(att, 4)}
            break
        budget += 1
    return {"trace": spec.label, "fixed_split": fixed, "ours": ours, "max_budget": max_budget,
            "fixed_from": sum(split.values()),
            "never_in_slo": {p: round(1 - share, 4) for p, share in reachable.items()
                             if share < 1},
            "ours_from": start,
            "busiest_5min_engines": {f"{p}/{r}": round(v, 2) for (p, r), v in peak.items()},
            "busiest_5min_engines_together": round(together, 2)}


def _with(s: SimSettings, split: dict) -> SimSettings:
    """`s` with `split` as its starting (and static) split, and its sum as the budget."""
    return s.model_copy(update={"budget_engines": sum(split.values()),
                                "static_split": {f"{p}/{r}": n for (p, r), n in split.items()}})


def _fit(split: dict, peak: dict, budget: int) -> dict:
    """`split` made to hold `budget` engines: an engine added where the most work falls on
    each, taken where the least does (each role keeps one)."""
    fitted = dict(split)
    while sum(fitted.values()) < budget:
        k = max(fitted, key=lambda k: peak[k] / fitted[k])
        fitted[k] += 1
    while sum(fitted.values()) > budget:
        k = min((k for k in fitted if fitted[k] > 1), key=lambda k: peak[k] / fitted[k])
        fitted[k] -= 1
    return fitted


def _reachable(s: SimSettings, drawn: list[list]) -> dict[str, float]:
    """Per pool, the share of requests that can meet its TTFT SLO at all: a prompt whose
    prefill alone, on an idle engine, outlasts the SLO misses it at any budget."""
    share = {}
    for pool in POOLS:
        mine = [r for requests in drawn for r in requests if r.pool == pool]
        ok = sum(request_cost(s.perf, r.prompt, r.output)[0] <= s.slos[pool].ttft_s
                 for r in mine)
        share[pool] = ok / len(mine) if mine else 1.0
    return share


def _attainment(spec: TraceSpec, s: SimSettings, policy: str, seeds: int, workers: int,
                progress: Progress | None, reachable: dict[str, float] | None = None) -> float:
    """The mean over seeds of the worst pool's share within SLO, of what can be (every pool
    with requests must meet the target: the whole share would let a large pool hide a failing
    small one; a request too long for its TTFT SLO at any budget is left out of its pool's
    share, or no budget would ever do)."""
    reachable = reachable or {}
    jobs = [(spec, policy, k, s) for k in range(seeds)]
    done = run_jobs(jobs, workers, None)
    att = mean(min((min(1.0, p["slo_attainment"] / max(reachable.get(name, 1.0), 1e-9))
                    for name, p in r[3]["pools"].items() if p["requests"]),
                   default=r[3]["slo_attainment"] or 0.0) for r in done)
    if progress:
        progress(0, 0, f"answer {spec.label}: {policy} with {s.budget_engines} engines "
                       f"{s.static_split}: {100 * att:.1f}% within SLO (its worst pool)")
    return att


def _grow(spec: TraceSpec, s: SimSettings, seeds: int, split: dict, peak: dict, workers: int,
          progress: Progress | None, max_budget: int,
          reachable: dict[str, float] | None = None) -> dict | None:
    while sum(split.values()) <= max_budget:
        budget = sum(split.values())
        settings = _with(s, split)
        att = _attainment(spec, settings, "static", seeds, workers, progress, reachable)
        if att >= SLO_TARGET:
            return {"budget_engines": budget, "gpus": budget * s.perf.gpus_per_engine,
                    "split": {f"{p}/{r}": n for (p, r), n in split.items()},
                    "slo_attainment": round(att, 4)}
        k = max(split, key=lambda k: peak[k] / split[k])
        split = {**split, k: split[k] + 1}
    return None


def answer_line(a: dict) -> str:
    """One sentence an ops person can act on."""
    parts = [f"{a['trace']}:"]
    if a["ours"]:
        o = a["ours"]
        parts.append(f"with our autoscaling, {o['budget_engines']} engines ({o['gpus']} GPUs) "
                     f"keep {100 * o['slo_attainment']:.1f}% within SLO (its worst pool);")
    else:
        parts.append(_none_found("our autoscaling", a["ours_from"], a["max_budget"]) + ";")
    if a["fixed_split"]:
        f = a["fixed_split"]
        split = ", ".join(f"{k} {n}" for k, n in f["split"].items())
        parts.append(f"a fixed split needs {f['budget_engines']} engines ({f['gpus']} GPUs): "
                     f"{split} ({100 * f['slo_attainment']:.1f}%).")
    else:
        parts.append(_none_found("a fixed split", a["fixed_from"], a["max_budget"]) + ".")
    for pool, share in (a.get("never_in_slo") or {}).items():
        parts.append(f"{100 * share:.1f}% of the {pool} pool's requests cannot meet its TTFT "
                     "SLO at any budget (their prefill alone is longer): left out of its share.")
    return " ".join(parts)


def _none_found(who: str, start: int, most: int) -> str:
    if start > most:
        return (f"{who} was not simulated: the busiest five minutes alone need {start} engines, "
                f"above the {most} this answer tries")
    return f"{who} meets the SLOs in every pool at no budget of {start}-{most} engines tried"


def table(rows: list[dict]) -> str:
    """The rows as a fixed-width table."""
    head = (f"{'trace':>13} | {'policy':>11} | {'goodput/s':>9} | {'x static':>8} | "
            f"{'ceiling':>7} | {'x planner':>9} | {'SLO met':>7} | {'GPU-h':>6} | "
            f"{'moves':>5} | recovery s")
    lines = [head, "-" * len(head)]
    for r in rows:
        def num(key: str, width: int) -> str:
            return (f"{r[key]:{width}.2f}" if r.get(key) is not None
                    else " " * (width - 1) + "-")
        recovery = "" if r["recovery_s"] is None else json.dumps(r["recovery_s"])
        lines.append(f"{r['trace']:>13} | {r['policy']:>11} | {r['goodput_rps']:9.2f} | "
                     f"{num('vs_static', 8)} | {num('ceiling', 7)} | {num('vs_planner', 9)} | "
                     f"{100 * r['slo_attainment']:6.1f}% | {r['gpu_hours']:6.2f} | "
                     f"{r['engine_moves']:5.1f} | {recovery}")
    return "\n".join(lines)


def prefix_rows(random: dict, aware: dict) -> list[dict]:
    """Per trace and policy, the same runs with random and with cache-aware routing: prefix
    hit rate, the share of prompt tokens not recomputed, goodput and attainment."""
    rows = []
    for trace, by_policy in random.items():
        for policy, runs in by_policy.items():
            for routing, got in (("random", runs), ("cache-aware", aware[trace][policy])):
                prefix = [r.get("prefix") or {} for r in got]
                rows.append({"trace": trace, "policy": policy, "routing": routing,
                             "hit_rate": round(mean(p.get("hit_rate", 0.0) for p in prefix), 4),
                             "cached_share": round(mean(p.get("cached_share_of_prompts", 0.0)
                                                        for p in prefix), 4),
                             "goodput_rps": round(mean(r["goodput_rps"] for r in got), 3),
                             "slo_attainment": round(mean(r["slo_attainment"] or 0
                                                          for r in got), 4),
                             "gpu_hours_busy": round(mean(r["gpu_hours_busy"] for r in got), 3)})
    return rows


def prefix_table(rows: list[dict]) -> str:
    """What routing buys, as a fixed-width table."""
    head = (f"{'trace':>13} | {'policy':>11} | {'routing':>11} | {'prefix hit':>10} | "
            f"{'prompt cached':>13} | {'goodput/s':>9} | {'SLO met':>7} | busy GPU-h")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['trace']:>13} | {r['policy']:>11} | {r['routing']:>11} | "
                     f"{100 * r['hit_rate']:9.1f}% | {100 * r['cached_share']:12.1f}% | "
                     f"{r['goodput_rps']:9.2f} | {100 * r['slo_attainment']:6.1f}% | "
                     f"{r['gpu_hours_busy']:.2f}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    """Attainment over time per policy (left) and engines per pool and role under our policy
    (right), one row per trace, seed 0; False when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = list(results)
    fig, axes = plt.subplots(len(traces), 2, figsize=(13, 3.2 * len(traces)), squeeze=False)
    for row, trace in zip(axes, traces):
        for policy, runs in results[trace].items():
            points = [(t / 60, a) for t, a in runs[0]["attainment_windows"] if a is not None]
            if points:
                row[0].plot(*zip(*points), label=policy)
        row[0].set(title=f"{trace}: SLO attainment (60 s windows, seed 0)", xlabel="minutes",
                   ylim=(0, 1.05))
        row[0].legend(fontsize=8, loc="lower left")
        shown = "ours" if "ours" in results[trace] else next(iter(results[trace]))
        timeline = results[trace][shown][0]["allocation_timeline"]
        for key in sorted({k for _, alloc in timeline for k in alloc}):
            row[1].step([t / 60 for t, _ in timeline], [a.get(key, 0) for _, a in timeline],
                        where="post", label=key)
        row[1].set(title=f"{trace}: engines per pool/role ({shown})", xlabel="minutes")
        row[1].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write(document: dict, out: Path, name: str = "simulate") -> tuple[Path, Path | None]:
    """`<name>.json` and `<name>.png` into `out`; the PNG path is None when skipped."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(document, indent=1))
    png = out / f"{name}.png"
    return json_path, png if plot(document["runs"], png) else None


def default_workers() -> int:
    """Two processes at most: the machines this runs on are shared."""
    return max(1, min(2, os.cpu_count() or 1))
