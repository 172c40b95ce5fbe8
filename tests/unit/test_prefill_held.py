"""The prefill reply a streaming call yields stays whole after the call moves on.

Where Serve runs user code on a thread of its own (`ray.throughput_optimized` off, or a cluster
started without it), a streamed item is serialized after the generator has been resumed; the
prefill replica then releases its ticket (the KV rode in the reply, or the caller closed the
call). If the reply shared that ticket, the caller received a ticket with no KV: every request
whose KV rode in the reply (under `inline_bytes`) failed with `no KV was sent`. In-process
worker, the simulated engine."""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster.settings import parse_settings
from services.context import RequestContext
from services.engines.protocol import EngineRequest, SamplingParams
from services.workers.prefill import PrefillWorker

PROFILE = {"profile": "prefill-held", "auth": {"enabled": False},
           "engine": {"kind": "simulated", "simulated": {"output": "echo"}},
           "kv_handoff": {"backend": "object_store"}}


@pytest.fixture(scope="module")
def worker():
    return PrefillWorker(parse_settings(PROFILE).worker("fast"))


def test_a_reply_read_after_the_call_closed_still_carries_its_kv(worker):
    async def run():
        request = EngineRequest("held-1", list(range(1, 40)), SamplingParams(max_tokens=2))
        legs = worker.prefill_held(RequestContext("held-1"), request,
                                   worker.handoff.open("held-1"))
        reply = await anext(legs)
        await legs.aclose()  # what Serve's loop may do before it serializes the item
        return reply, await worker.handoff.receive(reply.ticket)

    reply, kv = asyncio.run(run())
    assert not worker.handoff.holds(reply.ticket)  # small: it rode in the reply
    assert kv is not None and reply.ticket.num_tokens == 39
    assert worker.engine.stats().kv_tokens == 0


class Holding:
    """The worker's handoff, every KV held by the replica (as one too large to ride in the
    reply is, in the object store), its releases timed."""

    def __init__(self, handoff):
        self.handoff, self.released = handoff, []

    def __getattr__(self, name):
        return getattr(self.handoff, name)

    def holds(self, ticket) -> bool:
        return True

    def release(self, ticket) -> None:
        self.released.append(time.time())  # against the request's (wall-clock) deadline
        self.handoff.release(ticket)


def test_a_held_kv_waits_for_its_caller_past_the_handoff_timeout_until_the_deadline():
    """With `n` choices the ingress hands each KV on once every choice has prefilled: a KV
    prefilled first is held while its siblings prefill, longer than the handoff's timeout
    (which released it and made the choice prefill again); released when the caller closes
    the call, or at the request's deadline if it never does."""
    settings = parse_settings(PROFILE | {"kv_handoff": {"backend": "object_store",
                                                        "timeout_s": 0.2}})
    worker = PrefillWorker(settings.worker("fast"))
    worker.handoff = holding = Holding(worker.handoff)

    async def run(close: bool):
        request = EngineRequest("held-2", list(range(1, 40)), SamplingParams(max_tokens=2))
        ctx = RequestContext("held-2", deadline=time.time() + 1.5)
        legs = worker.prefill_held(ctx, request, holding.open("held-2"))
        replies, before = [], len(holding.released)

        async def serve_side():  # Serve drains a streaming call's generator
            async for item in legs:
                replies.append(item)

        task = asyncio.ensure_future(serve_side())
        await asyncio.sleep(0.8)
        held_then = (len(replies), len(holding.released) - before)
        if close:
            task.cancel()  # the caller closed the call
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 30)
        released = holding.released[before:]
        assert len(released) == 1, released  # released once, by the time the call ended
        return held_then, released[0] - ctx.deadline

    (replied, released), past_deadline = asyncio.run(run(close=True))
    assert (replied, released) == (1, 0)  # past the 0.2 s timeout, still held
    assert past_deadline < -0.3  # released on the close (at 0.8 s), not at the deadline (1.5)
    (replied, released), past_deadline = asyncio.run(run(close=False))
    assert (replied, released) == (1, 0)
    assert past_deadline >= -0.05  # released at the deadline (the clock read a little early)
