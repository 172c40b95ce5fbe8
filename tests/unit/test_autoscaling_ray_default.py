"""The model of Ray Serve's default policy: its formula and delays, checked against Ray's own
delay and scaling-factor code on the same inputs."""

from __future__ import annotations

import random
import warnings

from pydantic.warnings import PydanticDeprecatedSince20

from autoscaling.ray_default import (RayAutoscalingConfig, RayPolicyState, _delayed, _scaled,
                                     ray_default_policy, record, total_num_requests)

CFG = RayAutoscalingConfig(max_replicas=5)


def feed(state: RayPolicyState, running: int, total: float, t0: float, t1: float):
    """Record `total` ongoing requests and decide every second from t0 to t1."""
    target = state.target
    for t in range(int(t0), int(t1)):
        state = record(state, total, float(t), CFG)
        target, state = ray_default_policy(running, state, CFG, float(t))
    return target, state


def test_wishes_total_ongoing_over_the_target_after_the_upscale_delay():
    state = RayPolicyState(target=2)
    target, state = feed(state, 2, 8.0, 0, 30)
    assert target == 2  # the wish first appeared at t=0; at t=29 it has not held 30 s
    target, state = feed(state, 2, 8.0, 30, 31)
    assert target == 4  # 8 ongoing / 2 per replica


def test_the_bounds_clip_and_the_downscale_waits_600_s():
    state = RayPolicyState(target=3)
    target, state = feed(state, 3, 100.0, 0, 60)
    assert target == 5  # max_replicas
    target, state = feed(state, 5, 0.5, 60, 650)
    assert target == 5
    target, state = feed(state, 5, 0.5, 650, 700)
    assert target == 1


def test_the_look_back_is_the_mean_of_pushed_samples():
    state = RayPolicyState(target=1)
    for t, v in [(0, 2.0), (2, 4.0), (4, 6.0), (12, 100.0)]:
        state = record(state, v, float(t), CFG)
    assert total_num_requests(state, 10.0, CFG) == 4.0  # the t=12 sample is not pushed yet
    assert total_num_requests(state, 20.0, CFG) == 28.0


def test_the_delay_logic_and_scaling_factors_match_rays_own():
    with warnings.catch_warnings():  # Ray's own config models still use pydantic v1 APIs
        warnings.simplefilter("ignore", PydanticDeprecatedSince20)
        from ray.serve._private.constants import (SERVE_AUTOSCALING_DECISION_COUNTERS_KEY,
                                                  SERVE_AUTOSCALING_DECISION_TIMESTAMP_KEY)
        from ray.serve.autoscaling_policy import _apply_delay_logic, _apply_scaling_factors
        from ray.serve.config import AutoscalingConfig

    rng = random.Random(5)
    ray_cfg = AutoscalingConfig(min_replicas=1, max_replicas=5, upscale_delay_s=30,
                                downscale_delay_s=600)
    ours, theirs, target = RayPolicyState(target=2), {}, 2
    for step in range(3000):
        now = step * rng.choice([0.1, 1.0, 7.0])
        desired = rng.choice([target - 1, target, target + 1, target + 3, 1])
        mine, ours = _delayed(desired, RayPolicyState(target, (), ours.decision_counter,
                                                      ours.decision_timestamp), CFG, now)
        ray, theirs = _apply_delay_logic(desired, target, ray_cfg, dict(theirs), _now=now)
        assert mine == ray, (step, desired, target)
        assert ours.decision_counter == theirs[SERVE_AUTOSCALING_DECISION_COUNTERS_KEY]
        assert ours.decision_timestamp == theirs[SERVE_AUTOSCALING_DECISION_TIMESTAMP_KEY]
        target = max(1, min(5, mine))
    for desired, current in [(7.3, 3), (1.2, 3), (2.9, 3), (3.0, 3)]:
        assert _scaled(desired, current, CFG) == _apply_scaling_factors(desired, current,
                                                                        ray_cfg)


def test_zero_running_replicas_take_the_cold_start_path():
    state = record(RayPolicyState(target=0), 3.0, 0.0, CFG)
    target, _ = ray_default_policy(0, state, CFG, 10.0)
    assert target == 1
