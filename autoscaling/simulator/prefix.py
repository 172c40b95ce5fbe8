"""Prefix-cache hits in the simulator, and what routing buys at scale (issue #16).

Each request of a pool belongs to one of `groups` prefixes in use (a conversation's earlier
turns, an agent's tools and instructions), drawn uniformly; its first `share` of prompt tokens
are that group's prefix. Each prefill engine keeps a least-recently-used cache of the prefixes
it prefilled, up to `cache_tokens`; a request whose group is cached on the engine that takes it
prefills only the rest (its compute is that of the whole prompt less that of the cached part:
the cached tokens' attention is not recomputed).

Routing decides which engine takes a request:

- `random`: whichever engine is free takes the queue's head, as a router that does not know
  the caches spreads them; a prefix is hit when that engine happens to hold it.
- `cache-aware`: a free engine first takes, among the first `lookahead` queued, the requests
  whose prefix it holds, then the others, leaving one whose prefix another ready engine holds
  to that engine when it frees sooner than the prefix would take to recompute (and the prompt
  has waited less than `patience_s`): what the stack's prefix router does (send a prompt where
  its prefix is, unless that engine is too far behind), within a bounded reordering.

Off (`share` 0) the simulator is as without this module, request for request.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

Routing = Literal["random", "cache-aware"]
ROUTINGS: tuple[Routing, ...] = ("random", "cache-aware")


class PrefixModel(BaseModel):
    """How much of each prompt is a reusable prefix, how many are in use, and the routing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    share: float = Field(0.0, ge=0, le=1, description="of each prompt's tokens, the prefix")
    groups: int = Field(2000, gt=0, description="distinct prefixes in use per pool")
    cache_tokens: int = Field(2_000_000, ge=0, description="prefix cache per prefill engine")
    routing: Routing = "random"
    lookahead: int = Field(64, ge=1)
    patience_s: float = Field(1.0, ge=0, description="cache-aware: the longest a prompt "
                              "waits for the engine holding its prefix")
    seed: int = 0

    @property
    def on(self) -> bool:
        """Whether any prompt has a prefix."""
        return self.share > 0


def assign(requests: list, model: PrefixModel) -> None:
    """Give every request its prefix group and length (its own draw: the arrivals' streams are
    untouched)."""
    if not model.on or not requests:
        return
    groups = np.random.default_rng(model.seed + 104729).integers(0, model.groups,
                                                                 len(requests))
    for request, group in zip(requests, groups.tolist()):
        request.group = group
        request.prefix = int(model.share * request.prompt)


class PrefixCache:
    """One prefill engine's cached prefixes, least recently used evicted first."""

    __slots__ = ("capacity", "tokens", "held")

    def __init__(self, capacity: int):
        self.capacity, self.tokens = capacity, 0
        self.held: OrderedDict[int, int] = OrderedDict()

    def hit(self, request) -> int:
        """Tokens of `request`'s prefix this engine holds."""
        return min(self.held.get(request.group, 0), request.prefix)

    def holds(self, request) -> bool:
        """Whether any of `request`'s prefix is cached here."""
        return request.prefix > 0 and request.group in self.held

    def store(self, request) -> None:
        """Keep `request`'s prefix, evicting the least recently used beyond capacity."""
        if request.prefix <= 0 or request.prefix > self.capacity:
            return
        old = self.held.pop(request.group, 0)
        size = max(old, request.prefix)
        self.held[request.group] = size
        self.tokens += size - old
        while self.tokens > self.capacity:
            _, evicted = self.held.popitem(last=False)
            self.tokens -= evicted
