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
