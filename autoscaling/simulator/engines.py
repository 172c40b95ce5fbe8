"""The two kinds of modelled engine: prefill (one batch at a time) and decode (a running batch).

Decode is simulated as a fluid: every running sequence gains one token per step, and the step
time is recomputed from the batch and the context it holds whenever a sequence joins or leaves.
A virtual clock `v` counts the tokens each running sequence has gained since the engine
started, so a sequence that joined at `v0` with `n` tokens to go finishes at `v0 + n`: joins,
leaves and the next finish are O(log B) heap operations, not one event per token.
"""

from __future__ import annotations

import heapq
from collections import deque

from autoscaling.simulator.perf import PerfModel
from autoscaling.simulator.workload import Request


class PrefillEngine:
    """Takes prompts from its pool's queue, a batch up to the token budget at a time."""

    __slots__ = ("perf", "batch", "done_at")

    def __init__(self, perf: PerfModel):
        self.perf = perf
        self.batch: list[Request] = []
        self.done_at: float | None = None

    @property
    def busy(self) -> bool:
        """Whether a batch is in flight."""
        return bool(self.batch)

    def start(self, queue: deque, now: float) -> float | None:
        """Take a batch from `queue` (FIFO); return when it completes, None if idle."""
        tokens, budget = 0, self.perf.max_batched_tokens
        while queue and (not self.batch or tokens + queue[0].prompt <= budget):
            request = queue.popleft()
            request.prefill_start = now
            tokens += request.prompt
            self.batch.append(request)
        if not self.batch:
            return None
        self.done_at = now + self.perf.prefill_s([r.prompt for r in self.batch])
        return self.done_at

    def finish(self, now: float) -> list[Request]:
        """Hand back the completed batch."""
        batch, self.batch, self.done_at = self.batch, [], None
        for request in batch:
            request.prefill_end = now
        return batch


class DecodeEngine:
    """Runs up to `max_running` sequences; each gains a token per step of the whole batch."""

    __slots__ = ("perf", "v", "t", "step", "heap", "context_base", "running", "version",
                 "kv_reserved", "produced")

    def __init__(self, perf: PerfModel, now: float):
        self.perf = perf
        self.v, self.t, self.step = 0.0, now, perf.step_floor_s
        self.heap: list[tuple[float, int, Request]] = []
        self.context_base = 0.0  # sum over running of (prompt - v_join)
        self.running: dict[int, tuple[Request, float]] = {}
        self.version = 0
        self.kv_reserved = 0
        self.produced = 0.0  # tokens generated, for whoever reads and resets it

    def can_admit(self, request: Request) -> bool:
        """Whether a slot and the request's full KV fit."""
        return (len(self.running) < self.perf.max_running and
                self.kv_reserved + request.prompt + request.output
                <= self.perf.kv_capacity_tokens)

    def kv_used(self) -> float:
        """KV tokens held now by the running sequences."""
        return self.context_base + len(self.running) * self.v

    def advance(self, now: float) -> None:
        """Bring the virtual clock to `now` at the current step time."""
        if self.running:
            gained = (now - self.t) / self.step
            self.v += gained
            self.produced += gained * len(self.running)
        self.t = now

    def _restep(self) -> None:
        self.step = self.perf.decode_step_s(len(self.running), self.kv_used())
        self.version += 1

    def admit(self, request: Request, now: float) -> None:
        """Start decoding `request`; its first token leaves after one step."""
        self.advance(now)
        request.decode_start = now
        self.running[request.rid] = (request, self.v)
        self.kv_reserved += request.prompt + request.output
        self.context_base += request.prompt - self.v
        heapq.heappush(self.heap, (self.v + request.output, request.rid, request))
        self._restep()
        request.first_token = now + self.perf.kv_transfer_s + self.step

    def next_finish(self) -> float | None:
        """When the next running sequence finishes at the current step time."""
        if not self.heap:
            return None
        return self.t + max(self.heap[0][0] - self.v, 0.0) * self.step

    def finish_due(self, now: float) -> list[Request]:
        """Retire every sequence whose last token is out by `now`."""
        self.advance(now)
        done = []
        while self.heap and self.heap[0][0] <= self.v + 1e-6:
            _, rid, request = heapq.heappop(self.heap)
            _, v_join = self.running.pop(rid)
            self.context_base -= request.prompt - v_join
            self.kv_reserved -= request.prompt + request.output
            request.finish = now
            done.append(request)
        if done:
            self._restep()
        return done

    def abort_all(self, now: float) -> list[Request]:
        """Drop every running sequence (a drain that ran out of time)."""
        dropped = [r for r, _ in self.running.values()]
        for request in dropped:
            request.aborted = True
        self.running.clear()
        self.heap.clear()
        self.context_base, self.kv_reserved = 0.0, 0
        self.advance(now)
        self._restep()
        return dropped
