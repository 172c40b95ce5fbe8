"""Scaling policies and the GPU-budget arbiter on crafted metrics, with an injected clock."""

from __future__ import annotations

import random

import pytest

from autoscaling.arbiter import BudgetError, arbitrate
from autoscaling.policy import (PolicySettings, PolicyState, RoleMetrics, decide, decode_wish,
                                prefill_wish)

S = PolicySettings(ttft_slo_s=2.5, itl_slo_s=0.05, kv_target_utilisation=0.75, max_replicas=8,
                   upscale_delay_s=15, downscale_delay_s=120)


def test_prefill_drains_the_queue_within_half_the_ttft_slo():
    m = RoleMetrics(replicas=1, queued_prompt_tokens=100_000, prefill_tokens_per_s=20_000)
    assert prefill_wish(m, S) == 4  # 20k tok/s x 1.25 s = 25k tokens per replica
    assert prefill_wish(RoleMetrics(replicas=3, prefill_tokens_per_s=20_000), S) == 1
    assert prefill_wish(RoleMetrics(replicas=2, queued_prompt_tokens=10**9,
                                    prefill_tokens_per_s=1_000), S) == S.max_replicas


def test_a_missed_slo_asks_for_one_more_replica():
    fine = RoleMetrics(replicas=2, queued_prompt_tokens=1_000, prefill_tokens_per_s=20_000)
    late = RoleMetrics(replicas=2, queued_prompt_tokens=1_000, prefill_tokens_per_s=20_000,
                       ttft_p90_s=4.0)
    assert prefill_wish(fine, S) == 1 and prefill_wish(late, S) == 3
    slow = RoleMetrics(replicas=3, kv_tokens_used=10_000, kv_capacity_per_replica=100_000,
                       itl_p90_s=0.09)
    assert decode_wish(slow, S) == 4


def test_decode_holds_kv_at_the_target_utilisation():
    m = RoleMetrics(replicas=2, kv_tokens_used=300_000, kv_capacity_per_replica=100_000)
    assert decode_wish(m, S) == 4  # 300k / (100k x 0.75)
    assert decode_wish(RoleMetrics(replicas=4, kv_capacity_per_replica=100_000), S) == 1


def test_moves_only_after_the_wish_held_for_its_delay():
    state = PolicyState(2)
    state = decide(4, state, S, now=0.0)
    assert state.replicas == 2
    state = decide(5, state, S, now=10.0)
    assert state.replicas == 2 and state.wish == 4  # the smaller upward wish is kept
    state = decide(4, state, S, now=15.0)
    assert state.replicas == 4
    state = decide(1, state, S, now=20.0)
    state = decide(1, state, S, now=100.0)
    assert state.replicas == 4  # downscale waits 120 s
    state = decide(6, state, S, now=110.0)  # a flip restarts the clock
    assert state.replicas == 4 and state.since == 110.0
    assert decide(6, state, S, now=125.0).replicas == 6


def run_noisy(settings: PolicySettings, seconds: int = 900) -> list[int]:
    """Stationary load with ±25 % noise, one decision per second."""
    rng, state, counts = random.Random(7), PolicyState(4), []
    for t in range(seconds):
        used = int(300_000 * (1 + rng.uniform(-0.25, 0.25)))
        m = RoleMetrics(replicas=state.replicas, kv_tokens_used=used,
                        kv_capacity_per_replica=100_000)
        state = decide(decode_wish(m, settings), state, settings, now=float(t))
        counts.append(state.replicas)
    return counts


def changes(counts: list[int]) -> int:
    return sum(a != b for a, b in zip(counts, counts[1:]))


def test_no_oscillation_under_noisy_stationary_load():
    damped = run_noisy(S)
    undamped = run_noisy(S.model_copy(update={"upscale_delay_s": 0, "downscale_delay_s": 0}))
    assert changes(undamped) > 20, "the noise must be able to move an undamped policy"
    assert changes(damped) <= 2
    assert set(damped[-300:]) <= {4, 5}


KEYS = [("fast", "prefill"), ("fast", "decode"), ("deep", "prefill"), ("deep", "decode")]
MINIMUMS = dict.fromkeys(KEYS, 1)


def test_arbiter_respects_the_budget_under_contention_by_priority():
    wishes = {("fast", "prefill"): 2, ("fast", "decode"): 4, ("deep", "prefill"): 3,
              ("deep", "decode"): 5}
    alloc = arbitrate(wishes, MINIMUMS, {"fast": 2, "deep": 1}, budget=8)
    assert sum(alloc.values()) == 8
    assert alloc[("fast", "prefill")] == 2 and alloc[("fast", "decode")] == 4
    assert alloc[("deep", "prefill")] + alloc[("deep", "decode")] == 2
    assert all(alloc[k] >= 1 for k in KEYS)


def test_arbiter_gives_what_is_wished_when_it_fits_and_never_more():
    wishes = dict.fromkeys(KEYS, 1) | {("deep", "decode"): 3}
    alloc = arbitrate(wishes, MINIMUMS, {"fast": 1, "deep": 1}, budget=8)
    assert alloc == wishes


def test_overrides_are_pinned_and_the_rest_share_what_is_left():
    wishes = dict.fromkeys(KEYS, 4)
    alloc = arbitrate(wishes, MINIMUMS, {"fast": 1, "deep": 1}, budget=8,
                      overrides={("deep", "decode"): 3})
    assert alloc[("deep", "decode")] == 3 and sum(alloc.values()) == 8
    with pytest.raises(BudgetError, match="need 9 engines; the budget is 8"):
        arbitrate(wishes, MINIMUMS, {}, budget=8, overrides={("deep", "decode"): 6})
