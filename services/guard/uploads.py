"""Slots for request bodies being received: at most `max_uploads` per ingress replica and
`max_uploads_per_key` per key, so one key's slow uploads cannot take every slot of the replica.

A request waits up to `upload_wait_s` for a slot, then gets 429; a body still arriving holds its
slot until it is complete or times out (`limits.body_idle_timeout_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import AsyncIterator

from services.errors import RateLimited
from services.settings import LimitSettings


class Uploads:
    """Counts of bodies in flight on this replica, in total and per key (its digest)."""

    def __init__(self, limits: LimitSettings):
        self.limit, self.per_key = limits.max_uploads, limits.max_uploads_per_key
        self.wait_s = limits.upload_wait_s
        self.total = 0
        self.by_key: Counter[str] = Counter()
        self._freed = asyncio.Condition()

    def _full(self, key: str) -> str | None:
        if self.by_key[key] >= self.per_key:
            return f"this key is already sending {self.by_key[key]} request bodies"
        if self.total >= self.limit:
            return f"this replica is already receiving {self.total} request bodies"
        return None

    @contextlib.asynccontextmanager
    async def slot(self, key: str) -> AsyncIterator[None]:
        """Hold an upload slot for `key` while the body is read, or raise `RateLimited`."""
        if self._full(key):
            async with self._freed:
                try:  # (not `wait_for`, which on Python 3.11 can lose a client's cancel)
                    async with asyncio.timeout(self.wait_s):
                        await self._freed.wait_for(lambda: not self._full(key))
                except TimeoutError:
                    # (a slot may have freed as the wait ran out: then it is taken)
                    if why := self._full(key):
                        raise RateLimited(f"{why}; retry when one has finished",
                                          retry_after=1.0,
                                          code="upload_limit_exceeded") from None
        self.total += 1
        self.by_key[key] += 1
        try:
            yield
        finally:
            self.total -= 1
            self.by_key[key] -= 1
            if not self.by_key[key]:
                del self.by_key[key]
            async with self._freed:
                self._freed.notify_all()
