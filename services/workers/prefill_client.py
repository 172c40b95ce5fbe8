"""The caller's side of a sequential prefill: a prompt run on a prefill replica of a pool, its
KV handed over through the pool's handoff, retried as a whole when an attempt fails.

Two callers: the decode worker (`DecodeWorker.generate`: prefill, then receive the KV and
decode) and the request service, which runs the first leg of a request itself so the first
token comes back from the prefill replica without passing through decode
(`DecodeWorker.decode_handed`, which receives the KV, is opened once that token is out).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

from services.context import RequestContext
from services.engines.protocol import EngineRequest
from services.errors import (DeadlineExceeded, EngineError, KVHandoffFailed, StackError,
                             from_exception, retryable)
from services.kv.protocol import KVHandoff
from services.kv.transfer import KVState, KVTransfer
from services.settings import KVHandoffSettings
from services.telemetry import metrics, tracing
from services.workers import router_state
from services.workers.peer import call, close_stream, in_background, stream
from services.workers.prefill import PrefillReply, PrefillWorker

# How much longer than its deadline a prefill replica gets to answer before it counts as stuck.
STUCK_GRACE_S = 1.0
ABORT_S = 2.0  # an abort sent after an attempt that was cancelled or ran late


@dataclass
class Prefilled:
    """A prefill's reply and, when this side received it, its KV; `legs` is the prefill call
    still open when the KV is left for someone else to receive (the prefill replica keeps a
    KV it holds until that call is closed: `close`)."""

    reply: PrefillReply
    transfer: KVTransfer
    kv: Any = None
    legs: Any = None

    async def close(self) -> None:
        if self.legs is not None:
            legs, self.legs = self.legs, None
            await asyncio.shield(close_stream(legs, answered=True))


class PrefillClient:
    """Prefills of one pool through its sequential handoff (`handoff.concurrent` is False)."""

    def __init__(self, prefill: Any, handoff: KVHandoff, settings: KVHandoffSettings,
                 pool: str):
        self.prefill, self.handoff, self.settings, self.pool = prefill, handoff, settings, pool

    async def run(self, ctx: RequestContext, request: EngineRequest, span: Any = None, *,
                  receive: bool = True) -> Prefilled:
        """Prefill on a replica of the pool, then (with `receive`) receive its KV here. An
        attempt is both — a prefill whose KV never arrives (the replica died after replying,
        the object store lost it, the transfer stalled past `kv_handoff.timeout_s`) failed as
        much as one that never replied — so when the replica dies, fails as unavailable, does
        not finish within its attempt's time, or its KV does not arrive, the whole attempt is
        made again (Serve routes the new call to any live replica), up to `prefill_attempts`
        times (fewer where `ctx.attempts` says so), each with a transfer of its own. Each
        attempt carries its deadline, which the prefill replica enforces itself (freeing what
        it holds); waiting a little longer here
        covers a replica too stuck to answer at all. The prefill replica keeps the KV until
        the call it replied in is closed: here once the attempt is over, or, without
        `receive`, by the caller once the KV was received elsewhere (`Prefilled.close`)."""
        last = None
        attempt_s = self.settings.attempt_timeout_s(len(request.prompt_ids))
        first = request
        attempts = ctx.attempts_at_most(self.settings.prefill_attempts)
        for attempt in range(attempts):
            await self.before_attempt(attempt, ctx, first)
            # each attempt is its own engine request: the abort sent after a late attempt
            # (routed anew, it may arrive while the next attempt waits on the same replica)
            # must stop that attempt, never the retry
            request = replace(first, request_id=f"{first.request_id}.retry{attempt}"
                              ) if attempt else first
            transfer = KVTransfer(self.handoff, request.request_id)
            transfer.move(KVState.TRANSFERRING)
            legs = stream(self.prefill, PrefillWorker.prefill_held, ctx.within(attempt_s),
                          request, transfer.ticket)
            kept = answered = False
            try:
                async with asyncio.timeout(attempt_s + STUCK_GRACE_S):
                    reply = await anext(legs)
                answered = True
                transfer.ready(reply.ticket)
                if reply.replica:  # what the replica holds now corrects the routers' index
                    router_state.correct(reply.replica, reply.cache_tokens, request.request_id,
                                         reply.cached_tokens)
                if not receive:
                    kept = True
                    return Prefilled(reply, transfer, legs=legs)
                with tracing.scope("kv_handoff", span, **{
                        "small4.kv_backend": self.handoff.backend,
                        "small4.kv_bytes": reply.ticket.nbytes,
                        "small4.kv_tokens": reply.ticket.num_tokens,
                        "small4.attempt": attempt}):
                    kv = await transfer.consume()
                return Prefilled(reply, transfer, kv=kv)
            except BaseException as exc:
                cancelled = isinstance(exc, asyncio.CancelledError)
                transfer.end(KVState.ABORTED if cancelled else KVState.FAILED)
                if cancelled or isinstance(exc, TimeoutError):
                    # a backstop, not awaited: closing the call below is what reaches the
                    # replica running it (Serve routes an abort anew, maybe into the same queue
                    # that made this attempt late, and a retry must not wait behind it)
                    # (for ABORT_S at most: the replica may be gone, its KV with it, or busy)
                    in_background(call(self.prefill, PrefillWorker.abort, request.request_id),
                                  timeout_s=ABORT_S)
                if cancelled:
                    raise
                if not worth_retrying(exc):
                    if isinstance(exc, StackError):
                        raise
                    raise EngineError("prefill failed with an internal engine error",
                                      request_id=first.request_id) from exc
                last = exc
            finally:  # the prefill replica lets go of the KV it kept for this attempt
                if not kept:
                    await asyncio.shield(close_stream(legs, answered=answered))
        raise KVHandoffFailed(f"prefill failed on {attempts} attempts "
                              f"(last: {type(last).__name__}: {last})",
                              request_id=first.request_id)

    async def before_attempt(self, attempt: int, ctx: RequestContext,
                             request: EngineRequest) -> None:
        """Back off before a retry; refuse to start an attempt past the request's deadline."""
        if attempt:
            await asyncio.sleep(min(0.1 * 2 ** attempt, 1.0))
        if (ctx.remaining_s() or 1.0) <= 0:
            raise DeadlineExceeded("the request's deadline passed during prefill",
                                   request_id=request.request_id)
        if attempt:  # counted once it is made
            metrics.PREFILL_RETRIES.inc(pool=self.pool)


def worth_retrying(exc: BaseException) -> bool:
    """A prefill attempt that failed with its replica, or ran out its own time. Anything the
    request caused (`InvalidRequest`: bad input, the engine rejecting it) or the engine raised
    deterministically fails the same way on every replica: answered once, never retried."""
    return (isinstance(exc, (TimeoutError, StopAsyncIteration, KVHandoffFailed))
            or retryable(exc) or isinstance(from_exception(exc), DeadlineExceeded))


def timings(reply: PrefillReply, transfer: KVTransfer, backend: str) -> dict[str, Any]:
    """The prefill's facts for the first chunk (and the ingress's usage and logs)."""
    return {"prefill_queue_s": reply.queue_s, "prefill_s": reply.compute_s,
            "cached_tokens": reply.cached_tokens,
            "kv_s": transfer.seconds(KVState.READY, KVState.CONSUMED),
            "kv_bytes": transfer.ticket.nbytes, "kv_backend": backend}
