"""The prefill worker: runs prompts on its engine and sends their KV through the handoff."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from services.context import RequestContext
from services.engines.protocol import EngineRequest, TokenLogprob
from services.errors import DeadlineExceeded, from_exception
from services.kv.protocol import KVTicket, PairedKV
from services.multimodal.refs import resolve
from services.telemetry import metrics, tracing
from services.workers.engine_host import EngineHost


@dataclass
class PrefillReply:
    """What decode needs from prefill: the first token, the KV ticket, and timings."""

    first_token: int
    prompt_tokens: int
    ticket: KVTicket
    cached_tokens: int
    queue_s: float
    compute_s: float
    # which replica ran it, and the prompt KV its engine holds now (cache-aware routers
    # trim their index of it to that)
    replica: str = ""
    cache_tokens: int = 0
    first_logprob: TokenLogprob | None = None


class PrefillWorker(EngineHost):
    """Serves `prefill` for one pool; a deployment of it scales independently of decode."""

    role = "prefill"

    async def prefill(self, ctx: RequestContext, request: EngineRequest,
                      ticket: KVTicket) -> PrefillReply:
        """Run the prompt, send its KV under `ticket`, and return the first token."""
        started = time.perf_counter()
        with tracing.scope("prefill", ctx.trace_headers, **{
                "small4.request_id": ctx.request_id, "small4.pool": self.settings.pool,
                "small4.prompt_tokens": len(request.prompt_ids),
                "small4.images": len(request.images)}) as span:
            self.arrived(len(request.prompt_ids))
            try:
                # This replica enforces the caller's deadline itself, so a prefill that the
                # caller gave up on stops here and frees its KV (the caller cannot aim an
                # abort at this replica: Serve routes each call anew).
                async with asyncio.timeout(ctx.remaining_s()):
                    request.images = await resolve(request.images)
                    request.handoff = dict(ticket.fields)
                    # the engine's own spans (SGLang's) join the request's trace under this one
                    request.trace_headers = tracing.headers_of(span, ctx.trace_headers)
                    result = await self.engine.prefill(request)
                    kv = (PairedKV(result.first_token, result.kv, result.first_logprob)
                          if self.handoff.concurrent else result.kv)
                    ticket = await self.handoff.send(ticket, kv)
            except TimeoutError:
                metrics.ERRORS.inc(type=DeadlineExceeded.type, **self.tags)
                raise DeadlineExceeded("the prefill did not finish before its deadline",
                                       request_id=ctx.request_id) from None
            except Exception as exc:
                metrics.ERRORS.inc(type=from_exception(exc).type, **self.tags)
                raise
            finally:
                stats = self.engine.stats()
                metrics.record_engine(stats, self.settings.pool, self.replica)
            span.set_attributes({"small4.queue_wait_s": result.queue_s,
                                 "small4.compute_s": result.compute_s,
                                 "small4.cached_tokens": result.cached_tokens,
                                 "small4.kv_bytes": ticket.nbytes})
        elapsed = time.perf_counter() - started
        metrics.TTFT.observe(elapsed, **self.tags)
        self.load.prefilled(result.prompt_tokens, result.compute_s, result.queue_s, elapsed)
        return PrefillReply(result.first_token, result.prompt_tokens, ticket,
                            result.cached_tokens, result.queue_s, result.compute_s,
                            self.replica, stats.cache_tokens, result.first_logprob)

    async def prefill_held(self, ctx: RequestContext, request: EngineRequest,
                           ticket: KVTicket) -> AsyncIterator[PrefillReply]:
        """The sequential handoff's prefill as a streaming call: the reply, then a KV this
        replica holds for it (one too large to ride in the reply) is kept until the caller
        closes the call (it has the KV, gave up, or was cancelled) and released then. A caller
        may keep it a while: with `n` choices the ingress hands each KV to decode once every
        choice has prefilled, so a choice prefilled early waits for its siblings. A caller
        that vanished without closing it leaves it held until the deadline of the call (the
        attempt's: `PrefillClient.run` gives each attempt its own), at least the handoff's
        `timeout_s`; a sibling's retry that outlasts that finds this choice's KV gone and
        resumes it from its prompt. A KV sent in the reply holds nothing: the call ends."""
        reply = await self.prefill(ctx, request, ticket)
        kept = reply.ticket
        try:
            # The caller's reply has a ticket of its own: where Serve runs user code on a
            # thread of its own (`ray.throughput_optimized` off), it serializes a streamed item
            # after this generator has moved on, and releasing ours must not empty theirs.
            yield replace(reply, ticket=replace(kept))
            if self.handoff.holds(kept):
                await asyncio.sleep(max(self.settings.kv_handoff.timeout_s,
                                        ctx.remaining_s() or 0.0))
        finally:
            self.handoff.release(kept)

    async def prefill_paired(self, ctx: RequestContext, request: EngineRequest,
                             ticket: KVTicket) -> AsyncIterator[KVTicket | PrefillReply]:
        """The concurrent handoff's prefill (a streaming call, so both parts come from this
        replica): first the ticket saying where this replica serves the KV, so the decode
        engine can start and wait for it, then the reply once the KV is sent."""
        ticket = self.handoff.bind(ticket)
        yield replace(ticket)  # a copy: sending the KV fills in ours (see `prefill_held`)
        yield await self.prefill(ctx, request, ticket)

