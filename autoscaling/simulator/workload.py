"""Requests and arrival traces, per pool, seeded: steady, step, diurnal and bursty, where the
load moves but the mix does not, and mix-shift, length-shift and mix-length, where the mix moves.

A request's effort picks its pool: `none` goes to `fast` (chat: ~2K-token prompts, ~300-token
answers), `high` to `deep` (reasoning and coding agents: ~6K-token prompts, ~2.4K-token
outputs with the thinking). Lengths are log-normal, clipped. Arrivals are Poisson with a rate
that follows the trace, drawn by thinning; the rates are fractions of `capacity_rps`, what the
cluster carries at full utilisation with its best split (see `capacity`).

Where the mix moves, a trace is an hour in three 20-minute phases, the middle one shifted, with
`RAMP_S` ramps between (during a ramp, requests come from the two phases' mixes in proportion).
Each phase is offered at `SHIFT_LOAD` of what the best split *for that phase* carries, so a
budget that follows the mix carries every phase and a split fixed for one mix does not:

- mix-shift: the share of effort `high` (pool `deep`) goes from 20 % to 70 % and back;
- length-shift: a decode-heavy phase (short prompts, long reasoning outputs) against a
  prefill-heavy one (long prompts, short answers, as in retrieval), the effort mix unchanged;
- mix-length: both at once (20 % deep with today's lengths, then 70 % deep and prefill-heavy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

POOLS = ("fast", "deep")
TraceKind = Literal["steady", "step", "diurnal", "bursty", "mix-shift", "length-shift",
                    "mix-length"]
TRACES: tuple[TraceKind, ...] = ("steady", "step", "diurnal", "bursty", "mix-shift",
                                 "length-shift", "mix-length")
SHIFTING: tuple[TraceKind, ...] = ("mix-shift", "length-shift", "mix-length")
SHIFT_LOAD = 0.8  # of the phase's best-split capacity (step and diurnal peak at 0.9)
PHASE_S = 1200.0
RAMP_S = 300.0


class Lengths(BaseModel):
    """Log-normal prompt and output lengths of one pool's requests, in tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_median: float = Field(gt=0)
    prompt_sigma: float = Field(ge=0)
    prompt_max: int = Field(gt=0)
    output_median: float = Field(gt=0)
    output_sigma: float = Field(ge=0)
    output_max: int = Field(gt=0)


class Workload(BaseModel):
    """The effort mix and each pool's length distribution."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    deep_share: float = Field(0.3, ge=0, le=1, description="of requests, effort high")
    fast: Lengths = Lengths(prompt_median=1500, prompt_sigma=0.8, prompt_max=16384,
                            output_median=250, output_sigma=0.7, output_max=2048)
    deep: Lengths = Lengths(prompt_median=4000, prompt_sigma=0.9, prompt_max=32768,
                            output_median=2000, output_sigma=0.6, output_max=8192)

    def share(self, pool: str) -> float:
        """Fraction of requests going to `pool`."""
        return self.deep_share if pool == "deep" else 1 - self.deep_share

    def lengths(self, pool: str) -> Lengths:
        """Length distribution of `pool`."""
        return self.deep if pool == "deep" else self.fast


@dataclass(slots=True)
class Request:
    """One request and the times it passes through the cluster (None until it does)."""

    rid: int
    pool: str
    arrival: float
    prompt: int
    output: int
    prefill_start: float | None = None
    prefill_end: float | None = None
    decode_start: float | None = None
    first_token: float | None = None
    finish: float | None = None
    aborted: bool = False
    group: int = -1  # prefix group (autoscaling.simulator.prefix), -1 without
    prefix: int = 0  # tokens of the prompt that are the group's prefix
    cached: int = 0  # of those, found in the prefilling engine's cache
    resumes: Request | None = None  # the client's request this one continues (cut stream)


def sample_lengths(lengths: Lengths, n: int, rng: np.random.Generator) -> tuple:
    """`n` (prompt, output) length pairs as two integer arrays."""
    prompt = rng.lognormal(math.log(lengths.prompt_median), lengths.prompt_sigma, n)
    output = rng.lognormal(math.log(lengths.output_median), lengths.output_sigma, n)
    return (np.clip(prompt, 16, lengths.prompt_max).astype(int),
            np.clip(output, 2, lengths.output_max).astype(int))


PREFILL_HEAVY = {"fast": Lengths(prompt_median=4000, prompt_sigma=0.6, prompt_max=32768,
                                 output_median=150, output_sigma=0.6, output_max=2048),
                 "deep": Lengths(prompt_median=12000, prompt_sigma=0.6, prompt_max=65536,
                                 output_median=500, output_sigma=0.6, output_max=4096)}
DECODE_HEAVY = {"fast": Lengths(prompt_median=1000, prompt_sigma=0.7, prompt_max=16384,
                                output_median=1200, output_sigma=0.6, output_max=8192),
                "deep": Lengths(prompt_median=2000, prompt_sigma=0.7, prompt_max=32768,
                                output_median=4000, output_sigma=0.5, output_max=16384)}


@dataclass(frozen=True)
class Blend:
    """Two phases' workloads and per-pool rates, and the middle one's share over time."""

    outer: Workload
    middle: Workload
    share: Callable[[np.ndarray], np.ndarray]
    outer_rates: dict[str, float]
    middle_rates: dict[str, float]


@dataclass(frozen=True)
class Trace:
    """A named arrival trace: per-pool rate functions (requests/s) over `duration_s`.

    Where the mix moves, `blend` says from which phase a request arriving at t comes: the
    middle one with the middle phase's share of its pool's rate at t.
    `shifts` are the times the mix starts to move (recovery is measured after each);
    `requests`, when given, are replayed as they are (a trace file) instead of drawn.
    """

    name: str
    duration_s: float
    rates: dict[str, Callable[[np.ndarray], np.ndarray]]
    step_at_s: float | None = None
    blend: Blend | None = None
    shifts: tuple[float, ...] = ()
    requests: tuple[Request, ...] | None = None


def shifting_phases(kind: TraceKind, workload: Workload) -> tuple[Workload, Workload]:
    """The outer and middle workloads of a trace whose mix moves."""
    low, high = workload.model_copy(update={"deep_share": 0.2}), workload.model_copy(
        update={"deep_share": 0.7})
    if kind == "mix-shift":
        return low, high
    if kind == "length-shift":
        return (workload.model_copy(update=DECODE_HEAVY),
                workload.model_copy(update=PREFILL_HEAVY))
    return low, high.model_copy(update=PREFILL_HEAVY)


def make_trace(kind: TraceKind, capacity_rps: float, workload: Workload,
               duration_s: float | None = None, seed: int = 0,
               capacity_of: Callable[[Workload], float] | None = None) -> Trace:
    """The trace `kind` with rates as fractions of `capacity_rps` (of `capacity_of(phase)` for
    the phases of a trace whose mix moves; `capacity_rps` scales the default mix's)."""
    if kind in SHIFTING:
        return _shifting(kind, workload, duration_s or 3 * PHASE_S,
                         capacity_of or (lambda _: capacity_rps))
    shares = {p: workload.share(p) * capacity_rps for p in POOLS}
    if kind == "steady":
        d = duration_s or 1200.0
        return Trace(kind, d, {p: _const(0.6 * c) for p, c in shares.items()})
    if kind == "step":  # 0.3 of capacity, then x3 at a third of the trace
        d = duration_s or 1800.0
        at = d / 3
        return Trace(kind, d, {p: _step(0.3 * c, 0.9 * c, at) for p, c in shares.items()}, at)
    if kind == "diurnal":  # a day in `d` seconds; deep work peaks a quarter-day after chat
        d = duration_s or 3600.0
        return Trace(kind, d, {"fast": _wave(shares["fast"], d, 0.0),
                               "deep": _wave(shares["deep"], d, d / 4)})
    d = duration_s or 1200.0
    rng = np.random.default_rng(seed + 7919)
    return Trace(kind, d, {p: _bursts(c, d, rng) for p, c in shares.items()})


def _shifting(kind: TraceKind, workload: Workload, d: float,
              capacity_of: Callable[[Workload], float]) -> Trace:
    outer, middle = shifting_phases(kind, workload)
    a, b = d / 3, 2 * d / 3
    ramp = min(RAMP_S, d / 6)

    def share(t: np.ndarray) -> np.ndarray:
        return np.clip(np.minimum((t - a) / ramp, 1 - (t - b) / ramp), 0.0, 1.0)

    lo = {p: SHIFT_LOAD * capacity_of(outer) * outer.share(p) for p in POOLS}
    hi = {p: SHIFT_LOAD * capacity_of(middle) * middle.share(p) for p in POOLS}
    rates = {p: (lambda lo, hi: lambda t: lo + (hi - lo) * share(t))(lo[p], hi[p])
             for p in POOLS}
    return Trace(kind, d, rates, blend=Blend(outer, middle, share, lo, hi), shifts=(a, b))


def _const(rate: float):
    return lambda t: np.full_like(t, rate)


def _step(before: float, after: float, at: float):
    return lambda t: np.where(t < at, before, after)


def _wave(peak_rate: float, period: float, phase: float):
    """Between 0.3 and 0.9 of `peak_rate`, lowest at `phase`."""
    return lambda t: peak_rate * (0.6 - 0.3 * np.cos(2 * np.pi * (t - phase) / period))


def _bursts(rate: float, duration: float, rng: np.random.Generator):
    """On/off modulated: 1.6x for ~20 s bursts, 0.35x for ~100 s between (mean ~0.56x)."""
    edges, t, on = [], 0.0, False
    while t < duration:
        t += rng.exponential(20.0 if on else 100.0)
        edges.append(t)
        on = not on
    edges = np.array(edges)
    return lambda ts: np.where(np.searchsorted(edges, ts) % 2 == 1, 1.6 * rate, 0.35 * rate)


def _blended(pool: str, times: np.ndarray, blend: Blend, rng: np.random.Generator) -> tuple:
    """Lengths of `pool`'s requests arriving at `times`, each from the middle phase with that
    phase's part of the pool's rate at its time."""
    f = blend.share(times)
    hi, lo = f * blend.middle_rates[pool], (1 - f) * blend.outer_rates[pool]
    from_middle = rng.random(times.size) < hi / np.maximum(hi + lo, 1e-12)
    prompts, outputs = sample_lengths(blend.outer.lengths(pool), times.size, rng)
    p2, o2 = sample_lengths(blend.middle.lengths(pool), times.size, rng)
    return np.where(from_middle, p2, prompts), np.where(from_middle, o2, outputs)


def arrivals(trace: Trace, workload: Workload, seed: int) -> list[Request]:
    """Requests of the trace, sorted by arrival; the same for the same seed (fresh objects:
    a simulation writes its times into them)."""
    if trace.requests is not None:
        return [Request(r.rid, r.pool, r.arrival, r.prompt, r.output) for r in trace.requests]
    rng = np.random.default_rng(seed)
    out: list[tuple[float, str, int, int]] = []
    for pool in POOLS:
        grid = np.linspace(0, trace.duration_s, 2001)
        peak = float(trace.rates[pool](grid).max()) * 1.001
        if peak <= 0:
            continue
        times = np.cumsum(rng.exponential(1 / peak, int(peak * trace.duration_s * 1.2) + 50))
        times = times[times < trace.duration_s]
        times = times[rng.random(times.size) * peak < trace.rates[pool](times)]
        prompts, outputs = sample_lengths(workload.lengths(pool), times.size, rng)
        if trace.blend is not None:
            prompts, outputs = _blended(pool, times, trace.blend, rng)
        out += zip(times.tolist(), [pool] * times.size, prompts.tolist(), outputs.tolist())
    out.sort()
    return [Request(i, pool, t, p, o) for i, (t, pool, p, o) in enumerate(out)]
