"""Added TTFT of tracing at 100 % sampling versus tracing off, in one run.

Two copies of the stack with the simulated engine at zero compute (so only the stack's own cost
shows): one exporting every span over OTLP/HTTP to a receiver on loopback, one with tracing
off. Requests alternate between them so drift hits both alike.

    .ci/loopback-only python bench/tracing_overhead.py [--requests 200]

Target (issue 5): <= 1 ms p50 extra. Prints JSON and a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
from stack_overhead import BASE, ZERO, deploy, http_stream, pct


class Sink(BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that accepts and counts exports."""

    exports = 0

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        Sink.exports += 1
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


async def alternate(urls: dict[str, str], n: int) -> dict[str, list[float]]:
    out = {name: [] for name in urls}
    async with httpx.AsyncClient(timeout=60) as http:
        for _ in range(5):
            for url in urls.values():
                await http_stream(http, url, 2)
        for _ in range(n):
            for name, url in urls.items():
                out[name].append((await http_stream(http, url, 2))[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()
    sink = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{sink.server_address[1]}/v1/traces"
    traced = {"tracing": {"enabled": True, "endpoint": endpoint, "sampling_ratio": 1.0}}
    apps = {"untraced": BASE | {"engine": ZERO},
            "traced": BASE | {"engine": ZERO, "telemetry": traced}}
    urls = deploy(args.port, apps)
    ttft = asyncio.run(alternate(urls, args.requests))
    rows = {name: {"p50_ms": 1e3 * statistics.median(v), "p99_ms": 1e3 * pct(v, 0.99)}
            for name, v in ttft.items()}
    extra = rows["traced"]["p50_ms"] - rows["untraced"]["p50_ms"]
    report = {"bench": "tracing_overhead", "requests_each": args.requests, "ttft": rows,
              "extra_p50_ms": extra,
              "extra_p99_ms": rows["traced"]["p99_ms"] - rows["untraced"]["p99_ms"],
              "otlp_exports_received": Sink.exports, "target_le_1ms_p50": extra <= 1.0}
    print(json.dumps(report, indent=2))
    print(f"\n{'tracing':>10} | {'TTFT p50 ms':>11} | {'TTFT p99 ms':>11}")
    for name, row in rows.items():
        print(f"{name:>10} | {row['p50_ms']:11.2f} | {row['p99_ms']:11.2f}")
    print(f"extra p50: {extra:.2f} ms; OTLP exports received: {Sink.exports}")


if __name__ == "__main__":
    main()
