"""Pure scaling policies for prefill and decode: metrics and state in, replicas and state out.

Prefill is sized so the queued prompt tokens drain within half the TTFT SLO at the measured
prefill rate; decode so the KV in use sits at the target utilisation of the replicas' capacity.
A missed SLO (TTFT p90 for prefill, ITL p90 for decode) asks for one more replica than that.
`decide` adds hysteresis: a wish must hold for `upscale_delay_s` (or `downscale_delay_s`) before
the replica count moves, and a wish that changes direction restarts the clock, so noisy load
does not make the count oscillate. The clock is injected (`now`), so the same code runs under
Ray Serve, in tests and in a simulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class PolicySettings(BaseModel):
    """SLOs and damping of one pool-and-role's policy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttft_slo_s: float = Field(2.5, gt=0)
    itl_slo_s: float = Field(0.05, gt=0)
    kv_target_utilisation: float = Field(0.75, gt=0, le=1)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(8, ge=1)
    upscale_delay_s: float = Field(15.0, ge=0)
    downscale_delay_s: float = Field(120.0, ge=0)


@dataclass(frozen=True)
class RoleMetrics:
    """What a pool-and-role's workers report, summed over its replicas."""

    replicas: int
    queued_prompt_tokens: int = 0
    prefill_tokens_per_s: float = 0.0  # per replica, measured
    kv_tokens_used: int = 0
    kv_capacity_per_replica: int = 1
    ttft_p90_s: float | None = None
    itl_p90_s: float | None = None


@dataclass(frozen=True)
class PolicyState:
    """The replicas decided last, and a pending wish with the time it first appeared."""

    replicas: int
    wish: int | None = None
    since: float | None = None


def _clamp(n: int, settings: PolicySettings) -> int:
    return max(settings.min_replicas, min(settings.max_replicas, n))


def prefill_wish(m: RoleMetrics, settings: PolicySettings) -> int:
    """Replicas that drain the prompt queue within half the TTFT SLO."""
    if m.prefill_tokens_per_s <= 0:
        return _clamp(m.replicas, settings)
    budget = m.prefill_tokens_per_s * settings.ttft_slo_s * 0.5
    need = math.ceil(m.queued_prompt_tokens / budget)
    if m.ttft_p90_s is not None and m.ttft_p90_s > settings.ttft_slo_s:
        need = max(need, m.replicas + 1)
    return _clamp(need, settings)


def decode_wish(m: RoleMetrics, settings: PolicySettings) -> int:
    """Replicas that hold the KV in use at the target utilisation."""
    usable = m.kv_capacity_per_replica * settings.kv_target_utilisation
    need = math.ceil(m.kv_tokens_used / usable) if usable > 0 else m.replicas
    if m.itl_p90_s is not None and m.itl_p90_s > settings.itl_slo_s:
        need = max(need, m.replicas + 1)
    return _clamp(need, settings)


def decide(wish: int, state: PolicyState, settings: PolicySettings,
           now: float) -> PolicyState:
    """Move to `wish` once it has held, in one direction, for that direction's delay."""
    if wish == state.replicas:
        return PolicyState(state.replicas)
    up = wish > state.replicas
    if state.wish is None or (state.wish > state.replicas) != up:
        return PolicyState(state.replicas, wish, now)
    delay = settings.upscale_delay_s if up else settings.downscale_delay_s
    if now - state.since >= delay:
        return PolicyState(wish)
    # keep the clock; remember the most conservative wish seen while waiting
    kept = min(wish, state.wish) if up else max(wish, state.wish)
    return PolicyState(state.replicas, kept, state.since)
