"""Call a peer worker the same way whether it is a Ray Serve handle or an in-process object.

Calls name the method by the worker class's function, not by a string — `call(peer,
PrefillWorker.abort, request_id)` — so a renamed or mistyped method fails where the caller is
imported, and a type checker sees the arguments and the result (`ParamSpec`)."""

from __future__ import annotations

import asyncio
import contextvars
import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")
Y = TypeVar("Y")


def _name(method: Callable[..., Any]) -> str:
    if isinstance(method, str) or not callable(method):
        raise TypeError(f"name the method by the worker class's function, not {method!r}")
    return method.__name__


async def call(peer: Any, method: Callable[Concatenate[Any, P], Awaitable[R]],
               *args: P.args) -> R:
    """`await peer.method(*args)`, through `.remote()` when `peer` is a deployment handle.
    Cancelled (its caller's client left), a remote call may leave its arguments in Serve's
    cycle (below): a collection follows."""
    target = getattr(peer, _name(method))
    if hasattr(target, "remote"):
        try:
            return await target.remote(*args)
        except asyncio.CancelledError:
            _collect_soon()
            raise
    return await target(*args)


def stream(peer: Any, method: Callable[Concatenate[Any, P], AsyncIterator[Y]],
           *args: P.args) -> AsyncIterator[Y]:
    """An async iterator over a streaming call on a handle or an in-process async generator."""
    name = _name(method)
    if hasattr(peer, "options"):
        return getattr(peer.options(stream=True), name).remote(*args)
    return getattr(peer, name)(*args)


async def close_stream(iterator: Any, *, answered: bool = False) -> None:
    """Stop a stream from `stream()`: cancel the remote generator or close the local one.
    `answered`: it has yielded an item, so Serve had placed the call before it was cancelled
    and left no cycle to collect (below)."""
    if hasattr(iterator, "cancel"):
        iterator.cancel()
        if not answered:
            _collect_soon()
    elif hasattr(iterator, "aclose"):
        await iterator.aclose()


# Serve (2.60) leaves a call cancelled while its router is still placing it in a reference
# cycle (the CancelledError, its traceback and `AsyncioRouter.assign_request`'s frame), which
# keeps the call's arguments, and so the prompt's KV and pixel references, alive until Python's
# cycle collector next runs: on an idle replica, for minutes. Serve cancels such calls
# itself too, when the request that made them is cancelled (a client leaving). So a replica
# that cancelled a call collects once, shortly after (by then the cancellation has unwound).
# A call that answered was placed: its close schedules nothing (a request service closes every
# request's prefill and decode streams that way, so a busy ingress does not collect each
# second: a collection cost ~4 ms there). Many clients leaving at once are one collection a
# second at most, and the last one runs at least COLLECT_AFTER_S after the last cancellation:
# a call cancelled just before a collection may still be unwinding when it runs (the cycle
# not formed yet), and nothing else would come to collect it.
COLLECT_AFTER_S = 1.0
_scheduled: dict[asyncio.AbstractEventLoop, asyncio.TimerHandle] = {}
_again: set[asyncio.AbstractEventLoop] = set()  # cancelled since their collection was planned


def _collect_soon() -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    for other in [other for other in _scheduled if other.is_closed()]:
        del _scheduled[other]  # a loop that closed before its collection was due
        _again.discard(other)
    if loop in _scheduled:
        _again.add(loop)
    else:
        _scheduled[loop] = loop.call_later(COLLECT_AFTER_S, _collect, loop)


def _collect(loop: asyncio.AbstractEventLoop) -> None:
    _scheduled.pop(loop, None)
    gc.collect()
    if loop in _again:  # a call cancelled after this one was planned: once more, later
        _again.discard(loop)
        _scheduled[loop] = loop.call_later(COLLECT_AFTER_S, _collect, loop)


def in_background(work: Coroutine[Any, Any, Any], tasks: set[asyncio.Task] | None = None,
                  timeout_s: float | None = None) -> None:
    """Run `work` (a call nobody waits for: a release, an abort) as a task kept in `tasks`
    (the process's own set by default: a task only the event loop refers to may be collected
    before it ends) until it ends, its failure retrieved (a lost call is not an unhandled
    error); cancelled
    after `timeout_s` (a call Serve cannot place, with no replica to take it, would wait in
    its router, and in `tasks`, for ever).

    It runs outside the request that sent it (an empty context): Serve gives a replica's calls
    its request's id, and cancels the calls of a cancelled request still being placed or in
    flight (`Replica._on_request_cancelled`), while the calls sent from here are often what
    that cancellation must not stop: the release of a request's pixels, the abort of its
    prefill, sent as its client leaves."""
    task = asyncio.get_running_loop().create_task(
        work if timeout_s is None else asyncio.wait_for(work, timeout_s),
        context=contextvars.Context())
    tasks = _BACKGROUND if tasks is None else tasks
    tasks.add(task)
    task.add_done_callback(_forget(tasks))


_BACKGROUND: set[asyncio.Task] = set()


def _forget(tasks: set[asyncio.Task]) -> Callable[[asyncio.Task], None]:
    def done(task: asyncio.Task) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()
    return done
