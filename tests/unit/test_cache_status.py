"""`small4 status`'s prefix-cache table from Ray's Prometheus text (as the exporter writes it)."""

from __future__ import annotations

from cluster.cache_status import cache_rows, cache_table

EXPOSITION = """\
# HELP ray_small4_prefix_cache_lookup_tokens prompt tokens looked up
# TYPE ray_small4_prefix_cache_lookup_tokens gauge
ray_small4_prefix_cache_lookup_tokens{Component="core_worker",pool="fast",replica="abc123",role="prefill"} 4000.0
ray_small4_prefix_cache_lookup_tokens{Component="core_worker",pool="fast",replica="def456",role="prefill"} 1000.0
# HELP ray_small4_prefix_cache_hit_tokens prompt tokens served from the cache
# TYPE ray_small4_prefix_cache_hit_tokens gauge
ray_small4_prefix_cache_hit_tokens{Component="core_worker",pool="fast",replica="abc123",role="prefill"} 3000.0
# HELP ray_small4_prefix_cache_tokens held
# TYPE ray_small4_prefix_cache_tokens gauge
ray_small4_prefix_cache_tokens{Component="core_worker",pool="fast",replica="abc123",role="prefill"} 2048.0
# HELP ray_small4_queue_depth requests waiting
# TYPE ray_small4_queue_depth gauge
ray_small4_queue_depth{pool="fast",role="prefill"} 3.0
"""


def test_rows_per_replica_and_hit_rate():
    rows = cache_rows(EXPOSITION)
    assert rows[("fast", "prefill", "abc123")] == {"lookup": 4000.0, "hit": 3000.0,
                                                   "held": 2048.0}
    assert rows[("fast", "prefill", "def456")] == {"lookup": 1000.0}
    table = cache_table(rows)
    assert "75.0%" in table and "abc123" in table and "def456" in table
    assert cache_table({}).startswith("prefix cache: no prefill")
