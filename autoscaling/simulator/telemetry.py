"""What the simulated workers report: per pool-and-role sliding windows turned into metrics.

Each window keeps per-second buckets of arrivals, prefill work, latencies and decode step times
for the last `window_s` seconds, as a Prometheus range query over the workers' series would;
the mean output length is over a longer window (`long_window_s`), as the ratio of a completion
tokens histogram's sum and count: a short one, right after a surge, sees only the short answers.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from autoscaling.metrics import RoleMetrics


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of `values`, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _mean(values: list) -> float:
    return sum(values) / len(values) if values else 0.0


@dataclass
class Bucket:
    """One second of one pool-and-role's observations."""

    arrivals: int = 0
    arrival_tokens: int = 0
    prefill_tokens: int = 0
    prefill_busy_s: float = 0.0
    waits: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)
    residencies: list[float] = field(default_factory=list)
    generated: float = 0.0
    outputs: list[int] = field(default_factory=list)


class RoleWindow:
    """The sliding window of one pool-and-role."""

    def __init__(self, window_s: int = 10, long_window_s: int = 1800):
        self.buckets: deque[Bucket] = deque([Bucket()], maxlen=window_s)
        self.outputs: deque[tuple[int, int]] = deque(maxlen=long_window_s)  # (sum, count)
        self.output_sum, self.output_count = 0, 0

    @property
    def now(self) -> Bucket:
        """The bucket being filled."""
        return self.buckets[-1]

    def roll(self) -> None:
        """Start the next second."""
        done = self.buckets[-1].outputs
        if len(self.outputs) == self.outputs.maxlen:
            old_sum, old_count = self.outputs[0]
            self.output_sum, self.output_count = (self.output_sum - old_sum,
                                                  self.output_count - old_count)
        self.outputs.append((sum(done), len(done)))
        self.output_sum += sum(done)
        self.output_count += len(done)
        self.buckets.append(Bucket())

    def metrics(self, replicas: int, starting: int, queued: int, queued_tokens: int, running: int,
                kv_used: float, max_running: int, kv_capacity: int,
                full_batch_tokens_per_s: float = 0.0) -> RoleMetrics:
        """The window's metrics, with the instantaneous counts passed in."""
        span = len(self.buckets)
        b = self.buckets
        busy = sum(x.prefill_busy_s for x in b)
        steps = [s for x in b for s in x.steps]
        residencies = [s for x in b for s in x.residencies]
        return RoleMetrics(
            replicas=replicas, starting=starting, queued_requests=queued,
            queued_prompt_tokens=queued_tokens,
            arrival_requests_per_s=sum(x.arrivals for x in b) / span,
            arrival_prompt_tokens_per_s=sum(x.arrival_tokens for x in b) / span,
            prefill_tokens_per_s=sum(x.prefill_tokens for x in b) / busy if busy else 0.0,
            running_requests=running, max_running_per_replica=max_running,
            decode_residency_s=_mean(residencies),
            generated_tokens_per_s=sum(x.generated for x in b) / span,
            mean_output_tokens=self.output_sum / self.output_count if self.output_count else 0.0,
            decode_tokens_per_s_per_replica=full_batch_tokens_per_s,
            kv_tokens_used=int(kv_used), kv_capacity_per_replica=kv_capacity,
            itl_p50_s=percentile(steps, 0.5), itl_p90_s=percentile(steps, 0.9),
            ttft_p90_s=percentile([s for x in b for s in x.ttfts], 0.9),
            queue_wait_p90_s=percentile([s for x in b for s in x.waits], 0.9))
