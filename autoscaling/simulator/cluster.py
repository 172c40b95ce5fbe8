"""The engine slots of the cluster and how a target count per pool-and-role becomes reality.

Each of the budget's slots (one TP2 engine on two GPUs) is free, starting (cold start after a
change of pool or role), ready, or draining (no new work; free once its in-flight work is done,
or at the drain timeout, when its decode streams are resumed elsewhere: `sim.py`). A key over
its target drains the slots that will empty soonest (starting ones first); a key under its
target takes free slots as they appear, in the order the keys fell short (ties in the order the
keys are declared, as pending replicas are created in the order the controller walks its
deployments). Targets may add up to more than the budget (Ray's deployments decide alone): the
excess simply waits for a slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from autoscaling.metrics import Key
from autoscaling.perf import PerfModel
from autoscaling.simulator.engines import DecodeEngine, PrefillEngine
from autoscaling.simulator.prefix import PrefixModel

READY, DRAIN_DEADLINE = "ready", "drain_deadline"


@dataclass(slots=True)
class Slot:
    """One engine's place in the cluster."""

    index: int
    key: Key | None = None
    phase: str = "free"  # free | starting | ready | draining
    engine: PrefillEngine | DecodeEngine | None = None
    since: float = 0.0
    epoch: int = 0


class Cluster:
    """Slots, their lifecycle, and the accounting of allocated engine-seconds."""

    def __init__(self, perf: PerfModel, budget: int, initial: dict[Key, int],
                 schedule: Callable[..., None], prefix: PrefixModel | None = None):
        self.perf, self.schedule, self.prefix = perf, schedule, prefix
        self.slots = [Slot(i) for i in range(budget)]
        self.targets = dict(initial)
        self.short_since: dict[Key, float] = {}
        self.allocated_s = 0.0
        self.moves = 0
        free = iter(self.slots)
        for key, n in initial.items():
            for _ in range(n):
                self._make_ready(next(free), key, 0.0)

    def of(self, key: Key, *phases: str) -> list[Slot]:
        """Slots of `key` in any of `phases`."""
        return [s for s in self.slots if s.key == key and s.phase in phases]

    def assigned(self, key: Key) -> int:
        """Slots counted towards `key`'s target: starting or ready."""
        return sum(1 for s in self.slots if s.key == key and s.phase in ("starting", "ready"))

    def _make_ready(self, slot: Slot, key: Key, now: float) -> None:
        slot.key, slot.phase, slot.since = key, "ready", now
        slot.engine = (PrefillEngine(self.perf, self.prefix) if key[1] == "prefill"
                       else DecodeEngine(self.perf, now))

    def reconcile(self, targets: dict[Key, int], now: float) -> list[Slot]:
        """Drain what is over target, start what is under; return slots emptied now."""
        self.targets = dict(targets)
        emptied = []
        for key, target in targets.items():
            extra = self.assigned(key) - target
            for slot in self._drain_order(key)[:max(extra, 0)]:
                if self._drain(slot, now):
                    emptied.append(slot)
        for slot in emptied:
            self.free(slot, now)
        self.fill(now)
        return emptied

    def _drain_order(self, key: Key) -> list[Slot]:
        starting = self.of(key, "starting")
        ready = sorted(self.of(key, "ready"), key=lambda s: _work_left(s.engine))
        return starting[::-1] + ready

    def _drain(self, slot: Slot, now: float) -> bool:
        """Stop new work on `slot`; True when it is already empty."""
        if slot.phase == "starting" or _work_left(slot.engine) == 0:
            slot.phase = "draining"
            return True
        slot.phase = "draining"
        self.schedule(now + self.perf.drain_timeout_s, DRAIN_DEADLINE, slot, slot.epoch)
        return False

    def free(self, slot: Slot, now: float) -> None:
        """Return `slot` to the free pool, counting its allocated time."""
        self.allocated_s += now - slot.since
        slot.key, slot.phase, slot.engine, slot.since = None, "free", None, now
        slot.epoch += 1

    def fill(self, now: float) -> None:
        """Give free slots to the keys below target, longest short first."""
        short = [k for k, t in self.targets.items() if self.assigned(k) < t]
        for k in short:
            self.short_since.setdefault(k, now)
        for k in list(self.short_since):
            if k not in short:
                del self.short_since[k]
        order = {k: i for i, k in enumerate(self.targets)}  # ties: declaration order
        for key in sorted(short, key=lambda k: (self.short_since[k], order[k])):
            while self.assigned(key) < self.targets[key]:
                slot = next((s for s in self.slots if s.phase == "free"), None)
                if slot is None:
                    return
                slot.key, slot.phase, slot.since = key, "starting", now
                self.moves += 1
                self.schedule(now + self.perf.cold_start_s, READY, slot, slot.epoch)

    def ready(self, slot: Slot, now: float) -> None:
        """A cold start completed: the slot serves its key."""
        since = slot.since
        self._make_ready(slot, slot.key, now)
        slot.since = since

    def allocated_engine_s(self, now: float) -> float:
        """Engine-seconds allocated (starting, ready or draining) up to `now`."""
        open_s = sum(now - s.since for s in self.slots if s.phase != "free")
        return self.allocated_s + open_s


def _work_left(engine) -> float:
    if engine is None:
        return 0
    if isinstance(engine, PrefillEngine):
        return len(engine.batch)
    return sum(v_end - engine.v for v_end, _, _ in engine.heap) if engine.heap else 0
