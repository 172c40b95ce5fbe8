"""Routing for the multimodal deployment, on Ray Serve's public `RequestRouter` API: a call
that names a replica in its arguments (a `PixelOwner`: release a finished request's pixels)
goes to that replica, every other call (encode) to the less busy of two at random, as Serve's
default router does. A named replica that is gone took its pixels with it: the call then goes
anywhere, where it finds nothing to release."""

from __future__ import annotations

import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from services.multimodal.refs import PixelOwner
from services.workers.call_match import PerCallMatch


class OwnerRouter(PerCallMatch, RequestRouter):
    """To the replica a call's `PixelOwner` names; otherwise two random choices."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        return choose(candidate_replicas, pending_request)


def choose(candidates: list[RunningReplica], pending: PendingRequest | None
           ) -> list[list[RunningReplica]]:
    """Ranks of replicas for a call (Serve takes the least busy of the first rank)."""
    if not candidates:
        return []
    owner = next((a for a in (pending.args if pending is not None else ())
                  if isinstance(a, PixelOwner)), None)
    if owner is not None:
        named = [r for r in candidates if r.replica_id.unique_id == owner.replica]
        return [named or candidates]
    return [random.sample(candidates, min(2, len(candidates)))]
