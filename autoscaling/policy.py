"""Pure scaling policies for prefill and decode: metrics and state in, a wish and state out.

Prefill is sized from the prompt tokens arriving per second at the measured prefill rate (held
at a target utilisation), plus enough to drain the queued prompt tokens within
`backlog_drain_s`. Decode is sized by the largest of three needs, each at a target utilisation:
output tokens per second (generated, or arriving requests times their measured mean output
length, which sees a surge before the batches fill) against a replica's profiled throughput at
full batch (an MoE step reads more experts as the batch grows, so a lightly loaded engine's
speed overstates its capacity); concurrency (running and waiting requests, or arrivals times
the measured decode residency, by Little's law) against the replicas' slots; and KV tokens in
use against their capacity. A missed SLO (the role's queue wait against its share of the TTFT
SLO, or ITL p90 against the ITL SLO) asks for one more replica than that, but only while no
replica is already starting: a cold start takes a minute or more and asking again meanwhile
would overshoot.

Both remember the bursts their role keeps seeing: the wish holds room (at the target
utilisation) for the recent peak of the work arriving, decaying over `burst_memory_s` times a
factor that grows with each burst that came back, so recurring bursts shorter than a cold start
are provisioned for while a one-off rise is let go; a rising load is led by its trend over
`lead_s` (about a cold start). Decode's forecast from arrivals can be capped (`forecast_cap`).

`decide` adds hysteresis: a wish must hold for `upscale_delay_s` (or `downscale_delay_s`) before
the count moves, and a wish that changes direction restarts the clock, so noisy load does not
make the count oscillate. The clock is injected (`now`): the same code runs under Ray Serve, in
unit tests and in the simulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pydantic import BaseModel, ConfigDict, Field

from autoscaling.metrics import RoleMetrics, Wish

TREND_FAST_S, TREND_SLOW_S = 30.0, 120.0  # time constants of the trend's two averages
BURST_COUNT_SPAN = 10  # bursts are counted over this many memories


class SharedPolicySettings(BaseModel):
    """Utilisation targets and damping every role's policy shares (`autoscaling.policy`); its
    SLOs and bounds are the role's and its pool's (`PolicySettings`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    queue_wait_share: float = Field(0.5, gt=0, le=1, description="of the TTFT SLO, per role")
    prefill_target_utilisation: float = Field(0.8, gt=0, le=1)
    decode_target_utilisation: float = Field(0.85, gt=0, le=1, description="of decode slots")
    kv_target_utilisation: float = Field(0.8, gt=0, le=1)
    backlog_drain_s: float = Field(30.0, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(120.0, ge=0)
    smoothing: float = Field(0.3, gt=0, le=1, description="EWMA weight of a new measurement, "
                             "per second")
    load_rise_s: float = Field(20.0, ge=0, description="time constant of a rising load")
    load_fall_s: float = Field(60.0, ge=0, description="time constant of a falling load")
    burst_memory_s: float = Field(
        300.0, ge=0, description="the wish keeps room for the highest load seen, decaying "
        "over this time constant: bursts shorter than a cold start cannot be chased, so a "
        "role that keeps seeing them is provisioned for them (0: off)")
    lead_s: float = Field(90.0, ge=0, description="a rising load is provisioned for where "
                          "its trend takes it this far ahead (about a cold start; 0: off)")
    prior_prefill_tokens_per_s: float = Field(40_000.0, gt=0)
    prior_decode_residency_s: float = Field(10.0, gt=0)


class PolicySettings(SharedPolicySettings):
    """SLOs, utilisation targets and damping of one pool-and-role's policy."""

    ttft_slo_s: float = Field(1.0, gt=0)
    itl_slo_s: float = Field(0.05, gt=0)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(8, ge=1)


@dataclass(frozen=True)
class PolicyState:
    """The replicas decided last, a pending wish with when it first appeared, the smoothed
    capacity estimate (prefill tokens/s per replica, or decode residency in s) and the smoothed
    load (engines) with when it was last updated."""

    replicas: int
    wish: int | None = None
    since: float | None = None
    estimate: float | None = None
    load: float | None = None
    load_at: float | None = None
    peak: float | None = None
    bursts: float = 0.0
    dip: float | None = None
    trend_fast: float | None = None
    trend_slow: float | None = None


def _ratio(observed: float | None, slo: float) -> float:
    return 0.0 if observed is None else observed / slo


def _smooth(previous: float | None, measured: float, weight: float,
            elapsed_s: float = 1.0) -> float | None:
    """An average moving by `weight` of the gap per second of `elapsed_s`: the same per unit
    of time however often it is called (Serve calls a policy ten times a second, the
    simulator once; per call, production's estimates moved ten times as fast)."""
    if measured <= 0:
        return previous
    if previous is None:
        return measured
    return previous + (1 - (1 - weight) ** max(elapsed_s, 0.0)) * (measured - previous)


def _envelope(previous: float | None, measured: float, weight: float,
              elapsed_s: float = 1.0) -> float | None:
    """Smoothed upward, slowly downward: a lightly loaded engine runs small batches whose
    fixed cost understates what it prefills when busy."""
    if previous is not None and measured < previous:
        return _smooth(previous, measured, weight / 10, elapsed_s)
    return _smooth(previous, measured, weight, elapsed_s)


def _since(state: PolicyState, now: float) -> float:
    """Seconds since the policy last ran (1 before its first run)."""
    return 1.0 if state.load_at is None else max(now - state.load_at, 0.0)


def _wish(need: int, load: float, pressure: float, s: PolicySettings) -> Wish:
    clamped = max(s.min_replicas, min(s.max_replicas, need))
    return Wish(clamped, s.min_replicas, s.max_replicas, load, pressure)


def _damped(raw: Wish, state: PolicyState, estimate: float | None, s: PolicySettings,
            now: float, utilisation: float, arriving: float) -> tuple[Wish, PolicyState]:
    """The wish with the damped decision as its count and the smoothed load as its load.

    The load follows a rise within seconds and a fall over a minute: a surge is seen at once,
    a dip in noisy load does not give engines away. The count also holds room, at the target
    `utilisation`, for the peak load seen recently (decaying over `burst_memory_s`): the
    arbiter grants that from engines no role needs now, and the spares follow it. The peak
    is of the load `arriving` (work per second coming in, not a backlog that a shortfall left
    behind), so a role that was short is not provisioned for its own queue.
    """
    load = raw.load
    elapsed = max(now - state.load_at, 0.0) if state.load_at is not None else 0.0
    tau = s.load_rise_s if state.load is None or raw.load > state.load else s.load_fall_s
    if state.load is not None and tau > 0:
        load = state.load + (1 - math.exp(-elapsed / tau)) * (raw.load - state.load)
    # A rising load is led by its trend over `lead_s` (about a cold start): an engine asked
    # for now arrives when the load has got there. The trend is the gap between a fast and a
    # slow average of the arriving load, over the gap between their time constants.
    fast, slow = arriving, arriving
    if state.trend_fast is not None and s.lead_s > 0:
        fast = state.trend_fast + (1 - math.exp(-elapsed / TREND_FAST_S)) * (
            arriving - state.trend_fast)
        slow = state.trend_slow + (1 - math.exp(-elapsed / TREND_SLOW_S)) * (
            arriving - state.trend_slow)
        rise = max(fast - slow, 0.0) / (TREND_SLOW_S - TREND_FAST_S)
        arriving = max(arriving, fast + rise * (TREND_FAST_S + s.lead_s))
    peak, bursts, dip = arriving, state.bursts, state.dip
    if state.peak is not None and s.burst_memory_s > 0:
        # The memory lengthens with every burst that came back (to near the peak, at least
        # twice the low) after the load had fallen below half the peak: a one-off rise is let
        # go, recurring bursts are held.
        bursts *= math.exp(-elapsed / (s.burst_memory_s * BURST_COUNT_SPAN))
        held = state.peak * math.exp(-elapsed / (s.burst_memory_s * (1 + bursts) ** 2))
        if arriving < 0.5 * held:
            dip = arriving if dip is None else min(dip, arriving)
        elif dip is not None and arriving >= max(0.8 * held, 2 * dip):
            bursts, dip = bursts + 1, None
        peak = max(arriving, held)
    need = raw.replicas
    if s.burst_memory_s > 0:
        need = max(need, min(s.max_replicas, math.ceil(peak / utilisation - 1e-9)))
    state = replace(state, estimate=estimate, load=load, load_at=now, peak=peak,
                    bursts=bursts, dip=dip, trend_fast=fast, trend_slow=slow)
    state = decide(need, state, s, now)
    return replace(raw, replicas=state.replicas, load=load,
                   peak=peak if s.burst_memory_s > 0 else None), state


def prefill_wish(m: RoleMetrics, s: PolicySettings, state: PolicyState,
                 now: float) -> tuple[Wish, PolicyState]:
    """Prefill replicas that keep up with arriving prompt tokens and drain the queue."""
    estimate = _envelope(state.estimate, m.prefill_tokens_per_s, s.smoothing,
                         _since(state, now))
    rate = estimate or s.prior_prefill_tokens_per_s
    load = m.arrival_prompt_tokens_per_s / rate
    backlog = m.queued_prompt_tokens / (rate * s.backlog_drain_s)
    need = math.ceil(load / s.prefill_target_utilisation + backlog - 1e-9)
    late = _ratio(m.queue_wait_p90_s, s.ttft_slo_s * s.queue_wait_share)
    if late > 1 and m.starting == 0:
        need = max(need, m.replicas + 1)
    pressure = max(late, _ratio(m.ttft_p90_s, s.ttft_slo_s))
    return _damped(_wish(need, load, pressure, s), state, estimate, s, now,
                   s.prefill_target_utilisation, load)


def decode_wish(m: RoleMetrics, s: PolicySettings, state: PolicyState,
                now: float) -> tuple[Wish, PolicyState]:
    """Decode replicas that hold concurrency and KV in use at their target utilisations."""
    estimate = _smooth(state.estimate, m.decode_residency_s, s.smoothing, _since(state, now))
    residency = estimate or s.prior_decode_residency_s
    concurrency = max(m.running_requests + m.queued_requests,
                      m.arrival_requests_per_s * residency)
    by_slots = concurrency / m.max_running_per_replica if m.max_running_per_replica else 0.0
    by_kv = m.kv_tokens_used / m.kv_capacity_per_replica if m.kv_capacity_per_replica else 0.0
    # what a request arriving now will decode: the recent streams' (the mean of what finished
    # lags a shift to shorter answers by minutes, and times today's arrivals it held engines)
    output = m.arriving_output_tokens or m.mean_output_tokens
    demand = max(m.generated_tokens_per_s, m.arrival_requests_per_s * output)
    by_rate = (demand / m.decode_tokens_per_s_per_replica
               if m.decode_tokens_per_s_per_replica else 0.0)
    by_slots = max(by_slots, by_rate)
    need = math.ceil(max(by_slots / s.decode_target_utilisation,
                         by_kv / s.kv_target_utilisation) - 1e-9)
    late = max(_ratio(m.itl_p90_s, s.itl_slo_s),
               _ratio(m.queue_wait_p90_s, s.ttft_slo_s * s.queue_wait_share))
    if late > 1 and m.starting == 0:
        need = max(need, m.replicas + 1)
    pressure = max(late, _ratio(m.ttft_p90_s, s.ttft_slo_s))
    arriving = 0.0
    if m.max_running_per_replica:
        arriving = m.arrival_requests_per_s * residency / m.max_running_per_replica
    if m.decode_tokens_per_s_per_replica:
        arriving = max(arriving, m.arrival_requests_per_s * output
                       / m.decode_tokens_per_s_per_replica)
    return _damped(_wish(need, max(by_slots, by_kv), pressure, s), state, estimate, s, now,
                   s.decode_target_utilisation, arriving)


def decide(wish: int, state: PolicyState, s: PolicySettings, now: float) -> PolicyState:
    """Move to `wish` once it has held, in one direction, for that direction's delay.

    Upward, the latest wish is taken (the delay already asked for a sustained rise); downward,
    the largest wish seen while waiting, so a dip in noisy load does not shed too much.
    """
    if wish == state.replicas:
        return replace(state, wish=None, since=None)
    up = wish > state.replicas
    if state.wish is None or (state.wish > state.replicas) != up:
        state = replace(state, wish=wish, since=now)
    elif not up:
        state = replace(state, wish=max(wish, state.wish))
    else:
        state = replace(state, wish=wish)
    delay = s.upscale_delay_s if up else s.downscale_delay_s
    if now - state.since >= delay:
        return replace(state, replicas=state.wish, wish=None, since=None)
    return state
