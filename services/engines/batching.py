"""The continuous-batching core shared by the CPU engines: admission, the step loop, per-request
output queues, abort. An engine supplies only `step(batch) -> one (token, logprob or None) per
sequence`.

Sequences join the running batch between steps when `max_running_requests` and the KV
reservation (prompt + max_tokens, so a running sequence never runs out) allow; each step's tokens
go to per-request queues, and a consumer that is slower than the steps receives several tokens in
one chunk. Prefills run one at a time behind `PrefillGate`, which measures their queue wait.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from services.engines.protocol import (EngineRequest, EngineStats, FinishReason, TokenChunk,
                                       TokenLogprob)
from services.engines.stops import StopChecker
from services.errors import DecodeStepFailed, EngineError, EngineUnavailable
from services.settings import EngineSettings

# a decode step running this long is hung (a step of a full batch takes well under a second on
# the reference engine's CPU): its engine reports unhealthy, and Serve's check replaces it
STEP_STALL_S = 30.0


@dataclass
class Sequence:
    """One decoding request; engines subclass it to keep their own per-sequence state."""

    request: EngineRequest
    stops: StopChecker
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    done: bool = False
    finished: bool = False  # its last chunk was handed out
    pending: BaseException | None = None  # an error queued behind tokens handed out first

    @property
    def kv_tokens(self) -> int:
        raise NotImplementedError

    @property
    def reserved(self) -> int:
        return len(self.request.prompt_ids) + self.request.sampling.max_tokens


Sampled = tuple[int, TokenLogprob | None]
Step = Callable[[list[Sequence]], Awaitable[list[Sampled]]]


class ContinuousBatcher:
    """Runs `step` over the running batch while any sequence is running or waiting."""

    def __init__(self, settings: EngineSettings, step: Step):
        self.settings = settings
        self.step = step
        self.running: dict[str, Sequence] = {}
        self.waiting: deque[Sequence] = deque()
        self.failure = ""  # the last step's error, "" once a step succeeds again
        self.stepping: float | None = None  # when the step running now began (monotonic)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def stream(self, seq: Sequence, first_token: int) -> AsyncIterator[TokenChunk]:
        """Decode `seq` after `first_token`; closing the iterator early aborts it."""
        finish = seq.stops.check([first_token])
        if finish:
            yield TokenChunk([], finish)
            return
        self.waiting.append(seq)
        self._ensure_loop()
        try:
            while True:
                yield await _next_chunk(seq)
                if seq.finished:
                    return
        finally:
            if not seq.done:
                self.drop(seq.request.request_id)

    def drop(self, request_id: str) -> bool:
        """Abort a running or waiting sequence now; False when it is not here."""
        seq = self.running.pop(request_id, None)
        if seq is None:
            seq = next((s for s in self.waiting if s.request.request_id == request_id), None)
            if seq is not None:
                self.waiting.remove(seq)
        if seq is None:
            return False
        seq.done = True
        # its reader, if any is left, did not ask for this (a client that leaves closes the
        # stream instead): the engine let it go, as SGLang's abort ends a stream, retryable
        seq.queue.put_nowait(EngineUnavailable(f"request {request_id} was aborted in the "
                                                "engine", request_id=request_id))
        return True

    def health(self) -> str:
        """Why the engine is unhealthy ("" when it is not): its last step failed, or the step
        running now has run `STEP_STALL_S` (a hung step failed nothing: every stream on it
        waited out its deadline while the engine read as healthy)."""
        if self.stepping is not None and time.monotonic() - self.stepping > STEP_STALL_S:
            return f"a decode step has run for {time.monotonic() - self.stepping:.0f} s"
        return self.failure

    def kv_tokens(self) -> int:
        live = [s for s in self.running.values() if not s.done] + list(self.waiting)
        return sum(s.kv_tokens for s in live)

    def _ensure_loop(self) -> None:
        self._wake = self._wake or asyncio.Event()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def _admit(self) -> None:
        reserved = sum(s.reserved for s in self.running.values())
        while self.waiting and len(self.running) < self.settings.max_running_requests:
            seq = self.waiting[0]
            if self.running and reserved + seq.reserved > self.settings.kv_capacity_tokens:
                break
            self.waiting.popleft()
            self.running[seq.request.request_id] = seq
            reserved += seq.reserved

    async def _loop(self) -> None:
        while True:
            self._admit()
            if not self.running:
                self._wake.clear()
                if not self.waiting:
                    return
                await self._wake.wait()
                continue
            batch = list(self.running.values())
            self.stepping = time.monotonic()
            try:
                sampled = await self.step(batch)
            except Exception as exc:  # an engine fault fails the batch, not the process
                # and not its requests: none of them caused it alone (that is the stop check,
                # below), so each is resumed on a replica (the ingress bounds how often)
                self.failure = f"{type(exc).__name__}: {exc}"
                self.stepping = None
                for seq in batch:
                    self._finish(seq, DecodeStepFailed(f"decode step failed: {exc}",
                                                       request_id=seq.request.request_id))
                continue
            self.failure = ""  # a transient fault does not mark the engine unhealthy for good
            self.stepping = None
            for seq, (token, logprob) in zip(batch, sampled):
                if not seq.done:
                    try:
                        finish = seq.stops.check([token])
                    except Exception as exc:  # this sequence's stop check: it alone fails
                        self._finish(seq, EngineError(f"stop check failed: {exc}",
                                                      request_id=seq.request.request_id))
                        continue
                    if finish:
                        self._finish(seq, (token, finish, logprob))
                    else:
                        seq.queue.put_nowait((token, None, logprob))

    def _finish(self, seq: Sequence, item) -> None:
        seq.done = True
        self.running.pop(seq.request.request_id, None)
        seq.queue.put_nowait(item)


async def _next_chunk(seq: Sequence) -> TokenChunk:
    """Every token queued for `seq` so far (at least one), their logprobs if sampled with them,
    and the finish reason if it ended (then `seq.finished` is set). An error queued after
    tokens is raised by the next call: the tokens sampled before it are not lost (a resumed
    stream would sample them again, differently where unseeded)."""
    if seq.pending is not None:
        error, seq.pending = seq.pending, None
        raise error
    tokens: list[int] = []
    logprobs: list[TokenLogprob] = []
    finish: FinishReason | None = None
    item = await seq.queue.get()
    while True:
        if isinstance(item, BaseException):
            if not tokens:
                raise item
            seq.pending = item
            return TokenChunk(tokens, None, logprobs or None)
        token, finish, logprob = item
        tokens.append(token)
        if logprob is not None:
            logprobs.append(logprob)
        if finish or seq.queue.empty():
            seq.finished = finish is not None
            return TokenChunk(tokens, finish, logprobs or None)
        item = seq.queue.get_nowait()


class PrefillGate:
    """Prefills one at a time, FIFO; tracks who waits, who runs, and how long each waited."""

    def __init__(self):
        self.queued: Counter[str] = Counter()  # the ids waiting (a retry may wait beside)
        self.running: dict[str, int] = {}
        self._lock: asyncio.Lock | None = None

    @property
    def waiting(self) -> int:
        return sum(self.queued.values())

    @asynccontextmanager
    async def turn(self, request_id: str, timing: dict[str, float]):
        self._lock = self._lock or asyncio.Lock()
        queued = time.perf_counter()
        self.queued[request_id] += 1
        try:
            await self._lock.acquire()
        finally:
            self.queued[request_id] -= 1
            if not self.queued[request_id]:
                del self.queued[request_id]
        started = time.perf_counter()
        self.running[request_id] = 0
        try:
            yield
        finally:
            self.running.pop(request_id, None)
            self._lock.release()
            timing["queue_s"] = started - queued
            timing["compute_s"] = time.perf_counter() - started


def engine_stats(kind: str, role: str, batcher: ContinuousBatcher, gate: PrefillGate,
                 capacity: int, prefix_cache=None) -> EngineStats:
    """An engine's stats from its decode batcher, prefill gate and prefix cache (if any)."""
    cache = prefix_cache.stats if prefix_cache is not None else None
    health = batcher.health()
    return EngineStats(kind, role, running=len(batcher.running) + len(gate.running),
                       waiting=len(batcher.waiting) + gate.waiting,
                       kv_tokens=batcher.kv_tokens() + sum(gate.running.values()),
                       kv_capacity=capacity, healthy=not health, detail=health,
                       cache_lookup_tokens=cache.lookup_tokens if cache else 0,
                       cache_hit_tokens=cache.hit_tokens if cache else 0,
                       cache_tokens=cache.held_tokens if cache else 0)
