"""What the cluster can carry: engine-seconds per request for each pool and role, and the
best split of the budget for a workload's mix, from the performance model alone.

Prefill costs a request's prompt at the engine's batch rate (a full batch amortises the
overhead); decode costs its output tokens at the step time of a full batch at the pool's mean
context, shared by the batch. The capacity of a split is the request rate at which its most
loaded pool-and-role reaches full utilisation; the traces are fractions of the best split's.
"""

from __future__ import annotations

import itertools

import numpy as np

from autoscaling.metrics import Key
from autoscaling.perf import PerfModel
from autoscaling.simulator.workload import POOLS, Workload, sample_lengths

KEYS: tuple[Key, ...] = tuple((p, r) for p in POOLS for r in ("prefill", "decode"))


def engine_seconds_per_request(perf: PerfModel, workload: Workload,
                               samples: int = 20_000) -> dict[Key, float]:
    """Mean engine-seconds one request of each pool costs in each role."""
    rng = np.random.default_rng(12345)
    cost: dict[Key, float] = {}
    for pool in POOLS:
        prompts, outputs = sample_lengths(workload.lengths(pool), samples, rng)
        flops = np.mean([perf.prompt_flops(int(n)) for n in prompts[:2000]])
        per_batch = perf.prefill_batch_overhead_s * prompts.mean() / perf.max_batched_tokens
        cost[(pool, "prefill")] = flops / perf.prefill_flops_per_s + per_batch
        context = perf.max_running * (prompts.mean() + outputs.mean() / 2)
        step = perf.decode_step_s(perf.max_running, context)
        cost[(pool, "decode")] = outputs.mean() * step / perf.max_running
    return cost


def best_split(perf: PerfModel, workload: Workload, budget: int,
               minimum: int = 1) -> tuple[dict[Key, int], float]:
    """The split of `budget` engines that carries the most requests/s, and that rate."""
    demand = {k: c * workload.share(k[0])
              for k, c in engine_seconds_per_request(perf, workload).items()}
    best, best_rps = None, -1.0
    for alloc in splits(budget, minimum):
        rps = split_capacity(alloc, demand)
        if rps > best_rps:
            best, best_rps = alloc, rps
    return best, best_rps


def splits(budget: int, minimum: int = 1) -> list[dict[Key, int]]:
    """Every split of `budget` engines over the pools and roles, each at least `minimum`."""
    return [dict(zip(KEYS, split))
            for split in itertools.product(range(minimum, budget + 1), repeat=len(KEYS))
            if sum(split) == budget]


def split_capacity(alloc: dict[Key, int], demand: dict[Key, float]) -> float:
    """Requests/s a split carries at full utilisation, given engine-seconds per request."""
    return min(alloc[k] / d for k, d in demand.items() if d > 0)


def request_cost(perf: PerfModel, prompt: int, output: int) -> tuple[float, float]:
    """One request's prefill engine-seconds (at the batch rate) and how long its stream lasts
    at a full batch's step at its mean context; the stream holds 1/`max_running` of an
    engine for that long."""
    prefill = (perf.prompt_flops(prompt) / perf.prefill_flops_per_s
               + perf.prefill_batch_overhead_s * prompt / perf.max_batched_tokens)
    context = perf.max_running * (prompt + output / 2)
    return prefill, output * perf.decode_step_s(perf.max_running, context)


def _spread(load: np.ndarray, start: float, end: float, window_s: float, weight: float) -> None:
    """Add `weight` × the seconds of [start, end) that fall in each window (what is past the
    last window is after the traffic: not counted)."""
    i = int(start // window_s)
    while i < len(load) and i * window_s < end:
        load[i] += weight * (min(end, (i + 1) * window_s) - max(start, i * window_s))
        i += 1


def demand_peaks(perf: PerfModel, requests: list,
                 window_s: float = 300.0) -> tuple[dict[Key, float], float]:
    """Each (pool, role)'s busiest `window_s` in engines at full utilisation, from the
    requests' own lengths (prefill at the batch rate, decode at a full batch's step at the
    request's mean context): what a split fixed for this traffic must hold; and the busiest
    `window_s` of all roles together: what a budget that follows the load must hold."""
    if not requests:
        return dict.fromkeys(KEYS, 0.0), 0.0
    end = max(r.arrival for r in requests)
    bins = int(end // window_s) + 1
    load = {k: np.zeros(bins) for k in KEYS}
    last = 0.0  # when the last request's work ends
    for r in requests:
        prefill, stream = request_cost(perf, r.prompt, r.output)
        last = max(last, r.arrival + prefill + stream)
        # one prefill holds one engine while it runs, one stream one slot of an engine after
        # it: each counted in the windows it spans (a request longer than a window holds
        # one engine there, not many at once; a long stream holds its slot in later windows)
        _spread(load[(r.pool, "prefill")], r.arrival, r.arrival + prefill, window_s, 1.0)
        _spread(load[(r.pool, "decode")], r.arrival + prefill, r.arrival + prefill + stream,
                window_s, 1.0 / perf.max_running)
    # the last window's work over the time it covers: up to when the last request's work
    # ends (within the window), not up to the last arrival (a burst at one instant would be
    # divided by nothing) nor the whole window (a short trace's load would be diluted)
    span = np.full(bins, window_s)
    span[-1] = min(window_s, max(last - (bins - 1) * window_s, 1e-3))
    total = sum(v / span for v in load.values())
    return {k: float((v / span).max()) for k, v in load.items()}, float(total.max())
