"""A process's metrics hold what their labels name, not what they observed: the decode worker
observes its ITL once per output token for the replica's whole life."""

from __future__ import annotations

import tracemalloc

from services.telemetry import metrics


def test_a_histogram_keeps_a_count_and_a_sum_not_its_values():
    histogram = metrics.Histogram("small4_test_seconds", "test", ("pool",), [0.1, 1.0])
    for _ in range(10_000):  # the label set's entries and the interpreter's free lists exist
        histogram.observe(0.5, pool="fast")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(100_000):
            histogram.observe(i / 1e6, pool="fast")
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes kept for 100,000 observations"
    assert histogram.count(pool="fast") == 110_000 and histogram.count(pool="deep") == 0
    assert abs(histogram.sum(pool="fast") - (5000 + sum(i / 1e6 for i in range(100_000)))) < 1e-6
