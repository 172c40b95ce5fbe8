"""Every KV handoff honours the seam's contract (`services/kv/protocol.py`), run against each
backend: in-process, Ray's object store, the in-process pairing, and SGLang's pairing (whose KV
the engines move themselves; the GPU path that moves it is `tests/gpu`). The decode side and
the prefill side are separate instances, as in separate replicas."""

from __future__ import annotations

import asyncio
import pickle

import pytest

from services.engines.protocol import EngineRequest, SamplingParams
from services.errors import KVHandoffFailed
from services.kv.backends import build_handoff
from services.kv.protocol import KVHandoff, PairedKV
from services.settings import KVHandoffSettings


class BoundPrefillEngine:
    """Where a started SGLang prefill engine serves its KV (what `bind` reads from it)."""

    host, bootstrap_port = "10.0.0.9", 9000


class DecodeEngine:
    """What SGLang's `receive` asks of the decode replica's engine: open the room's request
    (here: hand back the pairing it was opened with; the engine's own stream is
    `tests/contract/test_sglang_pairing.py`'s)."""

    async def open_decode(self, request, pairing):
        return pairing


class KV:
    num_tokens, nbytes = 7, 7 * 11520


REQUEST = EngineRequest("r", [1, 2], SamplingParams(max_tokens=1))


def sides(backend: str) -> tuple[KVHandoff, KVHandoff]:
    """(decode side, prefill side) of `backend`."""
    # object_store: every KV by reference, so the contract covers the store's path (the
    # inline one is the local backend's; `test_object_store_inlines_only_small_kv`)
    settings = KVHandoffSettings(backend=backend, timeout_s=0.3, inline_bytes=0)
    if backend == "sglang":
        from services.engines.sglang_engine import SGLangHandoff

        return SGLangHandoff(DecodeEngine()), SGLangHandoff(BoundPrefillEngine())
    return build_handoff(settings), build_handoff(settings)


@pytest.fixture(params=["local", "object_store", "paired", "sglang"])
def backend(request):
    if request.param == "object_store":
        request.getfixturevalue("ray_session")
    return request.param


def prefill_side_delivers(decode, prefill, ticket):
    """What the prefill replica does with the ticket it was sent: bind it (concurrent
    handoffs, before running), then send what its engine produced."""
    if decode.concurrent:
        ticket = prefill.bind(pickle.loads(pickle.dumps(ticket)))
        return ticket, PairedKV(first_token=42, kv=KV())
    return ticket, KV()


def test_is_a_handoff(backend):
    decode, _ = sides(backend)
    assert isinstance(decode, KVHandoff) and decode.backend == backend
    assert hasattr(decode, "bind") == decode.concurrent


def test_tickets_are_distinct_and_cross_process_boundaries(backend):
    async def run():
        decode, _ = sides(backend)
        first, second = decode.open("r"), decode.open("r")
        if decode.concurrent:  # each attempt pairs in its own room
            assert first.fields["bootstrap_room"] != second.fields["bootstrap_room"]
        copy = pickle.loads(pickle.dumps(first))
        assert (copy.request_id, copy.backend, copy.fields) == ("r", backend, first.fields)
        decode.release(first), decode.release(second)
    asyncio.run(run())


async def delivered(backend: str):
    """A ticket opened on the decode side and sent by the prefill side: (decode side, ticket
    as it came back across the boundary)."""
    decode, prefill = sides(backend)
    ticket, kv = prefill_side_delivers(decode, prefill, decode.open("r"))
    sent = await prefill.send(ticket, kv)
    return decode, (sent if backend == "local" else pickle.loads(pickle.dumps(sent)))


def test_what_the_prefill_side_sends_the_decode_side_receives(backend):
    async def run():
        decode, sent = await delivered(backend)
        got = await decode.receive(sent, REQUEST)
        decode.release(sent)
        decode.release(sent)  # twice is harmless
        return got
    got = asyncio.run(run())
    if backend == "sglang":  # the decode engine's request, opened in the prefill's room
        assert got == PairedKV(None, {"bootstrap_room": got.kv["bootstrap_room"],
                                      "bootstrap_host": "10.0.0.9", "bootstrap_port": 9000})
    elif backend == "paired":
        assert got.first_token == 42 and got.kv.num_tokens == 7
    else:
        assert got.num_tokens == 7


def test_a_ticket_nobody_sent_is_not_waited_on_forever(backend):
    async def run():
        decode, _ = sides(backend)
        ticket = decode.open("r")
        try:
            return await asyncio.wait_for(decode.receive(ticket, REQUEST), 5)
        finally:
            decode.release(ticket)
    # SGLang's too: a room no prefill engine bound names no peer to take the KV from (the real
    # engine's request arguments refused it with a bare ValueError, a 500)
    with pytest.raises(KVHandoffFailed):
        asyncio.run(run())


@pytest.mark.parametrize("backend", ["local", "object_store", "paired"], indirect=True)
def test_release_lets_go_of_the_kv(backend):
    async def run():
        decode, sent = await delivered(backend)
        decode.release(sent)
        with pytest.raises(KVHandoffFailed):
            await decode.receive(sent)
    asyncio.run(run())


@pytest.mark.parametrize("inline_bytes, by_reference", [(KV.nbytes, False), (KV.nbytes - 1, True)])
def test_object_store_inlines_only_small_kv(ray_session, inline_bytes, by_reference):
    """A KV up to `inline_bytes` rides in the reply by value; a larger one crosses as a `Held`
    the prefill side keeps, so the reply stays small on Serve's gRPC transport."""
    from services.kv.held import Held

    async def run():
        settings = KVHandoffSettings(backend="object_store", inline_bytes=inline_bytes)
        decode, prefill = build_handoff(settings), build_handoff(settings)
        sent = await prefill.send(decode.open("r"), KV())
        wire = pickle.loads(pickle.dumps(sent))
        assert isinstance(wire.payload, Held) is by_reference
        assert prefill.holds(sent) is by_reference  # only then has the prefill side to wait
        assert len(pickle.dumps(sent)) < 1024  # a reference or the small KV itself
        got = await decode.receive(wire, REQUEST)
        prefill.release(sent)
        return got
    assert asyncio.run(run()).num_tokens == 7
