"""Fit every pool-and-role's wish into one GPU budget (engines), by priority.

Each (pool, role) first gets its minimum (or its manual override, which the arbiter never
changes); the engines left are handed out one at a time to the wanting (pool, role) with the
highest priority, ties going to the one furthest below its wish (relative). No allocation ever
exceeds the budget; a set of minimums and overrides that does not fit is refused.
"""

from __future__ import annotations

Key = tuple[str, str]  # (pool, role)


class BudgetError(ValueError):
    """Minimums and overrides alone exceed the GPU budget."""


def arbitrate(wishes: dict[Key, int], minimums: dict[Key, int], priorities: dict[str, int],
              budget: int, overrides: dict[Key, int] | None = None) -> dict[Key, int]:
    """Engines per (pool, role): within `budget`, minimums kept, overrides pinned."""
    overrides = overrides or {}
    alloc = {k: overrides.get(k, minimums.get(k, 0)) for k in wishes}
    if sum(alloc.values()) > budget:
        raise BudgetError(f"minimums and overrides need {sum(alloc.values())} engines; the "
                          f"budget is {budget}")
    left = budget - sum(alloc.values())
    while left > 0:
        wanting = [k for k in wishes if k not in overrides and alloc[k] < wishes[k]]
        if not wanting:
            break
        pick = max(wanting, key=lambda k: (priorities.get(k[0], 0),
                                           (wishes[k] - alloc[k]) / wishes[k]))
        alloc[pick] += 1
        left -= 1
    return alloc
