"""The prefill reply a streaming call yields stays whole after the call moves on.

Where Serve runs user code on a thread of its own (`ray.throughput_optimized` off, or a cluster
started without it), a streamed item is serialized after the generator has been resumed; the
prefill replica then releases its ticket (the KV rode in the reply, or the caller closed the
call). If the reply shared that ticket, the caller received a ticket with no KV: every request
whose KV rode in the reply (under `inline_bytes`) failed with `no KV was sent`. In-process
worker, the simulated engine."""

from __future__ import annotations

import asyncio

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
