"""Pixel tensors by reference: into Ray's object store where Ray runs, as themselves elsewhere.

The process that encodes a request's images keeps their pixels alive until the request ends (a
request may be prefilled again on another replica: a retry, or a stream resumed after a decode
replica died): the request service releases them then (`PixelOwner`, routed to the replica that
keeps them by `services.workers.owner_router`), and `hold_s` (the request's deadline) bounds it
if that never comes. They cross Serve calls as `Held` identities, which Ray does not count
(`services.kv.held` says why).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from services.errors import PixelsLost
from services.kv.held import KEEPER, Held
from services.settings import LimitSettings

# As long as a request may live by default: its prefill may be repeated until it ends.
HOLD_S = LimitSettings().request_timeout_s


@dataclass(frozen=True)
class PixelOwner:
    """Which Serve replica keeps a request's pixels (its unique id), and the request."""

    replica: str
    request_id: str


def publish(arrays: list, hold_s: float = HOLD_S, group: str | None = None) -> list:
    """`Held` references to `arrays` inside a Ray worker (kept here for `hold_s`, or until
    `group` is released); the arrays themselves elsewhere."""
    import ray

    if ray._private.worker.global_worker.mode != ray.WORKER_MODE:  # not in a replica
        return arrays
    try:
        return [KEEPER.keep(Held.put(a), hold_s, group, nbytes=a.nbytes) for a in arrays]
    except BaseException:  # the store refused one (full): none of the request's are kept
        if group is not None:
            KEEPER.release_group(group)
        raise


def in_store(images: list) -> bool:
    """Whether `publish` put these in Ray's object store (someone keeps them there)."""
    return any(isinstance(item, Held) for item in images)


async def resolve(images: list) -> list:
    """The arrays behind `publish`'s result (held ones are fetched from the object store).
    Pixels whose keeper went away are `PixelsLost`: not a replica to retry past (every
    attempt would fail the same), a request to send again."""
    try:
        return [await item.fetch() if isinstance(item, Held) else item for item in images]
    except Exception as exc:
        # by exact name: ObjectFetchTimedOutError is an ObjectLostError too, and transient
        if type(exc).__name__ in ("OwnerDiedError", "ObjectLostError"):
            raise PixelsLost("the image service replica that kept this request's pixels went "
                             "away (a restart or a scale-down); send the request again") from exc
        raise


async def drain(limit_s: float, poll_s: float = 0.5) -> None:
    """Wait up to `limit_s` while this process keeps pixels: a replica going away takes its
    store objects with it, so it stays while a request in flight may still fetch them (a
    prefill retry, a resumed stream: most come within seconds). Releases cannot reach a
    replica Serve is stopping (it is no longer routed to), so the wait ends as the holds
    expire (each at its request's deadline) or at `limit_s`, whichever is first."""
    deadline = asyncio.get_running_loop().time() + limit_s
    while len(KEEPER) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(poll_s)
