"""The cache-aware routers living in this process, so what a prefill reply reports reaches them.

Serve pickles a request router's own module by value, so a registry kept there would be a copy
per router; this module is imported by reference from both sides (router and decode worker)."""

from __future__ import annotations

import threading
import weakref
from typing import Any

_routers: weakref.WeakSet = weakref.WeakSet()
_lock = threading.Lock()


def register(router: Any) -> None:
    with _lock:
        _routers.add(router)


def correct(replica_unique_id: str, held_tokens: int | None, request_id: str | None = None,
            cached_tokens: int = 0) -> None:
    """A prefill replica reported holding `held_tokens` of prompt KV: every router here trims
    its index of that replica to it (None: not known, as from SGLang's engines: nothing
    trimmed); and, where the report is `request_id`'s prefill reply (`cached_tokens` of it
    were hits), its prefill left that replica's queue."""
    with _lock:
        routers = list(_routers)
    for router in routers:
        router.report(replica_unique_id, held_tokens, request_id, cached_tokens)
