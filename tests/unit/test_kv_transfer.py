"""The KV handoff state machine: legal paths release the ticket, illegal moves raise."""

from __future__ import annotations

import asyncio

import pytest

from services.errors import KVHandoffFailed
from services.kv.backends import LocalHandoff, build_handoff
from services.kv.transfer import IllegalTransition, KVState, KVTransfer
from services.settings import KVHandoffSettings


def test_happy_path_ends_consumed_and_releases():
    transfer = KVTransfer(LocalHandoff(), "r")
    transfer.move(KVState.TRANSFERRING)
    ticket = asyncio.run(transfer.handoff.send(transfer.ticket, {"kv": 1}))
    transfer.ready(ticket)
    assert asyncio.run(transfer.consume()) == {"kv": 1}
    assert transfer.state is KVState.CONSUMED
    assert transfer.ticket.payload is None


@pytest.mark.parametrize("end", [KVState.FAILED, KVState.ABORTED])
def test_failure_or_abort_from_any_live_state_releases(end):
    for steps in ([], [KVState.TRANSFERRING]):
        transfer = KVTransfer(LocalHandoff(), "r")
        for step in steps:
            transfer.move(step)
        transfer.ticket.payload = "held"
        transfer.end(end)
        assert transfer.state is end and transfer.ticket.payload is None
        transfer.end(KVState.FAILED)  # ending twice keeps the first terminal state
        assert transfer.state is end


@pytest.mark.parametrize("path", [
    [KVState.READY], [KVState.CONSUMED],
    [KVState.TRANSFERRING, KVState.CONSUMED],
    [KVState.TRANSFERRING, KVState.ABORTED, KVState.READY],
])
def test_illegal_moves_raise(path):
    transfer = KVTransfer(LocalHandoff(), "r")
    with pytest.raises(IllegalTransition):
        for step in path:
            transfer.move(step)


def test_receive_without_send_fails_typed():
    with pytest.raises(KVHandoffFailed):
        asyncio.run(LocalHandoff().receive(LocalHandoff().open("r")))


def test_unknown_backend_names_the_extra():
    with pytest.raises(ValueError, match="sglang"):
        build_handoff(KVHandoffSettings(backend="sglang"))


@pytest.mark.parametrize("backend", ["object_store", "paired"])
def test_a_cancel_that_comes_as_the_kv_arrives_is_not_lost(backend):
    """Python 3.11's `asyncio.wait_for` returns the result, dropping the cancel, when the
    awaited fetch completes in the turn its caller is cancelled: the decode stream of a client
    who just left ran on to its max_tokens, holding its batch slot and KV."""
    from services.kv import backends
    from services.kv.held import Held
    from services.kv.protocol import KVTicket

    async def go():
        loop = asyncio.get_running_loop()
        arrived = loop.create_future()
        handoff = build_handoff(KVHandoffSettings(backend=backend))
        ticket = KVTicket("r", backend)
        if backend == "object_store":
            ticket.payload = Held(arrived)  # what `fetch` awaits: the object's arrival
        else:
            ticket.fields["bootstrap_room"] = room = 7
            backends._ROOMS[room] = arrived
        task = asyncio.create_task(handoff.receive(ticket))
        for _ in range(3):
            await asyncio.sleep(0)  # waiting for the KV
        arrived.set_result("KV")
        task.cancel()  # in the same turn
        try:
            return await task
        finally:
            backends._ROOMS.pop(7, None)

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(go())
