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

from autoscaling.perf import PerfModel
from autoscaling.simulator.prefix import PrefixCache, PrefixModel
from autoscaling.simulator.workload import Request


class PrefillEngine:
    """Takes prompts from its pool's queue, a batch up to the token budget at a time; with a
    prefix model, keeps a prefix cache and prefills only what it does not hold."""

    __slots__ = ("perf", "batch", "done_at", "cache", "prefix")

    def __init__(self, perf: PerfModel, prefix: PrefixModel | None = None):
        self.perf = perf
        self.batch: list[Request] = []
        self.done_at: float | None = None
        self.prefix = prefix if prefix is not None and prefix.on else None
        self.cache = PrefixCache(prefix.cache_tokens) if self.prefix else None

    @property
    def busy(self) -> bool:
        """Whether a batch is in flight."""
        return bool(self.batch)

    def start(self, queue: deque, now: float, others: tuple = ()) -> float | None:
        """Take a batch from `queue` (FIFO); return when it completes, None if idle.
        `others`: the prefix caches of the pool's other ready engines."""
        if self.prefix is not None:
            return self._start_cached(queue, now, others)
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

    def _start_cached(self, queue: deque, now: float, others: tuple) -> float | None:
        """A batch by the prefix model's routing: cache-aware takes, among the first
        `lookahead` queued, the prompts whose prefix it holds before the head, and leaves a
        prompt whose prefix another engine holds to that one for up to `patience_s`; the token
        budget counts the tokens to compute."""
        span = range(min(len(queue), self.prefix.lookahead))
        picks: list[int] = []
        if self.prefix.routing == "cache-aware":
            picks = [i for i in span if self.cache.holds(queue[i])]
            picks += [i for i in span if i not in picks and not self._leave(queue[i], now,
                                                                            others)]
        else:
            picks = list(span)
        tokens, budget, chosen = 0, self.perf.max_batched_tokens, []
        for i in picks:
            request = queue[i]
            new = request.prompt - self.cache.hit(request)
            if chosen and tokens + new > budget:
                break
            chosen.append(i)
            tokens += new
        for i in sorted(chosen, reverse=True):
            request = queue[i]
            del queue[i]
            request.prefill_start = now
            request.cached = self.cache.hit(request)
            self.batch.append(request)
        if not self.batch:
            return None
        self.batch.reverse()  # in queue order
        self.done_at = now + self.perf.prefill_cached_s([(r.prompt, r.cached)
                                                         for r in self.batch])
        return self.done_at

    def _leave(self, request: Request, now: float, others: tuple) -> bool:
        """Whether to leave `request` to another engine holding its prefix: that engine frees
        sooner than this one would take to recompute the prefix, and the request has not
        waited `patience_s` already."""
        if now - request.arrival >= self.prefix.patience_s:
            return False
        for other in others:
            hit = other.cache.hit(request)
            if hit > self.cache.hit(request):
                wait = max(other.done_at - now, 0.0) if other.busy else 0.0
                if wait < self.perf.prompt_flops(hit) / self.perf.prefill_flops_per_s:
                    return True
        return False

    def finish(self, now: float) -> list[Request]:
        """Hand back the completed batch (its prefixes now cached here)."""
        batch, self.batch, self.done_at = self.batch, [], None
        for request in batch:
            request.prefill_end = now
            if self.cache is not None:
                self.cache.store(request)
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

    def cut_all(self, now: float) -> list[tuple[Request, int]]:
        """Stop every running sequence (a drain that ran out of time); each with the tokens
        it had generated, for whoever resumes it."""
        self.advance(now)
        cut = [(r, min(int(self.v - v_join), r.output)) for r, v_join in self.running.values()]
        self.running.clear()
        self.heap.clear()
        self.context_base, self.kv_reserved = 0.0, 0
        self._restep()
        return cut
