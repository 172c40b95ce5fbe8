"""Prefill and decode scaling policies on crafted metrics, with an injected clock."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from pydantic import ValidationError

from autoscaling.metrics import RoleMetrics
from autoscaling.policy import (PolicySettings, PolicyState, decide, decode_wish,
                                prefill_wish)

S = PolicySettings(ttft_slo_s=1.0, itl_slo_s=0.05, max_replicas=8, upscale_delay_s=10,
                   downscale_delay_s=120)
NOW = PolicySettings(max_replicas=8, upscale_delay_s=0, downscale_delay_s=0)  # undamped


def prefill(replicas=1, **kw) -> RoleMetrics:
    return RoleMetrics(replicas=replicas, prefill_tokens_per_s=40_000, **kw)


def decode(replicas=1, **kw) -> RoleMetrics:
    return RoleMetrics(replicas=replicas, max_running_per_replica=128,
                       kv_capacity_per_replica=1_000_000, **kw)


def wish(policy, m: RoleMetrics, s: PolicySettings = NOW) -> int:
    return policy(m, s, PolicyState(m.replicas), 0.0)[0].replicas


def test_prefill_keeps_up_with_arriving_prompt_tokens_at_the_target_utilisation():
    assert wish(prefill_wish, prefill(arrival_prompt_tokens_per_s=100_000)) == 4  # 2.5 / 0.8
    assert wish(prefill_wish, prefill(replicas=4, arrival_prompt_tokens_per_s=20_000)) == 1
    w, _ = prefill_wish(prefill(arrival_prompt_tokens_per_s=100_000), NOW, PolicyState(1), 0.0)
    assert w.load == pytest.approx(2.5)


def test_prefill_adds_replicas_to_drain_a_backlog():
    quiet = prefill(arrival_prompt_tokens_per_s=20_000)
    backlog = prefill(arrival_prompt_tokens_per_s=20_000, queued_prompt_tokens=2_400_000)
    assert wish(prefill_wish, quiet) == 1
    assert wish(prefill_wish, backlog) == 3  # 0.625 + 2.4M / (40k x 30 s) = 2.6


def test_prefill_uses_the_prior_rate_until_it_measures_one_then_tracks_the_envelope():
    unmeasured = RoleMetrics(replicas=1, arrival_prompt_tokens_per_s=100_000)
    s = NOW.model_copy(update={"prior_prefill_tokens_per_s": 10_000})
    assert wish(prefill_wish, unmeasured, s) == 8  # 10 replicas' worth, capped at max
    _, state = prefill_wish(prefill(), s, PolicyState(1), 0.0)
    assert state.estimate == 40_000
    _, state = prefill_wish(RoleMetrics(replicas=1, prefill_tokens_per_s=20_000), s, state, 1.0)
    assert state.estimate == pytest.approx(40_000 - 0.03 * 20_000)  # small batches: slowly
    _, state = prefill_wish(RoleMetrics(replicas=1, prefill_tokens_per_s=50_000), s, state, 2.0)
    assert state.estimate == pytest.approx(39_400 + 0.3 * 10_600)
    _, same = prefill_wish(RoleMetrics(replicas=1), s, state, 3.0)
    assert same.estimate == state.estimate  # nothing prefilled: nothing learned


def test_estimates_move_per_second_not_per_call():
    """Serve calls a policy every 0.1 s, the simulator every second: ten calls 0.1 s apart
    move an estimate as far as one call a second later (per call, production's moved ten
    times as fast, and the slow downward envelope was gone within seconds)."""
    s = NOW
    _, once = prefill_wish(prefill(), s, PolicyState(1), 0.0)
    often = once
    _, once = prefill_wish(RoleMetrics(replicas=1, prefill_tokens_per_s=20_000), s, once, 1.0)
    for step in range(1, 11):
        _, often = prefill_wish(RoleMetrics(replicas=1, prefill_tokens_per_s=20_000), s,
                                often, step / 10)
    assert often.estimate == pytest.approx(once.estimate)
    assert once.estimate == pytest.approx(40_000 - 0.03 * 20_000)
    _, residency = decode_wish(decode(decode_residency_s=10.0), s, PolicyState(1), 0.0)
    for step in range(1, 11):
        _, residency = decode_wish(decode(decode_residency_s=20.0), s, residency, step / 10)
    assert residency.estimate == pytest.approx(10.0 + 0.3 * 10.0)


def test_a_missed_slo_asks_for_one_more_but_not_while_one_is_starting():
    late = prefill(replicas=2, arrival_prompt_tokens_per_s=10_000, queue_wait_p90_s=0.8)
    assert wish(prefill_wish, prefill(replicas=2, arrival_prompt_tokens_per_s=10_000)) == 1
    assert wish(prefill_wish, late) == 3  # 0.8 s wait > half the 1 s TTFT SLO
    starting = prefill(replicas=2, starting=1, arrival_prompt_tokens_per_s=10_000,
                       queue_wait_p90_s=0.8)
    assert wish(prefill_wish, starting) == 1
    slow = decode(replicas=3, running_requests=10, itl_p90_s=0.09)
    assert wish(decode_wish, slow) == 4


def test_decode_holds_concurrency_and_kv_at_their_targets():
    assert wish(decode_wish, decode(running_requests=300, queued_requests=60)) == 4  # 360/108.8
    assert wish(decode_wish, decode(replicas=4, running_requests=20)) == 1
    assert wish(decode_wish, decode(kv_tokens_used=3_000_000)) == 4  # 3M / (1M x 0.8)


def test_decode_sizes_by_profiled_throughput_before_the_batches_fill():
    light = decode(running_requests=40, generated_tokens_per_s=8_000,
                   decode_tokens_per_s_per_replica=5_000)
    assert wish(decode_wish, light) == 2  # 1.6 engines of tokens at 0.85
    surge = decode(running_requests=40, arrival_requests_per_s=30, mean_output_tokens=500,
                   decode_tokens_per_s_per_replica=5_000)
    assert wish(decode_wish, surge) == 4  # 15k tok/s arriving = 3 engines, / 0.85
    # what the arrivals will decode is the recent streams' expectation, not what finished
    shorter = decode(running_requests=40, arrival_requests_per_s=30, mean_output_tokens=500,
                     arriving_output_tokens=100, decode_residency_s=2,
                     decode_tokens_per_s_per_replica=5_000)
    assert wish(decode_wish, shorter) == 1  # 3k tok/s arriving = 0.6 engines, / 0.85
    assert wish(decode_wish, replace(shorter, arriving_output_tokens=0.0)) == 4  # unknown
    little = decode(running_requests=10, arrival_requests_per_s=20, decode_residency_s=20)
    assert wish(decode_wish, little) == 4  # Little: 400 in flight / 108.8 slots


def test_wishes_are_clamped_to_the_bounds():
    s = NOW.model_copy(update={"min_replicas": 2, "max_replicas": 3})
    assert wish(decode_wish, decode(), s) == 2
    assert wish(decode_wish, decode(running_requests=10_000), s) == 3
    with pytest.raises(ValidationError, match="extra"):
        PolicySettings(ttft_slo=1.0)


def test_moves_only_after_the_wish_held_for_its_delay():
    state = decide(4, PolicyState(2), S, now=0.0)
    assert state.replicas == 2 and state.since == 0.0
    state = decide(5, state, S, now=5.0)
    assert state.replicas == 2 and state.since == 0.0  # same direction: the clock keeps running
    state = decide(5, state, S, now=10.0)
    assert state.replicas == 5  # the latest upward wish
    state = decide(1, state, S, now=20.0)
    state = decide(3, state, S, now=100.0)
    state = decide(2, state, S, now=139.0)
    assert state.replicas == 5  # downscale waits 120 s
    state = decide(2, state, S, now=140.0)
    assert state.replicas == 3  # the largest downward wish seen while waiting


def test_a_flip_restarts_the_clock_and_a_met_wish_clears_it():
    state = decide(1, PolicyState(4), S, now=0.0)
    state = decide(6, state, S, now=110.0)
    assert state.replicas == 4 and state.since == 110.0
    assert decide(6, state, S, now=119.0).replicas == 4
    assert decide(6, state, S, now=120.0).replicas == 6
    assert decide(4, state, S, now=115.0).wish is None


def test_load_follows_a_rise_within_seconds_and_a_fall_over_a_minute():
    state, s = PolicyState(2), S
    for t in range(0, 60):
        w, state = decode_wish(decode(replicas=2, running_requests=100), s, state, float(t))
    assert w.load == pytest.approx(100 / 128, rel=0.01)
    for t in range(60, 120):
        w, state = decode_wish(decode(replicas=2, running_requests=400), s, state, float(t))
    assert w.load > 0.95 * 400 / 128
    for t in range(120, 150):
        w, state = decode_wish(decode(replicas=2, running_requests=100), s, state, float(t))
    assert w.load > 0.5 * 400 / 128  # 30 s into a fall, still more than halfway up


def run_noisy(settings: PolicySettings, seconds: int = 900) -> list[int]:
    """Stationary decode load with +-25 % noise, one decision per second."""
    rng, state, counts = random.Random(7), PolicyState(4), []
    for t in range(seconds):
        running = int(380 * (1 + rng.uniform(-0.25, 0.25)))
        m = decode(replicas=state.replicas, running_requests=running)
        _, state = decode_wish(m, settings, state, float(t))
        counts.append(state.replicas)
    return counts


def changes(counts: list[int]) -> int:
    return sum(a != b for a, b in zip(counts, counts[1:]))


def test_no_oscillation_under_noisy_stationary_load():
    damped, undamped = run_noisy(S), run_noisy(NOW)
    assert changes(undamped) > 20, "the noise must be able to move an undamped policy"
    assert changes(damped) <= 2
    assert set(damped[-300:]) <= {4, 5}


def test_prefill_is_damped_too():
    rng, state, counts = random.Random(3), PolicyState(2), []
    for t in range(600):
        m = prefill(replicas=state.replicas,
                    arrival_prompt_tokens_per_s=60_000 * (1 + rng.uniform(-0.3, 0.3)))
        _, state = prefill_wish(m, S, state, float(t))
        counts.append(state.replicas)
    assert changes(counts) <= 2


def test_a_role_that_keeps_seeing_bursts_keeps_room_for_them_and_a_one_off_rise_goes():
    s = PolicySettings(max_replicas=8, upscale_delay_s=0, downscale_delay_s=0, load_rise_s=0,
                       load_fall_s=0, burst_memory_s=300)

    def feed(state, t, tokens_per_s, seconds):
        for _ in range(seconds):
            w, state = prefill_wish(prefill(arrival_prompt_tokens_per_s=tokens_per_s), s,
                                    state, t)
            t += 1
        return w, state, t

    state, t = PolicyState(1), 0.0
    for _ in range(4):  # 20 s at 3 engines of prompts, 100 s at 0.5
        w, state, t = feed(state, t, 120_000, 20)
        w, state, t = feed(state, t, 20_000, 100)
        assert w.load == pytest.approx(0.5)  # what it carries now
        assert w.peak > 2.0 and w.replicas >= 3  # room for the burst it keeps seeing
    assert state.bursts > 2.5  # the first burst has nothing to come back to
    w, state, t = feed(state, t, 20_000, 600)  # a long gap: still held for the next burst
    assert w.replicas >= 3
    w, state, t = feed(state, t, 20_000, 6 * 3600)  # the bursts stopped for good
    assert w.replicas == 1

    w, state, t = feed(PolicyState(1), 0.0, 20_000, 60)  # one rise, then back: let go
    w, state, t = feed(state, t, 120_000, 120)
    assert w.replicas >= 3
    w, state, t = feed(state, t, 20_000, 600)
    assert w.replicas == 1 and state.bursts == 0

    off = s.model_copy(update={"burst_memory_s": 0})
    w, _ = prefill_wish(prefill(arrival_prompt_tokens_per_s=20_000), off,
                        PolicyState(3, peak=3.0, load_at=0.0), 1.0)
    assert w.replicas == 1 and w.peak is None
