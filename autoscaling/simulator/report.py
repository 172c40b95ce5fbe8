"""Turn a simulation's requests into the numbers the benchmark reports, as plain JSON data.

A request meets its SLO when it was not aborted, finished before the run ended, its first token
left within the pool's TTFT SLO and its mean inter-token latency (time per output token after
the first) was within the pool's ITL SLO. Goodput is such requests per second of trace.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from autoscaling.simulator.sim import SimResult
from autoscaling.window import percentile
from autoscaling.simulator.workload import POOLS, Request


class PoolSLO(BaseModel):
    """A pool's latency objectives."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttft_s: float = Field(gt=0)
    itl_s: float = Field(gt=0)


def tpot(r: Request) -> float | None:
    """Mean seconds per output token after the first, None if unfinished."""
    if r.finish is None or r.first_token is None or r.aborted:
        return None
    return max(r.finish - r.first_token, 0.0) / max(r.output - 1, 1)


def meets(r: Request, slo: PoolSLO) -> bool:
    """Whether `r` finished within both of its pool's SLOs."""
    per_token = tpot(r)
    return per_token is not None and (r.first_token - r.arrival) <= slo.ttft_s and \
        per_token <= slo.itl_s


def window_counts(requests: list[Request], ok: list[bool], duration: float,
                  window_s: float) -> list[tuple[int, int]]:
    """(meeting SLO, arrived) per window of arrivals; `ok[i]` says whether request i met it."""
    n = math.ceil(duration / window_s)
    good, total = [0] * n, [0] * n
    for r, met in zip(requests, ok):
        i = min(int(r.arrival // window_s), n - 1)
        total[i] += 1
        good[i] += met
    return list(zip(good, total))


def attainment(counts: list[tuple[int, int]], window_s: float,
               span: int = 1) -> list[tuple[float, float | None]]:
    """(start, fraction meeting SLO) of windows `span` counts wide, one per count."""
    out = []
    for i in range(len(counts) - span + 1):
        good = sum(g for g, _ in counts[i:i + span])
        total = sum(t for _, t in counts[i:i + span])
        out.append((i * window_s, good / total if total else None))
    return out


def recovery_s(rolling: list[tuple[float, float | None]], step_at: float, horizon_s: float,
               target: float) -> float | None:
    """Seconds after `step_at` from which attainment stays >= `target` to the horizon.

    `rolling` is attainment over sliding windows; 0 when it never fell below the target in
    the horizon, None when it is still below at the horizon's end.
    """
    after = [(t, a) for t, a in rolling if step_at <= t <= step_at + horizon_s]
    recovered = None
    for t, a in reversed(after):
        if a is not None and a < target:
            break
        recovered = t
    return None if recovered is None else recovered - step_at


def pool_summary(requests: list[Request], ok: list[bool], duration: float) -> dict:
    """Goodput, attainment and latency percentiles of one pool."""
    ttfts = [r.first_token - r.arrival for r in requests if r.first_token is not None]
    tpots = [t for t in map(tpot, requests) if t is not None]
    good = sum(ok)
    return {"requests": len(requests), "goodput_rps": good / duration,
            "slo_attainment": good / len(requests) if requests else None,
            "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p90_s": percentile(ttfts, 0.9),
            "itl_p50_s": percentile(tpots, 0.5), "itl_p90_s": percentile(tpots, 0.9),
            "unfinished": sum(r.finish is None for r in requests),
            "aborted": sum(r.aborted for r in requests)}


def summarize(result: SimResult, slos: dict[str, PoolSLO], gpus_per_engine: int,
              step_at_s: float | None = None, window_s: float = 60.0,
              fine_window_s: float = 10.0, recovery_target: float = 0.9,
              recovery_horizon_s: float = 600.0, shifts: tuple[float, ...] = ()) -> dict:
    """The JSON-ready report of one run; recovery is measured after a step or each shift."""
    reqs, d = result.requests, result.duration_s
    ok = [meets(r, slos[r.pool]) for r in reqs]
    good = sum(ok)
    gpu_hours = result.allocated_engine_s * gpus_per_engine / 3600
    fine = window_counts(reqs, ok, d, fine_window_s)
    span = int(window_s / fine_window_s)
    report = {
        "requests": len(reqs), "goodput_rps": good / d, "offered_rps": len(reqs) / d,
        "slo_attainment": good / len(reqs) if reqs else None,
        "gpu_hours_allocated": gpu_hours,
        "gpu_hours_busy": result.busy_engine_s * gpus_per_engine / 3600,
        "goodput_per_gpu_hour": good / gpu_hours if gpu_hours else None,
        "engine_moves": result.engine_moves,
        "streams_resumed": result.resumed,
        "pools": {p: pool_summary([r for r in reqs if r.pool == p],
                                  [m for r, m in zip(reqs, ok) if r.pool == p], d)
                  for p in POOLS},
        "attainment_windows": attainment(window_counts(reqs, ok, d, window_s), window_s),
        "allocation_timeline": [[t, alloc] for t, alloc in result.timeline[::6]],
    }
    prefix = sum(r.prefix for r in reqs)
    if prefix:
        prompt = sum(r.prompt for r in reqs)
        cached = sum(r.cached for r in reqs)
        report["prefix"] = {"hit_rate": cached / prefix, "cached_share_of_prompts":
                            cached / prompt if prompt else 0.0}
    if step_at_s is not None:
        report.update(_after_step(reqs, ok, attainment(fine, fine_window_s, span), step_at_s,
                                  d, recovery_horizon_s, recovery_target))
    if shifts:
        rolling = attainment(fine, fine_window_s, span)
        report["recovery_after_shift_s"] = [recovery_s(rolling, t, recovery_horizon_s,
                                                       recovery_target) for t in shifts]
    return report


def _after_step(reqs: list[Request], ok: list[bool], rolling: list, step_at_s: float,
                duration: float, horizon_s: float, target: float) -> dict:
    after = [a for t, a in rolling if step_at_s <= t <= step_at_s + horizon_s]
    late = [m for r, m in zip(reqs, ok) if r.arrival >= step_at_s]
    return {"recovery_s": recovery_s(rolling, step_at_s, horizon_s, target),
            "min_attainment_after_step": min((a for a in after if a is not None), default=None),
            "goodput_after_step_rps": sum(late) / (duration - step_at_s)}
