"""Pixel tensors by reference: into Ray's object store where Ray runs, as themselves elsewhere.

The process that encodes a request's images keeps their pixels alive for `hold_s` (a request
may be prefilled again on another replica: a retry, or a stream resumed after a decode replica
died), then lets Ray free them; they cross Serve calls as `Held` identities, which Ray does not
count (`services.kv.held` says why).
"""

from __future__ import annotations

from services.kv.held import KEEPER, Held
from services.settings import LimitSettings

# As long as a request may live by default: its prefill may be repeated until it ends.
HOLD_S = LimitSettings().request_timeout_s


def publish(arrays: list, hold_s: float = HOLD_S) -> list:
    """`Held` references to `arrays` inside a Ray worker (kept here for `hold_s`); the arrays
    themselves elsewhere."""
    import ray

    if ray._private.worker.global_worker.mode != ray.WORKER_MODE:  # not in a replica
        return arrays
    return [KEEPER.keep(Held.put(a), hold_s) for a in arrays]


async def resolve(images: list) -> list:
    """The arrays behind `publish`'s result (held ones are fetched from the object store)."""
    return [await item.fetch() if isinstance(item, Held) else item for item in images]
