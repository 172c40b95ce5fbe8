"""One settings root for a simulated benchmark, and the runs it describes: every controller on
every trace, the same requests (same seed) for each controller.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field

from autoscaling.arbiter import ArbiterSettings
from autoscaling.metrics import Key
from autoscaling.perf import PerfModel
from autoscaling.policy import PolicySettings
from autoscaling.ray_default import RayAutoscalingConfig
from autoscaling.simulator.capacity import KEYS, best_split
from autoscaling.simulator.controllers import (Controller, RayDefaultController, SloController,
                                               StaticController)
from autoscaling.simulator.hindsight import HindsightController
from autoscaling.simulator.prefix import PrefixModel
from autoscaling.simulator.planner import PlannerController, PlannerSettings
from autoscaling.simulator.report import PoolSLO, summarize
from autoscaling.simulator.sim import Simulation
from autoscaling.simulator.workload import (Request, Trace, TraceKind, Workload, arrivals,
                                            make_trace)

# `hindsight` reads the trace's future: a reference for what the budget can carry, no policy
CONTROLLERS = ("static", "ray_default", "planner", "ours", "hindsight")


def _split(fast_p: int, fast_d: int, deep_p: int, deep_d: int) -> dict[str, int]:
    return {"fast/prefill": fast_p, "fast/decode": fast_d, "deep/prefill": deep_p,
            "deep/decode": deep_d}


class SimSettings(BaseModel):
    """Everything a simulated run depends on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    perf: PerfModel = PerfModel()
    workload: Workload = Workload()
    budget_engines: int = Field(8, gt=0)
    static_split: dict[str, int] = _split(1, 2, 2, 3)
    # each "pool/role"'s (min_replicas, max_replicas) under our policy; unset: 1 to the budget
    bounds: dict[str, tuple[int, int]] = {}
    slos: dict[str, PoolSLO] = {"fast": PoolSLO(ttft_s=1.0, itl_s=0.05),
                                "deep": PoolSLO(ttft_s=4.0, itl_s=0.06)}
    priorities: dict[str, int] = {"fast": 2, "deep": 1}
    policy: PolicySettings = PolicySettings()
    arbiter: ArbiterSettings = ArbiterSettings()
    planner: PlannerSettings = PlannerSettings()
    # Ray's defaults; at most 5 replicas each, the budget less the other three's minimum
    ray: RayAutoscalingConfig = RayAutoscalingConfig(max_replicas=5)
    tick_s: float = Field(1.0, gt=0)
    # The stack's prefill attempt deadline (kv_handoff.prefill_timeout_s and
    # prefill_tokens_per_s_floor): a prompt still queued past it is dropped with an error.
    prefill_timeout_s: float | None = Field(60.0, gt=0)
    prefill_tokens_per_s_floor: float = Field(2000.0, gt=0)
    grace_s: float = Field(120.0, ge=0)
    prefix: PrefixModel = PrefixModel()  # off (share 0) unless asked for

    def split(self) -> dict[Key, int]:
        """The static split as (pool, role) keys."""
        return {tuple(k.split("/")): n for k, n in self.static_split.items()}


def make_controller(name: str, s: SimSettings, requests: list[Request] | None = None,
                    duration_s: float = 0.0) -> Controller:
    """A fresh controller called `name`, starting from the static split; `hindsight` is given
    the trace's `requests` (and its duration) before they arrive."""
    split = s.split()
    if name == "static":
        return StaticController(split)
    if name == "ray_default":
        return RayDefaultController(split, dict.fromkeys(KEYS, s.ray))
    if name == "planner":
        slos = {p: (v.ttft_s, v.itl_s) for p, v in s.slos.items()}
        return PlannerController(split, s.perf, slos, s.budget_engines, s.planner)
    if name == "ours":
        policies = {k: s.policy.model_copy(update={
            "ttft_slo_s": s.slos[k[0]].ttft_s, "itl_slo_s": s.slos[k[0]].itl_s,
            **_bounds(s, k)}) for k in KEYS}
        return SloController(split, policies, s.priorities, s.budget_engines, s.arbiter)
    if name == "hindsight":
        if requests is None:
            raise ValueError("the hindsight controller needs the trace's requests")
        return HindsightController(split, requests, s.perf, s.budget_engines, duration_s)
    raise KeyError(f"unknown controller {name!r}; known: {', '.join(CONTROLLERS)}")


def _bounds(s: SimSettings, key: Key) -> dict[str, int]:
    lowest, highest = s.bounds.get("/".join(key), (s.policy.min_replicas, s.budget_engines))
    return {"min_replicas": lowest, "max_replicas": min(highest, s.budget_engines)}


def role_slos(s: SimSettings) -> dict[Key, float]:
    """Each role's latency objective as its workers' windows count it."""
    return {(p, r): slo.ttft_s if r == "prefill" else slo.itl_s
            for p, slo in s.slos.items() for r in ("prefill", "decode")}


def capacity_rps(s: SimSettings, workload: Workload | None = None) -> float:
    """Requests/s the budget carries at full utilisation with its best split, for the
    settings' workload or `workload`."""
    return _capacity(s.perf, workload or s.workload, s.budget_engines)


@lru_cache(maxsize=64)
def _capacity(perf: PerfModel, workload: Workload, budget: int) -> float:
    return best_split(perf, workload, budget)[1]


def run(trace_kind: TraceKind, controller: str, s: SimSettings, seed: int = 0,
        duration_s: float | None = None, capacity: float | None = None) -> dict:
    """Simulate one controller on one synthetic trace; the report of `summarize`."""
    capacity = capacity or capacity_rps(s)
    trace = make_trace(trace_kind, capacity, s.workload, duration_s, seed,
                       capacity_of=lambda w: capacity_rps(s, w))
    return run_trace(trace, controller, s, seed)


def run_trace(trace: Trace, controller: str, s: SimSettings, seed: int = 0) -> dict:
    """Simulate one controller on `trace` (drawn with `seed`, or replayed from a file)."""
    requests = arrivals(trace, s.workload, seed)
    chosen = make_controller(controller, s, requests, trace.duration_s)
    sim = Simulation(requests, chosen, s.perf, s.budget_engines,
                     s.split(), trace.duration_s, s.tick_s, grace_s=s.grace_s,
                     slos=role_slos(s), prefill_deadline=None if s.prefill_timeout_s is None
                     else (s.prefill_timeout_s, s.prefill_tokens_per_s_floor),
                     prefix=s.prefix)
    return summarize(sim.run(), s.slos, s.perf.gpus_per_engine, trace.step_at_s,
                     shifts=trace.shifts)
