"""The GPU-budget arbiter: budget and minimums under contention, priority, overrides,
spare placement and hysteresis, with an injected clock."""

from __future__ import annotations

import random

import pytest

from autoscaling.arbiter import ArbiterSettings, ArbiterState, BudgetError, arbitrate, needed
from autoscaling.metrics import Wish

FP, FD, DP, DD = ("fast", "prefill"), ("fast", "decode"), ("deep", "prefill"), ("deep", "decode")
KEYS = [FP, FD, DP, DD]
PRIORITY = {"fast": 2, "deep": 1}
QUICK = ArbiterSettings(settle_s=0, cooldown_s=0, preempt_settle_s=0)
SPLIT = {FP: 1, FD: 2, DP: 2, DD: 3}


def wishes(**loads: tuple[int, float]) -> dict:
    """Wishes by short name (fp, fd, dp, dd): (replicas, load)."""
    names = {"fp": FP, "fd": FD, "dp": DP, "dd": DD}
    out = {k: Wish(1, load=0.5) for k in KEYS}
    out.update({names[n]: Wish(r, load=load) for n, (r, load) in loads.items()})
    return out


def arbitrate_once(w, current=SPLIT, settings=QUICK, overrides=None, priorities=PRIORITY,
                   budget=8):
    return arbitrate(w, budget, priorities, current, ArbiterState(), 0.0, overrides,
                     settings)[0]


def test_gives_what_is_wished_when_it_fits():
    w = wishes(fp=(1, 0.5), fd=(2, 1.2), dp=(1, 0.6), dd=(4, 3.0))
    assert arbitrate_once(w) == {FP: 1, FD: 2, DP: 1, DD: 4}


def test_under_contention_the_budget_holds_and_priority_decides():
    w = wishes(fp=(2, 1.5), fd=(4, 3.5), dp=(3, 2.5), dd=(5, 4.5))
    alloc = arbitrate_once(w)
    assert sum(alloc.values()) == 8 and all(n >= 1 for n in alloc.values())
    assert alloc[FP] == 2 and alloc[FD] == 4  # the fast pool's needs come first
    assert alloc[DP] + alloc[DD] == 2


def test_within_a_priority_the_busiest_gets_the_next_engine():
    w = wishes(fp=(1, 0.5), fd=(2, 1.0), dp=(3, 2.8), dd=(5, 3.5))
    alloc = arbitrate_once(w, current=dict.fromkeys(KEYS, 1), priorities={"fast": 1, "deep": 1})
    assert alloc == {FP: 1, FD: 1, DP: 3, DD: 3}  # loads per engine 0.5, 1.0, 0.93, 1.17


def test_never_exceeds_the_budget_nor_drops_a_minimum_on_random_inputs():
    rng = random.Random(11)
    for _ in range(300):
        w = {k: Wish(rng.randint(0, 9), min_replicas=rng.randint(0, 2), max_replicas=8,
                     load=rng.uniform(0, 6), pressure=rng.uniform(0, 3)) for k in KEYS}
        current = {k: rng.randint(0, 4) for k in KEYS}
        budget = rng.randint(sum(x.min_replicas for x in w.values()), 10)
        alloc, _ = arbitrate(w, budget, PRIORITY, current, ArbiterState(),
                             rng.uniform(0, 1000), None,
                             ArbiterSettings(spare=rng.choice(["proportional", "stay",
                                                                "release"])))
        assert sum(alloc.values()) <= budget
        assert all(alloc[k] >= w[k].min_replicas for k in KEYS)


def test_overrides_are_pinned_and_the_rest_share_what_is_left():
    w = wishes(fp=(4, 3.0), fd=(4, 3.0), dp=(4, 3.0), dd=(4, 3.0))
    alloc = arbitrate_once(w, overrides={DD: 3})
    assert alloc[DD] == 3 and sum(alloc.values()) == 8
    alloc = arbitrate_once(wishes(dd=(6, 5.0)), current={FP: 1, FD: 1, DP: 1, DD: 5},
                           overrides={DD: 1})
    assert alloc[DD] == 1 and sum(alloc.values()) == 8  # pinned below: engines go elsewhere
    with pytest.raises(BudgetError, match="need 9 engines; the budget is 8"):
        arbitrate_once(w, overrides={DD: 6})


def test_spares_follow_the_load_and_stick_where_they_are():
    w = wishes(fp=(1, 0.25), fd=(1, 0.3), dp=(1, 0.3), dd=(1, 1.0))
    assert arbitrate_once(w) == {FP: 1, FD: 2, DP: 1, DD: 4}  # 8 x load share, sticky
    near = wishes(fp=(1, 0.7), fd=(1, 0.9), dp=(1, 0.95), dd=(1, 1.45))  # shares 1.4 1.8 1.9 2.9
    assert arbitrate_once(near) == SPLIT  # no shortfall beats the margin: nothing moves
    even = wishes(fp=(1, 0.5), fd=(1, 0.5), dp=(1, 0.5), dd=(1, 0.5))
    assert arbitrate_once(even) == {FP: 2, FD: 2, DP: 2, DD: 2}  # FP short by a whole engine
    light = wishes(fp=(1, 0.3), fd=(1, 0.3), dp=(1, 0.3), dd=(1, 0.6))
    released = arbitrate_once(light, settings=QUICK.model_copy(update={"spare": "release"}))
    assert released == dict.fromkeys(KEYS, 1)


def test_a_shortfall_must_settle_before_an_engine_moves():
    s = ArbiterSettings(settle_s=30, cooldown_s=0)
    w = wishes(fp=(1, 0.5), fd=(1, 0.6), dp=(1, 0.5), dd=(5, 4.0))
    alloc, state = arbitrate(w, 8, PRIORITY, SPLIT, ArbiterState(), 0.0, None, s)
    assert alloc == SPLIT
    alloc, state = arbitrate(w, 8, PRIORITY, SPLIT, state, 29.0, None, s)
    assert alloc == SPLIT
    alloc, state = arbitrate(w, 8, PRIORITY, SPLIT, state, 30.0, None, s)
    assert alloc[DD] == 5 and sum(alloc.values()) == 8


def test_an_engine_is_not_moved_back_within_the_cooldown():
    s = ArbiterSettings(settle_s=0, cooldown_s=300, spare="stay")
    to_deep = wishes(fp=(1, 0.5), fd=(2, 1.2), dp=(1, 0.5), dd=(4, 3.5))
    to_fast = wishes(fp=(1, 0.5), fd=(3, 2.6), dp=(1, 0.5), dd=(3, 2.0))
    current = {FP: 1, FD: 3, DP: 1, DD: 3}
    alloc, state = arbitrate(to_deep, 8, PRIORITY, current, ArbiterState(), 0.0, None, s)
    assert alloc == {FP: 1, FD: 2, DP: 1, DD: 4}
    alloc, state = arbitrate(to_fast, 8, PRIORITY, alloc, state, 100.0, None, s)
    assert alloc == {FP: 1, FD: 2, DP: 1, DD: 4}  # FD gave, DD took, 100 s ago: no move back
    to_dp = wishes(fp=(1, 0.5), fd=(2, 1.2), dp=(2, 1.5), dd=(3, 2.0))
    other, _ = arbitrate(to_dp, 8, PRIORITY, alloc, state, 100.0, None, s)
    assert other[DP] == 2 and other[DD] == 3  # another pair: not a move back
    alloc, state = arbitrate(to_fast, 8, PRIORITY, alloc, state, 300.0, None, s)
    assert alloc == {FP: 1, FD: 3, DP: 1, DD: 3}


def test_held_engines_are_kept_until_the_load_falls_a_band_below_critical():
    s = ArbiterSettings(critical_utilisation=0.95, utilisation_band=0.15)
    assert needed(Wish(1, load=0.9), held=2, settings=s) == 2  # 0.9 / 1 > 0.8: keep both
    assert needed(Wish(1, load=0.7), held=2, settings=s) == 1
    assert needed(Wish(3, load=0.9), held=0, settings=s) == 1  # adding needs > 0.95
    assert needed(Wish(3, load=1.0), held=1, settings=s) == 2
    assert needed(Wish(1, load=5.0), held=1, settings=s) == 1  # never beyond wish or held


def test_no_oscillation_when_wishes_flip_every_few_seconds():
    s = ArbiterSettings()
    a = wishes(fp=(1, 0.8), fd=(2, 1.5), dp=(2, 1.1), dd=(4, 3.3))
    b = wishes(fp=(1, 0.8), fd=(1, 0.9), dp=(2, 1.6), dd=(4, 3.2))
    current, state, moves = dict(SPLIT), ArbiterState(), 0
    for t in range(0, 1800, 5):
        alloc, state = arbitrate(a if (t // 20) % 2 else b, 8, PRIORITY, current, state,
                                 float(t), None, s)
        moves += sum(abs(alloc[k] - current[k]) for k in KEYS) // 2
        assert sum(alloc.values()) <= 8
        current = alloc
    assert moves <= 2


def test_a_busy_donor_gives_only_to_a_higher_priority_or_a_much_busier_equal():
    s = ArbiterSettings(settle_s=0, cooldown_s=0, preempt_settle_s=90)
    w = wishes(fp=(1, 0.9), fd=(3, 2.6), dp=(1, 0.9), dd=(4, 3.7))
    current = {FP: 1, FD: 2, DP: 1, DD: 4}
    alloc, state = arbitrate(w, 8, PRIORITY, current, ArbiterState(), 0.0, None, s)
    assert alloc == current  # deep decode has no slack to give
    alloc, state = arbitrate(w, 8, PRIORITY, current, state, 90.0, None, s)
    assert alloc[FD] == 3 and alloc[DD] == 3  # higher priority, and it lasted
    level, now = {"fast": 1, "deep": 1}, s.model_copy(update={"preempt_settle_s": 0})
    alloc, _ = arbitrate(w, 8, level, current, ArbiterState(), 0.0, None, now)
    assert alloc == current  # equals, 1.3 vs 1.23 after: moving would only shift the overload
    hotter = wishes(fp=(1, 0.9), fd=(3, 2.9), dp=(1, 0.9), dd=(4, 3.7))
    alloc, _ = arbitrate(hotter, 8, level, current, ArbiterState(), 0.0, None, now)
    assert alloc[FD] == 3 and alloc[DD] == 3  # 1.45 against 1.23 after: worth a cold start


def test_a_busy_donor_is_not_raided_for_a_backlog_the_arriving_work_fits():
    # fast/decode's queue spiked (a prefill backlog flushed into it) but what keeps arriving
    # fits its two engines: deep/decode, busy, keeps its engine however long that lasts
    s = ArbiterSettings(settle_s=0, cooldown_s=0, preempt_settle_s=30)
    current = {FP: 1, FD: 2, DP: 1, DD: 4}
    backlog = {FP: Wish(1, load=0.9), FD: Wish(3, load=2.6, peak=1.4), DP: Wish(1, load=0.9),
               DD: Wish(4, load=3.7)}
    alloc, state = arbitrate(backlog, 8, PRIORITY, current, ArbiterState(), 0.0, None, s)
    alloc, _ = arbitrate(backlog, 8, PRIORITY, current, state, 120.0, None, s)
    assert alloc == current
    arriving = {**backlog, FD: Wish(3, load=2.6, peak=2.4)}
    alloc, state = arbitrate(arriving, 8, PRIORITY, current, ArbiterState(), 0.0, None, s)
    alloc, _ = arbitrate(arriving, 8, PRIORITY, current, state, 30.0, None, s)
    assert alloc[FD] == 3 and alloc[DD] == 3


def test_the_budget_can_shrink_and_free_engines_are_used():
    w = wishes(fp=(1, 0.5), fd=(2, 1.2), dp=(1, 0.6), dd=(4, 3.0))
    alloc = arbitrate_once(w, current={FP: 1, FD: 2, DP: 1, DD: 4}, budget=6)
    assert sum(alloc.values()) == 6 and alloc[FP] == 1
    alloc = arbitrate_once(w, current={FP: 1, FD: 1, DP: 1, DD: 1})
    assert sum(alloc.values()) == 8


def test_recent_peaks_count_as_need_and_a_peaked_donor_is_not_raided_for_a_burst():
    # fast/prefill idles between bursts it keeps seeing (peak 1.5 engines); deep/decode is
    # in a burst of its own: the engine fast/prefill holds for its bursts stays with it
    wishes = {FP: Wish(2, load=0.3, peak=1.5), FD: Wish(1, load=0.5),
              DP: Wish(1, load=0.5), DD: Wish(6, load=5.5)}
    current = {FP: 2, FD: 1, DP: 1, DD: 4}
    settings = ArbiterSettings(settle_s=0, preempt_settle_s=90)
    alloc, _ = arbitrate(wishes, 8, PRIORITY, current, ArbiterState(), 0.0, None, settings)
    assert alloc[FP] == 2 and sum(alloc.values()) == 8
    without = {**wishes, FP: Wish(2, load=0.3)}
    alloc, _ = arbitrate(without, 8, PRIORITY, current, ArbiterState(), 0.0, None, settings)
    assert alloc[FP] == 1 and alloc[DD] == 5
