"""What a worker tells the autoscaler: its recent load, as plain numbers.

Each worker keeps one `LoadWindow`, the same window the simulator keeps for its modelled
engines (`autoscaling.window`: rates over the last 10 s, the mean output length over the last
300 s), and Ray Serve asks for `report()` through the deployment's `record_autoscaling_stats`
hook. The keys are the field names of `autoscaling.window.LoadReport` (those of
`autoscaling.metrics.RoleMetrics` where they mean the same), per replica, plus `healthy`: the
Serve adapter sums counts and rates over replicas, takes the worst percentile and pools the
per-request means by the requests behind them (`autoscaling.serve_policy`). A percentile
with no samples is left out (Ray takes numbers only). `slo_met`/`slo_total` count the window's
requests that met this role's latency objective (prefill: time to first token; decode: mean
time per output token).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from autoscaling import window
from services.engines.protocol import EngineStats

MAX_SAMPLES = window.MAX_SAMPLES


class LoadWindow(window.LoadWindow):
    """The shared window with the worker's clock (`time.monotonic`; injectable for tests)."""

    def __init__(self, slo_s: float, window_s: int = window.WINDOW_S,
                 clock: Callable[[], float] = time.monotonic,
                 output_window_s: int = window.OUTPUT_WINDOW_S):
        super().__init__(slo_s, clock, window_s, output_window_s)

    def report(self, stats: EngineStats, max_running: int) -> dict[str, float]:
        """This replica's numbers for the autoscaler."""
        snapshot = self.snapshot(queued=stats.waiting, running=stats.running,
                                 max_running=max_running, kv_used=stats.kv_tokens,
                                 kv_capacity=stats.kv_capacity)
        return {**snapshot.stats(), "healthy": float(stats.healthy)}
