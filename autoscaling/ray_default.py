"""A model of Ray Serve's default autoscaling policy, for comparison in the simulator.

Follows `ray.serve.autoscaling_policy` (Ray 2.60): replicas record their ongoing requests
(running and queued) every 2 s and push them every 10 s; the controller averages the total over
the look-back window (30 s, mean) and wishes `total / target_ongoing_requests` replicas; scaling
factors scale the step; the wish must hold in one direction for `upscale_delay_s` (30 s) or
`downscale_delay_s` (600 s) measured from the first consecutive decision, and the result is
clipped to the bounds. Each deployment decides alone: nothing here knows the GPU budget, so
replicas the cluster cannot place stay pending.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pydantic import BaseModel, ConfigDict, Field

DELAY_EPS_S = 1e-6


class RayAutoscalingConfig(BaseModel):
    """The fields of Ray Serve's `AutoscalingConfig` that the default policy reads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_ongoing_requests: float = Field(2.0, gt=0)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(8, ge=1)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    downscale_to_zero_delay_s: float | None = None
    look_back_period_s: float = Field(30.0, gt=0)
    record_interval_s: float = Field(2.0, gt=0)
    push_interval_s: float = Field(10.0, gt=0)
    upscaling_factor: float = Field(1.0, gt=0)
    downscaling_factor: float = Field(1.0, gt=0)


@dataclass(frozen=True)
class RayPolicyState:
    """The last target, the recorded ongoing-request samples, and the delay counter."""

    target: int
    samples: tuple[tuple[float, float], ...] = ()
    decision_counter: int = 0
    decision_timestamp: float | None = None


def record(state: RayPolicyState, total_requests: float, now: float,
           config: RayAutoscalingConfig) -> RayPolicyState:
    """Record a sample of ongoing requests when the record interval has passed."""
    if state.samples and now - state.samples[-1][0] < config.record_interval_s - DELAY_EPS_S:
        return state
    horizon = now - config.look_back_period_s - config.push_interval_s
    kept = tuple(s for s in state.samples if s[0] >= horizon)
    return replace(state, samples=kept + ((now, float(total_requests)),))


def total_num_requests(state: RayPolicyState, now: float, config: RayAutoscalingConfig) -> float:
    """Mean of the pushed samples over the look-back window (what the controller sees)."""
    pushed = math.floor(now / config.push_interval_s) * config.push_interval_s
    window = [v for t, v in state.samples
              if t <= pushed + DELAY_EPS_S and t > pushed - config.look_back_period_s]
    return sum(window) / len(window) if window else 0.0


def ray_default_policy(running_replicas: int, state: RayPolicyState,
                       config: RayAutoscalingConfig, now: float) -> tuple[int, RayPolicyState]:
    """The next target replica count of one deployment, and the state to carry."""
    total = total_num_requests(state, now, config)
    if running_replicas == 0:
        if total > 0:  # cold start fast path
            up = max(math.ceil(config.upscaling_factor), state.target)
            return _bounded(up, config), replace(state, target=_bounded(up, config))
        return state.target, state
    desired = total / config.target_ongoing_requests
    desired = _scaled(desired, running_replicas, config)
    decision, state = _delayed(max(0, desired), state, config, now)
    decision = _bounded(decision, config)
    return decision, replace(state, target=decision)


def _bounded(n: int, config: RayAutoscalingConfig) -> int:
    return max(config.min_replicas, min(config.max_replicas, n))


def _scaled(desired: float, current: int, config: RayAutoscalingConfig) -> int:
    """Ray's `_apply_scaling_factors`."""
    delta = desired - current
    factor = config.upscaling_factor if delta > 0 else config.downscaling_factor
    scaled = math.ceil(current + factor * delta)
    if math.ceil(desired) < current and scaled == current:
        scaled -= 1
    return scaled


def _delayed(desired: int, state: RayPolicyState, config: RayAutoscalingConfig,
             now: float) -> tuple[int, RayPolicyState]:
    """Ray's `_apply_delay_logic`: time-based, reset when the direction flips."""
    counter, stamp, target = state.decision_counter, state.decision_timestamp, state.target
    decision = target
    if desired > target:
        if counter < 0:
            counter, stamp = 0, None
        counter += 1
        stamp = now if stamp is None else stamp
        if now - stamp + DELAY_EPS_S >= config.upscale_delay_s:
            counter, stamp, decision = 0, None, desired
    elif desired < target:
        if counter > 0:
            counter, stamp = 0, None
        counter -= 1
        delay = config.downscale_delay_s
        if target == 1 and config.downscale_to_zero_delay_s is not None:
            delay = config.downscale_to_zero_delay_s
        elif target != 1:
            desired = max(1, desired)
        stamp = now if stamp is None else stamp
        if now - stamp + DELAY_EPS_S >= delay:
            counter, stamp, decision = 0, None, desired
    else:
        counter, stamp = 0, None
    return decision, replace(state, decision_counter=counter, decision_timestamp=stamp)
