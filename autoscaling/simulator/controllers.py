"""Who decides the engines per pool-and-role in a simulation: a static split, Ray Serve's
default policy per deployment, or our SLO policies under the GPU-budget arbiter.

Each is called once per tick with the metrics of every pool-and-role and returns targets; the
policies themselves are the pure functions the Serve adapter calls, state carried here.
"""

from __future__ import annotations

from typing import Mapping, Protocol

from autoscaling.arbiter import ArbiterSettings, ArbiterState, arbitrate
from autoscaling.metrics import Key, RoleMetrics
from autoscaling.policy import PolicySettings, PolicyState, decode_wish, prefill_wish
from autoscaling.ray_default import (RayAutoscalingConfig, RayPolicyState, ray_default_policy,
                                     record)


class Controller(Protocol):
    """Targets per (pool, role) from the current metrics; called once per tick."""

    name: str

    def targets(self, now: float, metrics: Mapping[Key, RoleMetrics]) -> dict[Key, int]:
        """Engines each (pool, role) should have."""


class StaticController:
    """A fixed split that never moves."""

    def __init__(self, split: Mapping[Key, int], name: str = "static"):
        self.split, self.name = dict(split), name

    def targets(self, now: float, metrics: Mapping[Key, RoleMetrics]) -> dict[Key, int]:
        """The split, always."""
        return dict(self.split)


class RayDefaultController:
    """Ray Serve's default policy, one deployment per (pool, role), each deciding alone."""

    name = "ray_default"

    def __init__(self, split: Mapping[Key, int], configs: Mapping[Key, RayAutoscalingConfig]):
        self.configs = dict(configs)
        self.states = {k: RayPolicyState(target=n) for k, n in split.items()}

    def targets(self, now: float, metrics: Mapping[Key, RoleMetrics]) -> dict[Key, int]:
        """Each deployment's target from its ongoing (running and queued) requests."""
        out = {}
        for key, m in metrics.items():
            cfg = self.configs[key]
            state = record(self.states[key], m.running_requests + m.queued_requests, now, cfg)
            out[key], self.states[key] = ray_default_policy(m.replicas, state, cfg, now)
        return out


class SloController:
    """Prefill and decode SLO policies per (pool, role), fitted into the budget."""

    name = "ours"

    def __init__(self, split: Mapping[Key, int], settings: Mapping[Key, PolicySettings],
                 priorities: Mapping[str, int], budget: int,
                 arbiter: ArbiterSettings = ArbiterSettings(),
                 overrides: Mapping[Key, int] | None = None):
        self.settings, self.priorities, self.budget = dict(settings), dict(priorities), budget
        self.arbiter, self.overrides = arbiter, dict(overrides or {})
        self.states = {k: PolicyState(n) for k, n in split.items()}
        self.arbiter_state = ArbiterState()
        self.wishes: dict = {}

    def targets(self, now: float, metrics: Mapping[Key, RoleMetrics]) -> dict[Key, int]:
        """Wishes of every (pool, role), arbitrated."""
        for key, m in metrics.items():
            policy = prefill_wish if key[1] == "prefill" else decode_wish
            self.wishes[key], self.states[key] = policy(m, self.settings[key], self.states[key],
                                                        now)
        current = {k: m.replicas + m.starting for k, m in metrics.items()}
        alloc, self.arbiter_state = arbitrate(self.wishes, self.budget, self.priorities,
                                              current, self.arbiter_state, now, self.overrides,
                                              self.arbiter)
        return alloc
