"""A Dynamo-style planner, as a peer baseline: predicted load per interval → replicas per role
from profiled throughput at the SLO, inside the GPU budget.

Built from the published design of NVIDIA Dynamo's SLA planner (throughput-based scaling), not
from its code. Every `interval_s`:

1. observe, per pool, the request rate, mean input length (ISL) and output length (OSL) over
   the interval, and the mean TTFT and ITL;
2. correction factors: observed TTFT over the profile's TTFT at that ISL (prefill), observed
   ITL over the profile's ITL at the running batch and context (decode);
3. predict the next interval's rate, ISL and OSL (`constant`: the last interval again, the
   simplest of Dynamo's predictors; `trend`: a straight line through the last three);
4. prefill engines = rate x ISL x min(1, prefill correction) / profiled prefill tokens/s per
   engine at that ISL; decode engines = rate x OSL / profiled decode tokens/s per engine at the
   largest batch whose ITL stays under the SLO divided by the decode correction, at a context of
   ISL + OSL/2; both rounded up, at least `min_engines`;
5. over the budget, every role is scaled down in proportion (largest remainders first).

The profile is the simulator's performance model itself (what pre-deployment profiling would
measure on these engines), so the planner is not handicapped by a wrong profile.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from autoscaling.metrics import Key, RoleMetrics
from autoscaling.perf import PerfModel


class PlannerSettings(BaseModel):
    """The planner's interval, predictor and floor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interval_s: float = Field(60.0, gt=0, description="adjustment interval")
    predictor: Literal["constant", "trend"] = "constant"
    min_engines: int = Field(1, ge=0)
    correction: bool = True


@dataclass
class _Interval:
    """Sums over the current interval of one pool's per-tick observations."""

    ticks: int = 0
    rps: float = 0.0
    prompt_tps: float = 0.0
    osl: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    batch: list[float] = field(default_factory=list)


def prefill_tokens_per_s(perf: PerfModel, isl: float) -> float:
    """Profiled prefill throughput of one engine for prompts of `isl` tokens (one at a time,
    as a TTFT sweep measures it)."""
    n = max(int(isl), 1)
    return n / perf.prefill_s([n])


def decode_tokens_per_s(perf: PerfModel, context: float, itl_s: float) -> float:
    """Profiled decode throughput of one engine at the largest batch whose step fits `itl_s`."""
    best = 1 / perf.decode_step_s(1, context)
    for batch in range(1, perf.max_running + 1):
        step = perf.decode_step_s(batch, batch * context)
        if step > itl_s:
            break
        best = batch / step
    return best


def fit_budget(wanted: Mapping[Key, int], budget: int, floor: int) -> dict[Key, int]:
    """`wanted` scaled down in proportion to fit `budget`, each at least `floor`."""
    total = sum(wanted.values())
    if total <= budget:
        return dict(wanted)
    scale = budget / total
    exact = {k: max(floor, n * scale) for k, n in wanted.items()}
    out = {k: max(floor, math.floor(x)) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - out[k], reverse=True):
        if sum(out.values()) >= budget:
            break
        out[k] += 1
    return out


class PlannerController:
    """Dynamo-style throughput planner over every pool's prefill and decode roles."""

    name = "planner"

    def __init__(self, split: Mapping[Key, int], perf: PerfModel, slos: Mapping[str, tuple],
                 budget: int, settings: PlannerSettings = PlannerSettings()):
        self.perf, self.budget, self.settings = perf, budget, settings
        self.slos = dict(slos)  # pool -> (ttft_s, itl_s)
        self.current = dict(split)
        self.pools = sorted({k[0] for k in split})
        self.obs = {p: _Interval() for p in self.pools}
        self.history: dict[str, list[tuple[float, float, float]]] = {p: [] for p in self.pools}
        self.correction = {p: [1.0, 1.0] for p in self.pools}
        self.next_at = settings.interval_s

    def targets(self, now: float, metrics: Mapping[Key, RoleMetrics]) -> dict[Key, int]:
        """Observe every tick; decide once per interval."""
        for pool in self.pools:
            self._observe(pool, metrics[(pool, "prefill")], metrics[(pool, "decode")])
        if now + 1e-9 >= self.next_at:
            self.next_at = now + self.settings.interval_s
            wanted = {}
            for pool in self.pools:
                wanted.update(self._plan(pool))
            self.current = fit_budget(wanted, self.budget, self.settings.min_engines)
        return dict(self.current)

    def _observe(self, pool: str, p: RoleMetrics, d: RoleMetrics) -> None:
        o = self.obs[pool]
        o.ticks += 1
        o.rps += p.arrival_requests_per_s
        o.prompt_tps += p.arrival_prompt_tokens_per_s
        if d.mean_output_tokens:
            o.osl.append(d.mean_output_tokens)
        if p.ttft_p90_s is not None:
            o.ttft.append(p.ttft_p90_s)
        if d.itl_p50_s is not None:
            o.itl.append(d.itl_p50_s)
        if d.replicas:
            o.batch.append(d.running_requests / d.replicas)

    def _plan(self, pool: str) -> dict[Key, int]:
        o, self.obs[pool] = self.obs[pool], _Interval()
        rps = o.rps / max(o.ticks, 1)
        isl = o.prompt_tps / o.rps if o.rps else 0.0
        history = self.history[pool]
        # no output length seen this interval (no stream ended yet): the last one known
        osl = _mean(o.osl) if o.osl else history[-1][2] if history else None
        keep = {(pool, role): self.current[(pool, role)] for role in ("prefill", "decode")}
        if rps <= 0 or osl is None:
            # nothing to size from: Dynamo's planner skips an interval whose metrics are
            # missing rather than sizing a pool with streams still running down to the floor
            return keep
        ttft_slo, itl_slo = self.slos[pool]
        context = isl + osl / 2
        if self.settings.correction:
            if o.ttft:
                self.correction[pool][0] = _mean(o.ttft) / self.perf.prefill_s([max(int(isl), 1)])
            if o.itl and o.batch:
                batch = max(_mean(o.batch), 1.0)
                self.correction[pool][1] = _mean(o.itl) / self.perf.decode_step_s(
                    int(round(batch)), batch * context)
        history.append((rps, isl, osl))
        rps, isl, osl = self._predict(history)
        p_corr, d_corr = self.correction[pool]
        prefill_load = rps * isl * min(1.0, p_corr)
        prefill = math.ceil(prefill_load / prefill_tokens_per_s(self.perf, isl) - 1e-9)
        itl_target = itl_slo / max(d_corr, 1e-6)
        decode = math.ceil(rps * osl / decode_tokens_per_s(self.perf, isl + osl / 2,
                                                           itl_target) - 1e-9)
        floor = self.settings.min_engines
        return {(pool, "prefill"): max(floor, prefill), (pool, "decode"): max(floor, decode)}

    def _predict(self, history: list[tuple[float, float, float]]) -> tuple[float, float, float]:
        if self.settings.predictor == "constant" or len(history) < 3:
            return history[-1]
        first, _, last = history[-3:]  # a straight line through three: half the two-step rise
        rps, isl, osl = (max(0.0, c + (c - a) / 2) for a, c in zip(first, last))
        return rps, isl, osl


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
