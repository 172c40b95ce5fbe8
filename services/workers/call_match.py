"""Hand each replica a router chose to the very call it was chosen for.

Serve (2.60) gives every call a replica makes while serving a request that request's own
internal id (`default_impl.get_request_metadata`), so the calls one request makes to one
deployment share it: the `n` choices' prefills from the ingress, an abort sent beside the
retry of the attempt it ends. The base `RequestRouter` hands a chosen replica to the pending
call whose internal id matches, and indexes only the first pending call of an id: with two
siblings pending, one was placed and the other waited in routing, never matched, until its
caller gave up (a request with `n: 4` over two prefill replicas waited a minute, then failed).
Serve's default router escapes this with `FIFOMixin` (a chosen replica goes to the oldest
call), which would hand a cache-aware choice to a call with another prompt. Here the match is
the call's own metadata (one object per call): the call the choice was made for, whatever its
id; FIFO only where that call is no longer waiting (cancelled meanwhile)."""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest


class PerCallMatch(FIFOMixin):
    """Mixed in before `RequestRouter`: matches a choice to its own call, not its id."""

    _pending_requests_to_fulfill: Any  # the router's queue of calls waiting for a replica

    def _get_pending_request_matching_metadata(self, request_metadata: Any = None
                                               ) -> PendingRequest | None:
        if request_metadata is None:
            return None
        for pending in self._pending_requests_to_fulfill:
            if pending.metadata is request_metadata and not pending.future.done():
                return pending
        return None
