"""A clairvoyant reference: the split that the trace's own future asks for.

No policy can run this: it reads every request of the trace, lengths included, before they
arrive. It answers the question the targets leave open, whether this budget can carry this
traffic at all: where it keeps 95 % of requests within SLO, some policy can, and what a
causal policy (ours) falls short of it by is what that policy does not know or does not
measure, not a lack of engines.

Each role's need over time comes from the requests themselves (`capacity.request_cost`):
prefill, the engine-seconds of the prompts arriving, averaged over `smooth_s`; decode, the
streams alive, each holding 1/`max_running` of an engine from its arrival for as long as it
lasts at a full batch's step. Every `every_s` it keeps its split while that covers, at
`utilisation`, each role's highest need over the next `lead_s` (a drain and a cold start with
some margin: what it gives up now is gone at once, what it asks for serves that much later);
otherwise it takes the split of the budget that covers it best (the fewest moves among
equals). A heuristic with foresight, not an optimum: where a causal policy beats it (bursts
shorter than a cold start, which it chases), that says nothing against the policy.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from autoscaling.metrics import Key, RoleMetrics
from autoscaling.perf import PerfModel
from autoscaling.simulator.capacity import KEYS, request_cost, splits
from autoscaling.simulator.workload import Request


def role_needs(requests: list[Request], perf: PerfModel, seconds: int,
               smooth_s: float = 30.0) -> dict[Key, np.ndarray]:
    """Engines each (pool, role) needs at full utilisation, per second of `seconds`."""
    need = {k: np.zeros(seconds) for k in KEYS}
    for r in requests:
        i = min(int(r.arrival), seconds - 1)
        prefill, stream = request_cost(perf, r.prompt, r.output)
        need[(r.pool, "prefill")][i] += prefill
        end = min(seconds, i + max(1, math.ceil(stream)))
        need[(r.pool, "decode")][i:end] += 1.0 / perf.max_running
    width = max(1, int(smooth_s))
    kernel = np.ones(width) / width
    for key in KEYS:
        if key[1] == "prefill":
            need[key] = np.convolve(need[key], kernel, mode="same")
    return need


class HindsightController:
    """Targets from the trace's future (see the module's docstring)."""

    name = "hindsight"

    def __init__(self, split: Mapping[Key, int], requests: list[Request], perf: PerfModel,
                 budget: int, duration_s: float, lead_s: float | None = None,
                 utilisation: float = 0.85, every_s: float = 10.0):
        self.lead = int(lead_s if lead_s is not None
                        else perf.drain_timeout_s + perf.cold_start_s + 30.0)
        self.need = role_needs(requests, perf, int(duration_s) + self.lead + 2)
        self.choices = splits(budget)
        self.current, self.utilisation, self.every_s = dict(split), utilisation, every_s
        self.next_at = 0.0

    def targets(self, now: float, metrics: Mapping[Key, RoleMetrics]) -> dict[Key, int]:
        """The split kept, or the one that covers the coming need best."""
        if now < self.next_at:
            return dict(self.current)
        self.next_at = now + self.every_s
        t = int(now)
        want = {k: max(float(v[t:t + self.lead + 1].max(initial=0.0)) / self.utilisation, 1e-6)
                for k, v in self.need.items()}

        def cover(alloc: Mapping[Key, int]) -> float:
            return min(alloc[k] / want[k] for k in KEYS)

        if cover(self.current) < 1.0:
            best = max(self.choices, key=lambda a: (
                cover(a), -sum(abs(a[k] - self.current[k]) for k in KEYS)))
            if cover(best) > cover(self.current):
                self.current = best
        return dict(self.current)
