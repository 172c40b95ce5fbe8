"""Closing a remote stream: the cycle Serve leaves around a call cancelled while it is still
being placed (an exception, its traceback and the router's frame, holding the call's arguments)
is collected shortly after, not whenever Python's collector next happens to run. The Ray-level
proof is `tests/adversarial/test_load_concurrency.py` (clients leaving right after the first
event leave no objects behind); here the mechanism, with the collector's own schedule off."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from services.workers import peer


class Arguments:
    """Stands for a call's arguments (the KV and pixel references)."""


class CancelledCall:
    """A remote stream whose cancellation leaves its arguments in a reference cycle, as
    Serve's router does with a call cancelled while it is being placed."""

    def __init__(self, arguments: Arguments):
        self.arguments = arguments

    def cancel(self) -> None:
        try:
            raise asyncio.CancelledError
        except asyncio.CancelledError as exc:
            exc.holder = {"exc": exc, "arguments": self.arguments}  # a cycle


async def collections_done(deadline_s: float = 10.0) -> None:
    """Until no collection is planned on this loop (a collection in a process as big as the
    test suite's takes far longer than the tests' COLLECT_AFTER_S)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while loop in peer._scheduled and loop.time() < deadline:
        await asyncio.sleep(0.01)


def arguments_after(close: bool, monkeypatch) -> weakref.ref:
    monkeypatch.setattr(peer, "COLLECT_AFTER_S", 0.05)

    async def run():
        arguments = Arguments()
        alive = weakref.ref(arguments)
        call = CancelledCall(arguments)
        if close:
            await peer.close_stream(call)
        else:
            call.cancel()
        del call, arguments
        await asyncio.sleep(0.1)
        await collections_done()
        return alive

    return asyncio.run(run())


@pytest.fixture
def no_automatic_collection():
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def test_a_cancelled_streams_cycle_is_collected_soon_after(no_automatic_collection,
                                                          monkeypatch):
    assert arguments_after(True, monkeypatch)() is None


def test_without_closing_through_peer_the_cycle_stays(no_automatic_collection, monkeypatch):
    """The control: the same cycle, cancelled directly, is still there (what the load test saw
    before: objects held for minutes on an idle ingress)."""
    assert arguments_after(False, monkeypatch)() is not None


class Handle:
    """A deployment handle whose `run` call, cancelled while it is placed, leaves its
    arguments in a reference cycle."""

    def __init__(self):
        self.run = self

    async def remote(self, arguments: Arguments):
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError as exc:
            exc.holder = {"exc": exc, "arguments": arguments}  # a cycle
            raise


def run(peer_, arguments):  # the worker method `call` names
    raise NotImplementedError


def test_a_cancelled_calls_cycle_is_collected_soon_after(no_automatic_collection, monkeypatch):
    """Not only streams: a unary call (an image's preprocessing) cancelled because the client
    left is followed by a collection too."""
    monkeypatch.setattr(peer, "COLLECT_AFTER_S", 0.05)

    async def scenario():
        arguments = Arguments()
        alive = weakref.ref(arguments)
        task = asyncio.ensure_future(peer.call(Handle(), run, arguments))
        del arguments
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        del task
        await collections_done()
        return alive

    assert asyncio.run(scenario())() is None


class SlowlyCancelledCall(CancelledCall):
    """A call whose cancellation unwinds on the event loop: its cycle forms `after_s` later."""

    def __init__(self, arguments: Arguments, after_s: float):
        super().__init__(arguments)
        self.after_s = after_s

    def cancel(self) -> None:
        asyncio.get_running_loop().call_later(self.after_s, CancelledCall.cancel, self)


def test_a_cycle_formed_after_a_collection_ran_is_collected_by_a_later_one(
        no_automatic_collection, monkeypatch):
    """Clients leaving one after another: the second call is cancelled just before the
    collection the first scheduled, and its cycle forms just after that collection ran."""
    monkeypatch.setattr(peer, "COLLECT_AFTER_S", 0.1)

    async def run():
        await peer.close_stream(CancelledCall(Arguments()))  # a collection due at 0.1 s
        await asyncio.sleep(0.08)
        arguments = Arguments()
        alive = weakref.ref(arguments)
        await peer.close_stream(SlowlyCancelledCall(arguments, after_s=0.05))  # forms at 0.13
        del arguments
        await collections_done()
        return alive

    assert asyncio.run(run())() is None


def test_an_answered_streams_close_schedules_no_collection(no_automatic_collection):
    """A call that yielded an item had been placed: closing it leaves no cycle, so a busy
    request service closing every request's streams does not collect every second."""
    async def run(answered: bool) -> bool:
        await peer.close_stream(CancelledCall(Arguments()), answered=answered)
        scheduled = asyncio.get_running_loop() in peer._scheduled
        for handle in peer._scheduled.values():
            handle.cancel()
        peer._scheduled.clear()
        return scheduled

    assert asyncio.run(run(answered=False))  # the control: an unanswered one is collected
    assert not asyncio.run(run(answered=True))


def test_a_background_call_that_is_never_placed_leaves_after_its_timeout():
    """A release to a deployment with no replica waits in Serve's router for ever: with a
    timeout the task ends (cancelling the call) and leaves the set that keeps it."""
    async def go():
        tasks: set[asyncio.Task] = set()
        never = asyncio.get_running_loop().create_future()
        peer.in_background(never, tasks, timeout_s=0.05)
        peer.in_background(asyncio.sleep(0), tasks)
        assert len(tasks) == 2
        await asyncio.sleep(0.2)
        return tasks, never

    tasks, never = asyncio.run(go())
    assert tasks == set() and never.cancelled()


def test_a_background_call_is_not_one_of_its_requests_calls():
    """Serve names a replica's calls by its request's internal id (from the request context)
    and cancels a cancelled request's calls: a release or abort sent in the background, as the
    request is cancelled, runs outside it (a call of no request, as from a driver)."""
    from ray.serve import context as serve_context

    seen: list[str] = []

    async def work():
        seen.append(serve_context._get_serve_request_context()._internal_request_id)

    async def scenario():
        serve_context._serve_request_context.set(
            serve_context._RequestContext(_internal_request_id="the-request"))
        tasks: set[asyncio.Task] = set()
        peer.in_background(work(), tasks, 5.0)
        await asyncio.gather(*tasks)
        return serve_context._get_serve_request_context()._internal_request_id

    assert asyncio.run(scenario()) == "the-request"  # the caller's own context is untouched
    assert seen == [""]
