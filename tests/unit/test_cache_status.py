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


def test_status_reads_every_nodes_endpoint_and_says_which_did_not_answer():
    """On a cluster each node's exporter reports the replicas it hosts (the head none)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cluster.cli import cache_view

    other = EXPOSITION.replace("abc123", "ghi789").replace("def456", "jkl000")
    servers = []
    for text in (EXPOSITION, other):
        class Handler(BaseHTTPRequestHandler):
            body = text.encode()

            def do_GET(self):
                self.send_response(200)
                self.send_header("content-length", str(len(self.body)))
                self.end_headers()
                self.wfile.write(self.body)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    try:
        urls = [f"http://127.0.0.1:{s.server_address[1]}/metrics" for s in servers]
        view = cache_view(urls + ["http://127.0.0.1:9/metrics"])
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert all(replica in view for replica in ("abc123", "def456", "ghi789", "jkl000"))
    assert "127.0.0.1:9/metrics did not answer" in view
