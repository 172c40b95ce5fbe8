"""Fit every pool-and-role's wish into one GPU budget (engines), by priority, with hysteresis.

Three passes, each pure:

1. Goal for the wishes: each (pool, role) first gets its minimum, or its manual override, which
   the arbiter pins until the override is released. The engines left go one at a time in two
   tiers. First, up to what each one's load needs at `critical_utilisation` (beyond it a queue
   grows without bound), engines held being kept until the load falls a band below that:
   highest pool priority first, then the busiest. Then up to its wish (the headroom of its
   target utilisation): the busiest first, priority breaking ties, with `held_bonus` credited
   to one that would otherwise give up an engine it holds (headroom is not worth a cold
   start). "Busiest" is load per engine, with `late_bonus` added for a missed SLO. A wish's
   recent peak (the bursts its role keeps seeing, `Wish.peak`) counts as load in the first
   tier: bursts shorter than a cold start cannot be chased, only provisioned for.
2. Spares: engines nobody wished for are kept warm where the work is, in proportion to each
   one's recent peak load, and stay where they are unless the shortfall elsewhere exceeds the
   holder's by `spare_margin` engines (a uniform surge then needs no cold start). `stay` keeps
   them where they are; `release` hands them back.
3. Moves: from the current assignment towards the goal, taking free engines first, then engines
   from the lowest-priority holders with the largest surplus. A shortfall must have lasted
   `settle_s` before an engine moves for it, and an engine that moved from one (pool, role) to
   another does not move back along that pair within `cooldown_s`. A donor that would run
   above the critical utilisation at its recent peak without the engine gives it only for a
   shortfall that has lasted `preempt_settle_s`, and only to a higher priority or to an equal
   that is busier than the donor would be by `imbalance_margin`: under a burst that overloads
   everyone alike, moving an engine only takes it out of service for a cold start. Nor does
   it give to one whose arriving work (`Wish.peak`) fits the engines it has: that one's
   shortfall is a backlog (say, a prefill queue flushed into decode), which drains by itself,
   while the donor would lose an engine for a drain and a cold start.
   A minimum or an override overrides all of these.

No allocation ever exceeds the budget; minimums and overrides that do not fit are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field

from autoscaling.metrics import Key, Wish


class BudgetError(ValueError):
    """Minimums and overrides alone exceed the GPU budget."""


class ArbiterSettings(BaseModel):
    """Tiers, hysteresis and the handling of engines nobody asked for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    critical_utilisation: float = Field(0.95, gt=0, le=1)
    utilisation_band: float = Field(0.15, ge=0, lt=1, description="hysteresis below critical")
    held_bonus: float = Field(0.2, ge=0, description="utilisation credited to engines held")
    late_bonus: float = Field(0.1, ge=0, description="utilisation credited to a missed SLO")
    cooldown_s: float = Field(300.0, ge=0, description="HPA's and KEDA's default, 300 s")
    settle_s: float = Field(20.0, ge=0)
    preempt_settle_s: float = Field(45.0, ge=0, description="to take from a busy donor")
    imbalance_margin: float = Field(0.1, ge=0, description="utilisation, between equals")
    spare: Literal["proportional", "stay", "release"] = "proportional"
    spare_margin: float = Field(0.75, ge=0, description="engines of load shortfall")


@dataclass(frozen=True)
class ArbiterState:
    """Recent moves as (donor, recipient, time), kept for one cooldown, and since when each
    (pool, role) has been short of its goal."""

    moves: tuple[tuple[Key, Key, float], ...] = ()
    short_since: tuple[tuple[Key, float], ...] = ()


def arbitrate(wishes: Mapping[Key, Wish], budget_engines: int, priorities: Mapping[str, int],
              current: Mapping[Key, int], state: ArbiterState, now: float,
              overrides: Mapping[Key, int] | None = None,
              settings: ArbiterSettings = ArbiterSettings()
              ) -> tuple[dict[Key, int], ArbiterState]:
    """Engines per (pool, role): within the budget, minimums kept, overrides pinned."""
    overrides = dict(overrides or {})
    current = {k: current.get(k, 0) for k in wishes}
    goal = goal_for_wishes(wishes, budget_engines, priorities, overrides, current, settings)
    goal = place_spares(goal, wishes, budget_engines, current, overrides, settings)
    short = {k: t for k, t in state.short_since if goal[k] > current[k]}
    short.update({k: now for k in wishes if goal[k] > current[k] and k not in short})
    alloc, moves = _move(current, goal, wishes, budget_engines, priorities, overrides,
                         state, short, now, settings)
    if settings.spare == "release":
        alloc = {k: min(n, goal[k]) for k, n in alloc.items()}
    return alloc, ArbiterState(moves, tuple(sorted(short.items())))


def needed(w: Wish, held: int, settings: ArbiterSettings) -> int:
    """Engines that carry the wish's load at the critical utilisation.

    Never more than the wish or what is held, whichever is larger. Hysteresis: engines already
    held are kept while the load stays above the critical utilisation less the band, so a load
    hovering at a boundary does not move an engine.
    """
    load = _peak(w)
    up = math.ceil(load / settings.critical_utilisation - 1e-9)
    low = settings.critical_utilisation - settings.utilisation_band
    down = math.ceil(load / low - 1e-9) if low > 0 else held
    kept = min(max(held, up), max(up, down))
    return max(w.min_replicas, min(max(w.replicas, held), w.max_replicas, kept))


def goal_for_wishes(wishes: Mapping[Key, Wish], budget: int, priorities: Mapping[str, int],
                    overrides: Mapping[Key, int], current: Mapping[Key, int] | None = None,
                    settings: ArbiterSettings = ArbiterSettings()) -> dict[Key, int]:
    """Minimums and overrides, then needed engines by priority, then wished by load."""
    current = current or {}
    goal = {k: overrides.get(k, w.min_replicas) for k, w in wishes.items()}
    if sum(goal.values()) > budget:
        raise BudgetError(f"minimums and overrides need {sum(goal.values())} engines; the "
                          f"budget is {budget}")

    def busy(k: Key) -> float:
        late = settings.late_bonus if wishes[k].pressure > 1 else 0.0
        return wishes[k].load / max(goal[k], 1) + late

    def by_priority(k: Key) -> tuple:
        return priorities.get(k[0], 0), busy(k), k

    def by_load(k: Key) -> tuple:
        held = settings.held_bonus if goal[k] < current.get(k, 0) else 0.0
        return busy(k) + held, priorities.get(k[0], 0), k

    tiers: list[tuple[Callable[[Key], int], Callable]] = [
        (lambda k: needed(wishes[k], current.get(k, 0), settings), by_priority),
        (lambda k: wishes[k].replicas, by_load)]
    for limit, order in tiers:
        while sum(goal.values()) < budget:
            wanting = [k for k in wishes if k not in overrides and goal[k] < limit(k)]
            if not wanting:
                break
            goal[max(wanting, key=order)] += 1
    return goal


def place_spares(goal: dict[Key, int], wishes: Mapping[Key, Wish], budget: int,
                 current: Mapping[Key, int], overrides: Mapping[Key, int],
                 settings: ArbiterSettings) -> dict[Key, int]:
    """Hand the engines nobody wished for to where the load is, sticking where they are."""
    placed = dict(goal)
    if settings.spare == "release":
        return placed
    open_keys = [k for k in wishes if k not in overrides]
    total_load = sum(_peak(wishes[k]) for k in open_keys)
    for _ in range(budget - sum(goal.values())):
        room = [k for k in open_keys if placed[k] < wishes[k].max_replicas]
        if settings.spare != "proportional":
            room = [k for k in room if placed[k] < current[k]]
        if not room:
            break
        pick = max(room, key=lambda k: _spare_score(k, placed[k], current[k], wishes[k],
                                                    total_load, budget, settings))
        placed[pick] += 1
    return placed


def _spare_score(k: Key, placed: int, held: int, w: Wish, total_load: float, budget: int,
                 settings: ArbiterSettings) -> tuple:
    share = budget * _peak(w) / total_load if total_load > 0 else float(held)
    sticky = settings.spare_margin if placed < held else 0.0
    return (share - placed + sticky, k)


def _peak(w: Wish) -> float:
    return w.load if w.peak is None else max(w.load, w.peak)


def _move(current: dict[Key, int], goal: dict[Key, int], wishes: Mapping[Key, Wish],
          budget: int, priorities: Mapping[str, int], overrides: Mapping[Key, int],
          state: ArbiterState, short: dict[Key, float], now: float,
          settings: ArbiterSettings):
    """Walk the assignment towards the goal, honouring settle time and cooldown."""
    moves = [m for m in state.moves if now - m[2] < settings.cooldown_s]
    alloc, free = dict(current), budget - sum(current.values())
    wanting = sorted((k for k in alloc if alloc[k] < goal[k]), reverse=True,
                     key=lambda k: (k in overrides or alloc[k] < wishes[k].min_replicas,
                                    priorities.get(k[0], 0), wishes[k].pressure, k))
    for r in wanting:
        forced = r in overrides or alloc[r] < wishes[r].min_replicas
        settled = forced or now - short[r] >= settings.settle_s
        while alloc[r] < goal[r] and settled:
            if free > 0:
                alloc[r], free = alloc[r] + 1, free - 1
                continue
            donors = [d for d in alloc if alloc[d] > goal[d] and
                      (forced or _may_give(d, r, alloc, wishes, priorities, overrides,
                                           moves, now - short[r], settings))]
            if not donors:
                break
            d = min(donors, key=lambda d: (priorities.get(d[0], 0), goal[d] - alloc[d], d))
            alloc[d], alloc[r] = alloc[d] - 1, alloc[r] + 1
            moves.append((d, r, now))
    for k, pinned in overrides.items():  # an override is held even if nobody takes the rest
        free, alloc[k] = free + max(alloc[k] - pinned, 0), min(alloc[k], pinned)
    while free < 0:  # the budget shrank: shed the largest surplus first
        d = max(alloc, key=lambda d: (alloc[d] - goal[d], d))
        alloc[d], free = alloc[d] - 1, free + 1
    return alloc, tuple(moves)


def _may_give(d: Key, r: Key, alloc: Mapping[Key, int], wishes: Mapping[Key, Wish],
              priorities: Mapping[str, int], overrides: Mapping[Key, int], moves: list,
              short_for: float, settings: ArbiterSettings) -> bool:
    """Whether donor `d` may give an engine to `r` now (cooldown, slack, preemption)."""
    if d in overrides:
        return True  # pinned below what it holds
    if any(m[0] == r and m[1] == d for m in moves):
        return False  # an engine went from r to d within the cooldown: not straight back
    left = alloc[d] - 1
    if left > 0 and _peak(wishes[d]) / left <= settings.critical_utilisation:
        return True  # carries even its recent peak without the engine
    if short_for < settings.preempt_settle_s:
        return False
    if wishes[r].peak is not None and alloc[r] and math.ceil(
            wishes[r].peak / settings.critical_utilisation - 1e-9) <= alloc[r]:
        return False  # the work arriving fits: a backlog drains without a busy donor's engine
    if priorities.get(r[0], 0) > priorities.get(d[0], 0):
        return True
    after = wishes[d].load / left if left > 0 else float("inf")
    return after + settings.imbalance_margin < wishes[r].load / max(alloc[r], 1)
