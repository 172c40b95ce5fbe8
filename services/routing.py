"""Pool choice: the request's reasoning effort picks a pool; a saturated pool spills over."""

from __future__ import annotations

from dataclasses import dataclass

from services.errors import InvalidRequest, Overloaded, clip
from services.settings import PoolSettings, PrefixRoutingSettings, RoutingSettings


@dataclass(frozen=True)
class PoolChoice:
    """The effort applied, the pool that serves the request, and whether it spilled over."""

    effort: str
    pool: str
    home_pool: str

    @property
    def spilled(self) -> bool:
        return self.pool != self.home_pool


def applied_effort(requested: str | None, routing: RoutingSettings) -> str:
    """Map an OpenAI effort (minimal|low|medium|high|none) to the model's (none|high)."""
    name = routing.default_effort if requested is None else requested
    if name not in routing.effort_map:
        allowed = ", ".join(sorted(routing.effort_map))
        raise InvalidRequest(f"reasoning_effort must be one of {allowed}; got {clip(name)}",
                             param="reasoning_effort")
    return routing.effort_map[name]


def choose_pool(effort: str, pools: dict[str, PoolSettings], in_flight: dict[str, int],
                routing: RoutingSettings, n: int = 1) -> PoolChoice:
    """The least-loaded pool serving `effort` with room for the request's `n` streams (an
    idle pool has room for any); if no such pool has room and spillover is on, the least-loaded
    other pool with room; with no room anywhere the request may take, `Overloaded` (503,
    retry after a second) instead of an unbounded wait."""
    def load(name: str) -> float:
        return in_flight.get(name, 0) / pools[name].max_queue

    def room(name: str) -> bool:
        return in_flight.get(name, 0) == 0 or in_flight[name] + n <= pools[name].max_queue

    serving = [name for name, p in pools.items() if p.effort == effort]
    if fits := [name for name in serving if room(name)]:
        home = min(fits, key=load)
        return PoolChoice(effort, home, home)
    home = min(serving, key=load)
    others = [name for name in pools if pools[name].effort != effort and room(name)]
    if not routing.spillover or not others:
        raise Overloaded(f"every pool that serves effort {effort!r} is at its queue limit",
                         retry_after=1.0)
    return PoolChoice(effort, min(others, key=load), home)


def cache_salt(tenant: str, prefix: PrefixRoutingSettings) -> str:
    """The prefix-cache salt of `tenant`'s prompts: its own, unless `routing.prefix.
    shared_tenants` puts it in a group, whose tenants then share one."""
    for group, tenants in prefix.shared_tenants.items():
        if tenant in tenants:
            return f"group:{group}"
    return f"tenant:{tenant}"
