"""Values in Ray's object store handed between replicas by identity, kept alive by the process
that put them until their consumer is done or their hold time passes.

Why not pass the `ObjectRef` itself inside a Serve call's arguments or result: Ray counts
references nested in other values only on its own task path, and Serve's deployment handles
either leave that path or hit its weak spot. On Serve's gRPC transport the call is pickled
outside Ray, and Ray pins every ref pickled that way in the pickling process for the rest of
its life (one leaked object per request). On the actor transport a result is an item of a
streaming call, and a ref nested in a streamed item can be freed by its owner before the caller
has registered as its borrower (ray-project/ray#58080): under concurrency the consumer finds it
lost (`ReferenceCountingAssertionError`). A `Held` crosses the call as the object's id and owner
address only, so Ray counts nothing on the way, and the owner decides how long the object lives:
it keeps its `Held` (a strong reference) for as long as a consumer may fetch it.
"""

from __future__ import annotations

import asyncio
from typing import Any


class Held:
    """One object in Ray's object store; `fetch` returns its value in any process of the
    cluster while the process that `put` it keeps this `Held` (or a `Keeper` does)."""

    __slots__ = ("ref",)

    def __init__(self, ref: Any):
        self.ref = ref

    @classmethod
    def put(cls, value: Any) -> Held:
        import ray

        return cls(ray.put(value))

    async def fetch(self) -> Any:
        """The value; Ray's error (lost, owner died) when its owner no longer keeps it."""
        return await self.ref

    @property
    def key(self) -> bytes:
        return self.ref.binary()

    def __reduce__(self):
        return _arrive, _identity(self.ref)

    def __repr__(self) -> str:
        return f"Held({self.ref.hex()})"


def _identity(ref: Any) -> tuple:
    """What names `ref` in another process: its id, owner address and status. Taken the way
    Ray's own serializer takes it, without the pin Ray adds to refs pickled outside a task."""
    import ray

    worker = ray._private.worker.global_worker
    worker.check_connected()
    ref, owner, status = worker.core_worker.serialize_object_ref(ref)
    return ref.binary(), ref.call_site(), owner, status, ref.tensor_transport()


def _arrive(binary: bytes, call_site: str, owner: bytes, status: bytes, transport) -> Held:
    from ray._private.serialization import _object_ref_deserializer

    return Held(_object_ref_deserializer(binary, call_site, owner, status, transport))


class Keeper:
    """Keeps `Held` values alive in this process until `release` (of the value, or of the
    `group` it was kept under, e.g. a request's id) or until their hold time passes,
    whichever comes first: nothing stays behind a consumer that never comes back."""

    def __init__(self):
        self._held: dict[bytes, tuple[Held, asyncio.TimerHandle, str | None, int]] = {}
        self._groups: dict[str, set[bytes]] = {}
        self.nbytes = 0  # of the values kept, as their keepers declared them

    def keep(self, held: Held, hold_s: float, group: str | None = None,
             nbytes: int = 0) -> Held:
        timer = asyncio.get_running_loop().call_later(hold_s, self._drop, held.key)
        self._held[held.key] = (held, timer, group, nbytes)
        self.nbytes += nbytes
        if group is not None:
            self._groups.setdefault(group, set()).add(held.key)
        return held

    def release(self, held: Held) -> None:
        self._drop(held.key)

    def release_group(self, group: str) -> int:
        """Let go of every value kept under `group`; how many were still kept."""
        return sum(self._drop(key) for key in list(self._groups.get(group, ())))

    def _drop(self, key: bytes) -> bool:
        entry = self._held.pop(key, None)
        if entry is None:
            return False
        _, timer, group, nbytes = entry
        timer.cancel()
        self.nbytes -= nbytes
        if group is not None:
            keys = self._groups[group]
            keys.discard(key)
            if not keys:
                del self._groups[group]
        return True

    def __len__(self) -> int:
        return len(self._held)


# This process's keeper: what it put for consumers in other replicas.
KEEPER = Keeper()
