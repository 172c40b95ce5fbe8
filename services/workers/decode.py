"""The decode worker: drives the prefill → KV handoff → decode sequence for each request.

It is the orchestrator of the disaggregated path (states in `services.kv.transfer`): it opens a
transfer, asks a prefill replica of its pool for the prompt's KV, imports it, and streams tokens
back in coalesced chunks (at most one message per `stream.interval_tokens` tokens or
`stream.interval_ms`, never one per token). Cancelling the stream aborts whichever leg is live and
releases the KV. A first leg whose prefill the request service ran itself (sequential handoffs)
comes as `decode_handed`: the KV is received, and the tokens after the first stream back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from services.context import RequestContext
from services.engines.protocol import EngineRequest, EngineStats, TokenChunk, TokenLogprob
from services.errors import DeadlineExceeded, EngineError, KVHandoffFailed, from_exception
from services.kv.transfer import KVState, KVTransfer
from services.settings import StreamSettings, WorkerSettings
from services.telemetry import metrics, tracing
from services.workers import router_state
from services.workers.engine_host import EngineHost
from services.workers.peer import call, close_stream, in_background, stream
from services.workers.prefill import PrefillReply, PrefillWorker
from services.workers.prefill_client import (ABORT_S, STUCK_GRACE_S, PrefillClient, timings,
                                             worth_retrying)

log = logging.getLogger("small4.decode")


@dataclass
class StreamChunk:
    """Tokens on their way to the ingress; the first chunk also carries the prefill facts."""

    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    timings: dict[str, Any] = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked
    # no tokens, only news: the leg's KV arrived (`decode_handed`: the caller that ran the
    # prefill lets it go then, not at the first decoded chunk, which may wait for a batch slot)
    kv_received: bool = False


class DecodeWorker(EngineHost):
    """Serves `generate` for one pool, with `prefill` as its peer (a handle or an object)."""

    role = "decode"

    def __init__(self, settings: WorkerSettings, prefill: Any):
        super().__init__(settings)
        self.prefill = prefill

    @property
    def prefill_client(self) -> PrefillClient:
        """Prefills of this pool through this replica's handoff (sequential handoffs)."""
        return PrefillClient(self.prefill, self.handoff, self.settings.kv_handoff,
                             self.settings.pool)

    async def generate(self, ctx: RequestContext,
                       request: EngineRequest) -> AsyncIterator[StreamChunk]:
        """Prefill remotely, import the KV, then stream the decoded tokens in chunks."""
        async with aclosing(self._decode(ctx, request, self._start, send_first=True)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def decode_handed(self, ctx: RequestContext, request: EngineRequest,
                            reply: PrefillReply) -> AsyncIterator[StreamChunk]:
        """Decode a request whose prefill the caller ran (`PrefillClient.run` without
        receiving) and whose first token it has sent already: receive the KV the reply's
        ticket names, say so (a `kv_received` chunk: the prefill may free its copy), then
        stream the tokens after the first. A KV that does not arrive is a `KVHandoffFailed`,
        which the caller answers by resuming the request."""
        async def start(ctx: RequestContext, request: EngineRequest, span) -> _Leg:
            transfer = KVTransfer(self.handoff, request.request_id)
            transfer.move(KVState.TRANSFERRING)
            transfer.ready(reply.ticket)
            try:
                with tracing.scope("kv_handoff", span, **{
                        "small4.kv_backend": self.handoff.backend,
                        "small4.kv_bytes": reply.ticket.nbytes,
                        "small4.kv_tokens": reply.ticket.num_tokens, "small4.attempt": 0}):
                    kv = await transfer.consume()
            except BaseException as exc:
                transfer.end(KVState.ABORTED if isinstance(exc, asyncio.CancelledError)
                             else KVState.FAILED)
                raise
            return _Leg(reply.first_token, kv, reply.prompt_tokens,
                        timings(reply, transfer, self.handoff.backend),
                        first_logprob=reply.first_logprob)

        async with aclosing(self._decode(ctx, request, start, send_first=False)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _decode(self, ctx: RequestContext, request: EngineRequest,
                      start: Callable[..., Awaitable[_Leg]],
                      send_first: bool) -> AsyncIterator[StreamChunk]:
        """Start the leg (`start`: the prefill and KV), then stream the decoded tokens in
        chunks: from the first token, or after it when the caller has sent it already."""
        received = time.perf_counter()
        span = tracing.start("decode", ctx.trace_headers, **{
            "small4.request_id": ctx.request_id, "small4.pool": self.settings.pool})
        outcome = {"tokens_out": 0, "finish_reason": None, "error": None}
        self.arrived(len(request.prompt_ids))
        stream = self.load.stream()  # what it decodes, for the autoscaler's expected output
        ttft, leg, tokens, upstream = 0.0, None, None, 0.0
        try:
            leg = await start(
                replace(ctx, trace_headers=tracing.headers_of(span, ctx.trace_headers)),
                request, span)
            upstream = time.perf_counter() - received  # the prefill and the KV's transfer
            if not send_first:  # the caller holds the prefill's copy of the KV until it hears
                yield StreamChunk([], kv_received=True)
            # the engine's own spans (SGLang's) join the request's trace under this leg's span;
            # a copy: in one process the prefill worker may still read the request
            tokens = self.engine.decode(
                replace(request, trace_headers=tracing.headers_of(span, ctx.trace_headers)),
                leg.first_token, leg.kv)
            leg.kv = None  # the engine has it now: ours pinned a second copy the whole decode
            if leg.first_token is not None:  # prefill sampled it
                first = StreamChunk([leg.first_token], logprobs=(
                    [leg.first_logprob] if leg.first_logprob is not None else None))
            else:  # the decode engine streams from the first token (SGLang)
                head = await _by_deadline(ctx, anext(tokens, None), request)
                if head is None:
                    raise EngineError("the decode engine ended before its first token",
                                      request_id=request.request_id)
                first = StreamChunk(head.token_ids, head.finish_reason, logprobs=head.logprobs)
            ttft = time.perf_counter() - received
            metrics.TTFT.observe(ttft, **self.tags)
            span.set_attribute("small4.ttft_s", ttft)
            first.prompt_tokens, first.timings = leg.prompt_tokens, leg.timings
            if first.finish_reason:
                first.timings = leg.timings | await leg.late_timings()
            outcome["tokens_out"], outcome["finish_reason"] = len(first.token_ids), first.finish_reason
            stream.tokens = outcome["tokens_out"]
            if send_first or first.finish_reason:
                yield first
            if first.finish_reason:
                return
            async with aclosing(coalesce(tokens, self.settings.stream, self._observe_itl)) as chunks:
                # each wait on the engine ends at the deadline: a stalled engine kept the
                # sequence's KV and batch slot past it, for a caller gone by then
                while (chunk := await _by_deadline(ctx, anext(chunks, None), request)
                       ) is not None:
                    outcome["tokens_out"] += len(chunk.token_ids)
                    stream.tokens = outcome["tokens_out"]
                    outcome["finish_reason"] = chunk.finish_reason
                    if chunk.finish_reason:
                        chunk.timings = await leg.late_timings()
                    yield chunk
        except Exception as exc:
            outcome["error"] = exc
            metrics.ERRORS.inc(type=from_exception(exc).type, **self.tags)
            raise
        finally:
            # the engine stream is closed here, however this ends (a deadline, the caller
            # gone, an error): an engine frees a sequence's batch slot and KV only when its
            # stream is closed, and `coalesce` never closes what it reads
            try:
                if tokens is not None:
                    await tokens.aclose()
            except Exception as exc:  # never in place of the error that ended the stream
                log.warning("closing the engine stream of %s failed: %r", request.request_id,
                            exc)
            finally:
                if leg is not None:
                    await leg.close()
            tracing.finish(span, outcome["error"], **{
                "small4.tokens_out": outcome["tokens_out"],
                "small4.finish_reason": outcome["finish_reason"] or "abort"})
            if outcome["finish_reason"]:
                # decode's own wait is what came after the KV was here: the prefill and the
                # transfer are the prefill role's time (its queue counted as decode's made a
                # prefill-bound pool ask for decode engines, the arbiter moving them away
                # from prefill, which needed them)
                self.load.decoded(outcome["tokens_out"],
                                  time.perf_counter() - received - ttft,
                                  max(ttft - upstream, 0.0), stream)
            else:
                stream.ended(outcome["tokens_out"])
            metrics.record_engine(self.engine.stats(), self.settings.pool)
            outcome.clear()  # no cycle (error → traceback → this frame) keeps the stream

    def _observe_itl(self, seconds: float, tokens: int) -> None:
        for _ in range(tokens):
            metrics.ITL.observe(seconds / tokens, **self.tags)
        self.load.generated(tokens, seconds / tokens)

    async def _start(self, ctx: RequestContext, request: EngineRequest, span) -> _Leg:
        """Prefill through the pool's handoff: after it (sequential) or beside it (concurrent)."""
        if self.handoff.concurrent:
            return await self._paired_prefill(ctx, request)
        done = await self.prefill_client.run(ctx, request, span)
        return _Leg(done.reply.first_token, done.kv, done.reply.prompt_tokens,
                    timings(done.reply, done.transfer, self.handoff.backend),
                    first_logprob=done.reply.first_logprob)

    async def _paired_prefill(self, ctx: RequestContext, request: EngineRequest) -> _Leg:
        """The concurrent handoff (SGLang): per attempt, open a room, learn from the prefill
        replica where it serves the KV, and start decoding while the prefill runs. A prefill
        that fails before the KV arrives is retried in a new room, like `_prefill_with_retries`;
        one that fails after ends this decode leg at once (SGLang's own router leaves it waiting
        out a 300 s timeout, sglang#9726), and the ingress resumes the stream."""
        handoff, last = self.settings.kv_handoff, None
        attempts = ctx.attempts_at_most(handoff.prefill_attempts)
        for attempt in range(attempts):
            await self.prefill_client.before_attempt(attempt, ctx, request)
            transfer = KVTransfer(self.handoff, request.request_id)
            attempt_s = handoff.attempt_timeout_s(len(request.prompt_ids))
            legs = stream(self.prefill, PrefillWorker.prefill_paired, ctx.within(attempt_s),
                          request, transfer.ticket)
            replied = received = None
            prefilled = False  # the prefill replied: the attempt's clock is the request's
            try:
                async with asyncio.timeout(attempt_s + STUCK_GRACE_S) as clock:
                    transfer.move(KVState.TRANSFERRING)
                    transfer.ready(await anext(legs))
                    replied = asyncio.ensure_future(anext(legs))
                    replied.add_done_callback(partial(_prefill_left_its_queue,
                                                      request.request_id))
                    received = asyncio.ensure_future(transfer.consume(request))
                    await asyncio.wait({replied, received}, return_when=asyncio.FIRST_COMPLETED)
                    if replied.done():
                        replied.result()  # a failed prefill raises here
                        # prefilled: what is left is this engine's own wait (its KV, a batch
                        # slot: SGLang's pre-allocation queue under load), which the request's
                        # deadline bounds, not the prefill attempt's clock (that ran it out and
                        # prefilled again, ending in a 502 for a saturated decode)
                        left = ctx.remaining_s()
                        clock.reschedule(None if left is None
                                         else asyncio.get_running_loop().time() + left)
                        prefilled = True
                    paired = await received
            except BaseException as exc:
                await _cancel(replied, received)
                if _succeeded(received):
                    # its KV came (SGLang: the decode engine's request for the room opened) in
                    # the turn the attempt ended (its prefill failed beside it, its time ran
                    # out, its client left): nobody will read that request, so it is aborted
                    # (SGLang would decode it to max_tokens, holding its KV and a batch slot)
                    await asyncio.shield(self.engine.abort(request.request_id))
                await close_stream(legs)
                cancelled = isinstance(exc, asyncio.CancelledError)
                transfer.end(KVState.ABORTED if cancelled else KVState.FAILED)
                if prefilled and isinstance(exc, TimeoutError):
                    # the prefill did its part; the request's own deadline passed meanwhile
                    raise DeadlineExceeded("the request's deadline passed while its KV waited "
                                           "for this decode engine",
                                           request_id=request.request_id) from None
                if cancelled or not worth_retrying(exc):
                    raise
                last = exc
                continue
            timings = {"kv_backend": self.handoff.backend}
            if replied.done() and isinstance(replied.result(), PrefillReply):
                timings["cached_tokens"] = replied.result().cached_tokens
            return _Leg(paired.first_token, paired.kv, len(request.prompt_ids), timings,
                        self._watch_prefill(request.request_id, legs, replied),
                        first_logprob=paired.first_logprob,
                        replied=None if "cached_tokens" in timings else replied)
        raise KVHandoffFailed(f"prefill failed on {attempts} attempts "
                              f"(last: {type(last).__name__}: {last})",
                              request_id=request.request_id)

    def _watch_prefill(self, request_id: str, legs: Any, replied: asyncio.Future):
        """Abort this decode leg if its prefill fails after all; the close of the request."""
        def on_done(task: asyncio.Future) -> None:
            if not task.cancelled() and task.exception() is not None:
                in_background(self.engine.abort(request_id), timeout_s=ABORT_S)

        replied.add_done_callback(on_done)

        async def close() -> None:
            await _cancel(replied)
            await close_stream(legs, answered=True)  # it sent the ticket
        return close

    async def readiness(self) -> dict[str, EngineStats]:
        """This replica's and a prefill replica's stats: both legs of the pool answer."""
        return {"decode": self.engine.stats(), "prefill": await call(self.prefill, PrefillWorker.stats)}


async def _nothing() -> None:
    return None


async def _by_deadline(ctx: RequestContext, waiting: Awaitable[Any],
                       request: EngineRequest) -> Any:
    """`waiting`, or `DeadlineExceeded` once the request's deadline passes first."""
    try:
        async with asyncio.timeout(ctx.remaining_s()):
            return await waiting
    except TimeoutError:
        raise DeadlineExceeded("the request's deadline passed while decoding",
                               request_id=request.request_id) from None


def _prefill_left_its_queue(request_id: str, replied: asyncio.Future) -> None:
    """The concurrent handoff's prefill reply came: its prefill left its replica's queue in
    the routers' reckoning now, not when its call closes with the decode stream (minutes
    later). What the replica holds is not reported there (SGLang's radix cache): its index
    is left as it is."""
    if _succeeded(replied) and isinstance(reply := replied.result(), PrefillReply):
        router_state.correct(reply.replica, None, request_id, reply.cached_tokens)


def _succeeded(task: asyncio.Future | None) -> bool:
    return task is not None and task.done() and not task.cancelled() \
        and task.exception() is None


async def _cancel(*tasks: asyncio.Future | None) -> None:
    """Cancel the tasks that are still running and wait until they have stopped."""
    running = [t for t in tasks if t is not None and not t.done()]
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)


@dataclass
class _Leg:
    """How the decode engine starts: the prompt's first token (None: the engine streams it)
    and KV, the facts for the first chunk, and what to close when the request ends."""

    first_token: int | None
    kv: Any
    prompt_tokens: int
    timings: dict[str, Any]
    close: Callable[[], Awaitable[None]] = _nothing
    first_logprob: TokenLogprob | None = None
    # the concurrent handoff's prefill reply, which may come after decoding started: its facts
    # (cached tokens) go with the last chunk instead of the first
    replied: asyncio.Future | None = None

    async def late_timings(self) -> dict[str, Any]:
        """The prefill reply's facts for the last chunk, waiting a moment for a reply not yet
        come; {} when it does not come (or there is none to wait for)."""
        replied = self.replied
        if replied is None:
            return {}
        await asyncio.wait({replied}, timeout=STUCK_GRACE_S)
        if not _succeeded(replied):
            return {}
        reply = replied.result()
        return {"cached_tokens": reply.cached_tokens} if isinstance(reply, PrefillReply) else {}


async def coalesce(chunks: AsyncIterator[TokenChunk], interval: StreamSettings,
                   on_tokens: Callable[[float, int], None] | None = None,
                   ) -> AsyncIterator[StreamChunk]:
    """Merge engine chunks until `interval_tokens` or `interval_ms` is reached, or the end;
    `on_tokens(seconds, n)` hears each engine chunk's arrival gap and size."""
    pending: list[int] = []
    logprobs: list[TokenLogprob] = []
    last = arrived = time.perf_counter()
    async for chunk in chunks:
        pending.extend(chunk.token_ids)
        logprobs.extend(chunk.logprobs or ())
        now = time.perf_counter()
        if on_tokens is not None and chunk.token_ids:
            on_tokens(now - arrived, len(chunk.token_ids))
        arrived = now
        due = (len(pending) >= interval.interval_tokens
               or (now - last) * 1000.0 >= interval.interval_ms)
        if chunk.finish_reason or (pending and due):
            yield StreamChunk(pending, chunk.finish_reason, logprobs=logprobs or None)
            pending, logprobs, last = [], [], now
