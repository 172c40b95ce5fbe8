"""The discrete-event loop: arrivals, prefill batches, decode finishes, cold starts, drains and
the controller's tick, on one heap, deterministic for a given list of requests.

A request queues for its pool's prefill, runs in a batch, queues for a decode slot of its pool,
and streams: its first token leaves one decode step after it joins a batch (the client's first
token comes from decode, as in SGLang's PD), its last when the batch has produced its output.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from autoscaling.metrics import Key, RoleMetrics
from autoscaling.perf import PerfModel
from autoscaling.simulator.cluster import DRAIN_DEADLINE, READY, Cluster, Slot
from autoscaling.simulator.controllers import Controller
from autoscaling.simulator.engines import DecodeEngine
from autoscaling.simulator.prefix import PrefixModel, assign
from autoscaling.simulator.workload import POOLS, Request
from autoscaling.window import LoadWindow, Stream

PREFILL_DONE, DECODE, TICK = "prefill_done", "decode", "tick"


@dataclass
class SimResult:
    """Requests as they ended, and the cluster's story over time."""

    requests: list[Request]
    duration_s: float
    allocated_engine_s: float
    busy_engine_s: float
    engine_moves: int
    resumed: int = 0  # streams cut by a draining decode replica and resumed on another
    timeline: list[tuple[float, dict[str, int]]] = field(default_factory=list)


class Simulation:
    """One run of one controller over one list of requests."""

    def __init__(self, requests: list[Request], controller: Controller, perf: PerfModel,
                 budget: int, initial: dict[Key, int], duration_s: float,
                 tick_s: float = 1.0, grace_s: float = 120.0,
                 slos: dict[Key, float] | None = None,
                 prefill_deadline: tuple[float, float] | None = None,
                 prefix: PrefixModel | None = None):
        self.requests, self.controller, self.perf = requests, controller, perf
        self.duration_s, self.tick_s, self.end = duration_s, tick_s, duration_s + grace_s
        self.heap: list = []
        self.seq = 0
        self.keys = [(p, r) for p in POOLS for r in ("prefill", "decode")]
        self.queues: dict[Key, deque] = {k: deque() for k in self.keys}
        # The workers' own window (autoscaling.window), on the simulation's clock; `slos` are
        # each role's latency objective (TTFT for prefill, seconds per token for decode).
        slos = slos or {}
        self.now = 0.0
        self.windows = {k: LoadWindow(slos.get(k, float("inf")), lambda: self.now)
                        for k in self.keys}
        assign(requests, prefix or PrefixModel())
        self.cluster = Cluster(perf, budget, initial, self.schedule, prefix)
        # (seconds, prompt tokens/s floor): a prompt waits at most seconds + tokens / floor
        self.prefill_timeout_s, self.prefill_floor = prefill_deadline or (None, 1.0)
        self.busy_s, self.timeline = 0.0, []
        self.next_rid = max((r.rid for r in requests), default=-1) + 1
        self.resumed = 0  # streams cut by a replica leaving and resumed on another
        self.streams: dict[int, Stream] = {}  # decode streams the windows follow, by request

    def schedule(self, when: float, kind: str, *args) -> None:
        """Put an event on the heap."""
        self.seq += 1
        heapq.heappush(self.heap, (when, self.seq, kind, args))

    def run(self) -> SimResult:
        """Play every event: the controller ticks to the end of the trace plus the grace
        period; after that the allocation stays as it is and the requests admitted run to
        their end (a stream still within its SLO is not a miss because the run stopped; one
        with no engine left to take it stays unfinished). Engines are counted allocated for
        the trace's duration only (and busy within it), as every policy serves the same
        arrivals in it."""
        self.schedule(0.0, TICK)
        handlers = {PREFILL_DONE: self._prefill_done, DECODE: self._decode, TICK: self._tick,
                    READY: self._ready, DRAIN_DEADLINE: self._drain_deadline}
        arrivals, i, now = self.requests, 0, 0.0
        allocated = busy = None
        while True:
            next_event = self.heap[0][0] if self.heap else float("inf")
            if i < len(arrivals) and arrivals[i].arrival <= next_event:
                now = self.now = arrivals[i].arrival
                self._arrive(arrivals[i], now)
                i += 1
                continue
            if allocated is None and next_event > self.duration_s:
                allocated = self.cluster.allocated_engine_s(self.duration_s)
                busy = self.busy_s  # the same span: busy can never exceed allocated
            if not self.heap:
                break
            now, _, kind, args = heapq.heappop(self.heap)
            self.now = now
            handlers[kind](now, *args)
        return SimResult(self.requests, self.duration_s, allocated, busy,
                         self.cluster.moves, self.resumed, self.timeline)

    def _arrive(self, request: Request, now: float) -> None:
        key = (request.pool, "prefill")
        self.windows[key].arrived(request.prompt)
        self._decode_leg(request)
        self.queues[key].append(request)
        self._kick_prefill(key, now)

    def _kick_prefill(self, key: Key, now: float) -> None:
        queue = self.queues[key]
        for slot in self.cluster.slots:
            self._expire(queue, now)
            if not queue:
                return
            if slot.key == key and slot.phase == "ready" and not slot.engine.busy:
                others = () if slot.engine.cache is None else tuple(
                    s.engine for s in self.cluster.of(key, "ready") if s is not slot)
                done = slot.engine.start(queue, now, others)
                if done is not None:
                    self.schedule(done, PREFILL_DONE, slot, slot.epoch)

    def _expire(self, queue: deque, now: float) -> None:
        """Drop the queue's head while it is past its prefill deadline, as the stack's prefill
        attempt deadline does (the client gets an error; the request counts as missed)."""
        if self.prefill_timeout_s is None:
            return
        while queue and now - queue[0].arrival > (self.prefill_timeout_s
                                                  + queue[0].prompt / self.prefill_floor):
            self._fail(queue.popleft())

    def _prefill_done(self, now: float, slot: Slot, epoch: int) -> None:
        if slot.epoch != epoch:
            return
        engine = slot.engine
        started = engine.batch[0].prefill_start
        batch = engine.finish(now)
        busy, tokens = now - started, sum(r.prompt for r in batch)
        self.busy_s += busy
        pool = slot.key[0]
        decode_key = (pool, "decode")
        prefill_window = self.windows[slot.key]
        for r in batch:
            prefill_window.prefilled(r.prompt, busy, started - r.arrival, now - r.arrival,
                                     engine=id(slot))
        self.queues[decode_key].extend(batch)
        if slot.phase == "draining":
            self._release(slot, now)
        else:
            self._kick_prefill(slot.key, now)
        self._kick_decode(decode_key, now)

    def _kick_decode(self, key: Key, now: float) -> None:
        queue, touched = self.queues[key], set()
        window = self.windows[key]
        ready = [s for s in self.cluster.slots if s.key == key and s.phase == "ready"]
        while queue and ready:
            slot = min(ready, key=lambda s: len(s.engine.running))
            request = queue[0]
            if not slot.engine.can_admit(request):
                break
            queue.popleft()
            slot.engine.admit(request, now)
            window.waited(now - request.prefill_end)
            touched.add(slot.index)
        for slot in ready:
            if slot.index in touched:
                self._schedule_decode(slot)

    def _schedule_decode(self, slot: Slot) -> None:
        when = slot.engine.next_finish()
        if when is not None:
            self.schedule(when, DECODE, slot, slot.epoch, slot.engine.version)

    def _decode(self, now: float, slot: Slot, epoch: int, version: int) -> None:
        if slot.epoch != epoch or slot.engine.version != version:
            return
        done = slot.engine.finish_due(now)
        window = self.windows[slot.key]
        for r in done:
            window.decoded(r.output, now - r.decode_start, stream=self.streams.pop(r.rid, None))
            if r.resumes is not None:
                r.resumes.finish = now
        if slot.phase == "draining" and not slot.engine.running:
            self._release(slot, now)
            return
        self._schedule_decode(slot)
        if slot.phase == "ready":
            self._kick_decode(slot.key, now)

    def _release(self, slot: Slot, now: float) -> None:
        self.cluster.free(slot, now)
        self.cluster.fill(now)

    def _ready(self, now: float, slot: Slot, epoch: int) -> None:
        if slot.epoch != epoch or slot.phase != "starting":
            return
        self.cluster.ready(slot, now)
        if slot.key[1] == "prefill":
            self._kick_prefill(slot.key, now)
        else:
            self._kick_decode(slot.key, now)

    def _drain_deadline(self, now: float, slot: Slot, epoch: int) -> None:
        if slot.epoch != epoch or slot.phase != "draining":
            return
        if isinstance(slot.engine, DecodeEngine):
            cut = slot.engine.cut_all(now)
            for request, generated in cut:
                if (stream := self.streams.pop(request.rid, None)) is not None:
                    stream.ended(generated)
                self._resume(request, generated, now)
            if cut:
                self._kick_prefill((slot.key[0], "prefill"), now)
        else:
            for request in slot.engine.finish(now):
                self._fail(request)
        self._release(slot, now)

    def _resume(self, request: Request, generated: int, now: float) -> None:
        """A stream cut by its decode replica going goes on on another replica of the pool, as
        the ingress resumes it: the prompt and the tokens already sent are prefilled again
        (first in the pool's prefill queue: the client is waiting mid-stream), the rest is
        decoded there. The client's request ends when the continuation does."""
        client = request.resumes or request
        rest = Request(self.next_rid, request.pool, now, request.prompt + generated,
                       max(request.output - generated, 1), group=request.group,
                       prefix=request.prefix, resumes=client)
        self.next_rid += 1
        self.resumed += 1
        key = (request.pool, "prefill")
        self.windows[key].arrived(rest.prompt)
        self._decode_leg(rest)
        self.queues[key].appendleft(rest)

    def _decode_leg(self, request: Request) -> None:
        """Decode's side of a request arriving at its pool: under SGLang's PD the ingress opens
        the decode leg with the request, and the decode worker counts the arrival and starts
        following its stream then, before the prompt is prefilled."""
        window = self.windows[(request.pool, "decode")]
        window.arrived(request.prompt)
        self.streams[request.rid] = window.stream()

    def _fail(self, request: Request) -> None:
        """A request failed before decoding, and with it the client's request it continues;
        its decode leg ends having sent nothing."""
        if (stream := self.streams.pop(request.rid, None)) is not None:
            stream.ended(0)
        request.aborted = True
        if request.resumes is not None:
            request.resumes.aborted = True

    def _tick(self, now: float) -> None:
        metrics = {k: self._metrics(k, now) for k in self.keys}
        self.cluster.reconcile(self.controller.targets(now, metrics), now)
        for key in self.keys:  # engines that came back may take queued work
            (self._kick_prefill if key[1] == "prefill" else self._kick_decode)(key, now)
        if round(now) % 10 == 0:
            self.timeline.append((now, {f"{p}/{r}": self.cluster.assigned((p, r))
                                        for p, r in self.keys}))
        if now + self.tick_s <= self.end:
            self.schedule(now + self.tick_s, TICK)

    def _metrics(self, key: Key, now: float) -> RoleMetrics:
        """What the role's workers would report now, through the same window and report."""
        ready = self.cluster.of(key, "ready")
        running, kv, window = 0, 0.0, self.windows[key]
        for slot in self.cluster.of(key, "ready", "draining"):
            engine = slot.engine
            if not isinstance(engine, DecodeEngine):
                running += len(engine.batch) if slot.phase == "ready" else 0
                continue
            engine.advance(now)
            for rid, (_, joined) in engine.running.items():  # tokens so far, as workers count
                if (stream := self.streams.get(rid)) is not None:
                    stream.tokens = int(engine.v - joined)
            if slot.phase != "ready":
                continue
            running += len(engine.running)
            if engine.running:
                kv += engine.kv_used()
                self.busy_s += self.tick_s
            if engine.produced:
                window.generated(engine.produced, engine.step)
            engine.produced = 0.0
        full = 0.0
        if key[1] == "decode":  # production's policy reads it so too (`decode_capacity`)
            full = self.perf.decode_tokens_per_s(kv / running if running else None)
        report = window.snapshot(len(self.queues[key]), running, self.perf.max_running, int(kv),
                                 self.perf.kv_capacity_tokens)
        # as Serve reports it, every engine granted and not yet serving: starting, or still
        # waiting for a donor's drain to free its GPUs (production's target less running)
        starting = max(self.cluster.targets.get(key, 0) - len(ready), 0)
        return report.role_metrics(key[1], len(ready), starting, full)
