"""What a worker tells the autoscaler: its recent load over a sliding window, as plain numbers.

Each worker keeps one `LoadWindow` (one-second buckets, `window_s` of them) and Ray Serve asks
for `report()` through the deployment's `record_autoscaling_stats` hook. The keys are the field
names of `autoscaling.metrics.RoleMetrics`, per replica: the Serve adapter sums counts and rates
over replicas and takes the worst percentile. A percentile with no samples is left out (Ray
takes numbers only). `slo_met`/`slo_total` count the window's requests that met this role's
latency objective (prefill: time to first token; decode: mean time per output token).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from services.engines.protocol import EngineStats

MAX_SAMPLES = 4096  # per bucket, so a burst cannot grow a window without bound


@dataclass
class _Bucket:
    second: int
    arrivals: int = 0
    arrival_tokens: int = 0
    prefill_tokens: int = 0
    prefill_busy_s: float = 0.0
    generated: int = 0
    outputs: list[int] = field(default_factory=list)
    residencies: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # TTFT (prefill) or ITL (decode)
    waits: list[float] = field(default_factory=list)
    slo_met: int = 0
    slo_total: int = 0


def _p90(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(int(0.9 * len(ordered)), len(ordered) - 1)]


def _add(samples: list, value) -> None:
    if len(samples) < MAX_SAMPLES:
        samples.append(value)


class LoadWindow:
    """The last `window_s` seconds of one worker's load; `clock` is injectable for tests."""

    def __init__(self, slo_s: float, window_s: int = 10,
                 clock: Callable[[], float] = time.monotonic):
        self.slo_s, self.window_s, self.clock = slo_s, window_s, clock
        self.buckets: deque[_Bucket] = deque()
        self.outputs = (0, 0)  # (sum, count) of output lengths over the worker's life

    def _now(self) -> _Bucket:
        second = int(self.clock())
        if not self.buckets or self.buckets[-1].second != second:
            self.buckets.append(_Bucket(second))
        while self.buckets[0].second <= second - self.window_s:
            self.buckets.popleft()
        return self.buckets[-1]

    def arrived(self, prompt_tokens: int) -> None:
        b = self._now()
        b.arrivals += 1
        b.arrival_tokens += prompt_tokens

    def prefilled(self, tokens: int, compute_s: float, wait_s: float, ttft_s: float) -> None:
        """A prompt finished prefill on this worker."""
        b = self._now()
        b.prefill_tokens += tokens
        b.prefill_busy_s += compute_s
        _add(b.waits, wait_s)
        _add(b.latencies, ttft_s)
        b.slo_total += 1
        b.slo_met += ttft_s <= self.slo_s

    def generated(self, tokens: int, seconds_per_token: float) -> None:
        """`tokens` more output tokens arrived, `seconds_per_token` apart."""
        b = self._now()
        b.generated += tokens
        for _ in range(min(tokens, 64)):
            _add(b.latencies, seconds_per_token)

    def decoded(self, output_tokens: int, residency_s: float, wait_s: float) -> None:
        """A request left decode after `residency_s`, having waited `wait_s` for its prefill."""
        b = self._now()
        _add(b.outputs, output_tokens)
        _add(b.residencies, residency_s)
        _add(b.waits, wait_s)
        total, count = self.outputs
        self.outputs = (total + output_tokens, count + 1)
        b.slo_total += 1
        b.slo_met += residency_s / max(output_tokens, 1) <= self.slo_s

    def report(self, stats: EngineStats, max_running: int) -> dict[str, float]:
        """This replica's numbers for the autoscaler (keys of `RoleMetrics`)."""
        self._now()
        b, span = self.buckets, float(self.window_s)
        busy = sum(x.prefill_busy_s for x in b)
        residencies = [r for x in b for r in x.residencies]
        total, count = self.outputs
        out: dict[str, float] = {
            "queued_requests": stats.waiting, "running_requests": stats.running,
            "max_running_per_replica": max_running,
            "kv_tokens_used": stats.kv_tokens, "kv_capacity_per_replica": stats.kv_capacity,
            "arrival_requests_per_s": sum(x.arrivals for x in b) / span,
            "arrival_prompt_tokens_per_s": sum(x.arrival_tokens for x in b) / span,
            "prefill_tokens_per_s": sum(x.prefill_tokens for x in b) / busy if busy else 0.0,
            "generated_tokens_per_s": sum(x.generated for x in b) / span,
            "decode_residency_s": sum(residencies) / len(residencies) if residencies else 0.0,
            "mean_output_tokens": total / count if count else 0.0,
            "slo_met": sum(x.slo_met for x in b), "slo_total": sum(x.slo_total for x in b),
            "healthy": float(stats.healthy)}
        for key, values in (("latency_p90_s", [v for x in b for v in x.latencies]),
                            ("queue_wait_p90_s", [v for x in b for v in x.waits])):
            p90 = _p90(values)
            if p90 is not None:
                out[key] = p90
        return out
