"""The meeting point of one application's per-deployment policies: wishes in, engines out.

Ray Serve 2.60 runs a custom policy per deployment (its application-level policy is not yet
supported), each in the Serve controller's process. Every deployment's policy posts its wish
here and receives its share of the GPU budget from one `arbitrate` run over all the wishes,
recomputed at most once per `tick_s` so that the deployments of one control-loop pass see the
same allocation and the arbiter's state (moves, shortfalls) advances once per tick.
A role grows only into engines the other roles' current targets leave free: an engine moved
from one role to another is released by its donor (in its own policy's call, maybe later in the
same pass) before its recipient takes it, so the targets never add up to more than the budget.

The board lives in an ordinary module (not pickled with the policy), so the deployments of an
application share it. A new board (a new application, or a Serve controller that restarted and
lost the old one) decides nothing until every role it knows of has reported its real count, for
`SEED_WAIT_S` at most: an allocation made while some roles only had their starting count would
hand their engines to others (after a restart, a role at 6 replicas would be told its starting
1). A role that takes no decision (never heard after that wait, silent for `SILENT_S`: Serve
skips the policy of a role at zero replicas with requests waiting; or holding its count because
none of its replicas reports) is pinned at its current count: it cannot apply a new count, so
its engines are never handed to others behind its back (they would wait, pending, for GPUs it
still holds, and the targets would add up to more than the budget).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from autoscaling.arbiter import ArbiterSettings, ArbiterState, BudgetError, arbitrate
from autoscaling.metrics import Key, Wish

STALE_S = 60.0  # a wish older than this belongs to a deployment that went away
SEED_WAIT_S = 10.0  # how long a new board waits for every known role's first report
# a role whose policy took no decision for this long is pinned at its count (Serve calls every
# deployment's policy each control loop, ~0.1 s)
SILENT_S = 3.0


@dataclass
class Board:
    """One application's wishes, current counts, arbiter state and last allocation."""

    budget: int
    priorities: dict[str, int]
    settings: ArbiterSettings = ArbiterSettings()
    tick_s: float = 0.5
    wishes: dict[Key, tuple[Wish, float]] = field(default_factory=dict)
    current: dict[Key, int] = field(default_factory=dict)
    state: ArbiterState = ArbiterState()
    alloc: dict[Key, int] = field(default_factory=dict)
    computed_at: float | None = None
    error: str | None = None
    applied_overrides: dict[Key, int] = field(default_factory=dict)
    known: set[Key] = field(default_factory=set)  # the application's roles (seeded)
    reported: set[Key] = field(default_factory=set)
    started_at: float | None = None
    decided_at: dict[Key, float] = field(default_factory=dict)  # its policy's last decision
    holding: set[Key] = field(default_factory=set)  # holding their count: no reports

    def seed(self, roles: Mapping[Key, tuple[int, int, int]], now: float) -> None:
        """Roles not reported yet: (replicas, min, max) at start, with no load."""
        self.started_at = now if self.started_at is None else self.started_at
        for key, (replicas, low, high) in roles.items():
            self.known.add(key)
            if key not in self.wishes:
                self.wishes[key] = (Wish(replicas, low, high), now)
                self.current.setdefault(key, replicas)

    def decide(self, key: Key, wish: Wish, current: int, now: float,
               overrides: Callable[[], dict[Key, int]], fixed: Mapping[Key, int]) -> int:
        """Post `key`'s wish and current count; its engines under the latest allocation."""
        self.wishes[key], self.current[key] = (wish, now), current
        self.reported.add(key)
        self.decided_at[key] = now
        self.holding.discard(key)
        for k in [k for k, (_, t) in self.wishes.items()
                  if now - t > STALE_S and k not in self.known]:
            del self.wishes[k]
            self.current.pop(k, None)
        if self.known - self.reported and now - self.started_at < SEED_WAIT_S:  # (seeded)
            return current  # not every role has said where it stands
        due = self.computed_at is None or now - self.computed_at >= self.tick_s
        if due or key not in self.alloc:
            self._allocate(now, overrides(), fixed)
        granted = self.alloc.get(key, current)
        if granted > current:
            # grows only into engines the other roles' targets leave free now: an engine the
            # allocation moved here is taken once its donor has given it up (the donor's policy
            # may run later in this control loop, or hold its count), so Serve's targets never
            # add up to more than the budget, not even between two policies' calls
            others = sum(n for k, n in self.current.items() if k != key) + sum(
                n for k, n in fixed.items() if k not in self.current)
            granted = max(current, min(granted, self.budget - others))
        self.current[key] = granted  # the target Serve takes from this answer
        return granted

    def hold(self, key: Key, current: int) -> None:
        """`key`'s policy keeps its count (none of its replicas reports): pinned there until it
        decides again."""
        self.current[key] = current
        self.holding.add(key)

    def silent(self, now: float) -> dict[Key, int]:
        """Roles that take no decision now, at their current counts."""
        started = self.started_at if self.started_at is not None else now
        return {k: self.current[k] for k in self.wishes if k in self.current and (
            k in self.holding or now - self.decided_at.get(k, started) > SILENT_S)}

    def _allocate(self, now: float, requested: dict[Key, int], fixed: Mapping[Key, int]) -> None:
        # a silent role is fixed for this allocation: at its count, whatever it last wished
        fixed = {**self.silent(now), **fixed}
        wishes = {k: w for k, (w, _) in self.wishes.items()}
        wishes.update({k: Wish(n, n, n) for k, n in fixed.items()})
        current = {**self.current, **fixed}
        # An override outside a role's bounds is clipped to them. Pins that do not fit the
        # budget with the others are refused and reported: the new ones first (a pin that held
        # already stays: a new pin that does not fit is the one refused, not every pin ops
        # had set), then all of them.
        requested = {k: max(wishes[k].min_replicas, min(n, wishes[k].max_replicas))
                     for k, n in requested.items() if k in wishes and k not in fixed}
        held = {k: n for k, n in requested.items() if self.applied_overrides.get(k) == n}
        tries = [requested]
        tries += [p for p in (held, {}) if p not in tries]
        first: BudgetError | None = None
        for pinned in tries:
            try:
                alloc, self.state = arbitrate(wishes, self.budget, self.priorities, current,
                                              self.state, now, {**pinned, **fixed},
                                              self.settings)
            except BudgetError as exc:
                first = first or exc
                continue
            refused = sorted("/".join(k) for k in requested if k not in pinned)
            self.error = f"overrides ignored ({', '.join(refused)}): {first}" if first else None
            break
        else:  # the silent roles' counts alone leave the others no minimum (a count set
            # behind the policy's back): every role stays where it is until they decide again
            self.error = f"no allocation while roles are silent: {first}"
            alloc = {k: current.get(k, w.min_replicas) for k, w in wishes.items()}
            pinned = {}
        self.alloc, self.computed_at, self.applied_overrides = alloc, now, pinned


BOARDS: dict[str, Board] = {}


def board_for(app: str, budget: int, priorities: dict[str, int],
              settings: ArbiterSettings) -> Board:
    """The application's board (made on first use; a redeploy with new settings replaces it)."""
    board = BOARDS.get(app)
    if board is None or (board.budget, board.priorities, board.settings) != (
            budget, priorities, settings):
        board = BOARDS[app] = Board(budget, dict(priorities), settings)
    return board
