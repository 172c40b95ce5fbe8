"""Time per MB of the ingress's streaming body check (string sizes and nesting depth, fed in
64 KB chunks as the body arrives), from 10 KB to the body limit, for several body shapes; in
the same run, `json.loads` of the same body as the baseline. A linear check keeps its ms/MB
flat across sizes, escape-heavy strings included.

    python bench/body_check.py [--max-mb 96] [--repeat 3]

Prints JSON and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from services.guard.body import ShapeCheck, parse_json  # noqa: E402
from services.settings import LimitSettings  # noqa: E402

CHUNK = 64 * 1024
PIECE = 4 * 1024 * 1024  # one string of the body at most (the string limit is 16 MB)


def body(shape: str, size: int) -> bytes:
    """A chat request of about `size` bytes whose strings look like `shape`."""
    unit = {"text": "Some prose, with \"quotes\", a\ttab and a line break.\n",
            "base64": "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk",
            "escapes": "\\\"\\\\\\\"\\n\\u00e9\\\"",
            "small_messages": None}[shape]
    if unit is None:  # many tiny messages: the most tokens per byte a chat body has
        one = {"role": "user", "content": "hi"}
        count = max(1, size // len(json.dumps(one)))
        return json.dumps({"model": "m", "messages": [one] * count}).encode()
    escaped = unit if shape == "escapes" else json.dumps(unit)[1:-1]
    parts, left = [], size
    while left > 0:
        piece = escaped * max(1, min(left, PIECE) // len(escaped))
        parts.append('{"type": "text", "text": "%s"}' % piece)
        left -= len(piece) + 30
    return ('{"model": "m", "messages": [{"role": "user", "content": [%s]}]}'
            % ", ".join(parts)).encode()


def check(raw: bytes, limits: LimitSettings) -> float:
    started = time.perf_counter()
    shape = ShapeCheck(limits)
    for i in range(0, len(raw), CHUNK):
        shape.feed(raw[i:i + CHUNK])
    shape.finish()
    return time.perf_counter() - started


def loads(raw: bytes) -> float:
    started = time.perf_counter()
    parse_json(raw)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    limits = LimitSettings(body_check_budget_s=3600)
    parser.add_argument("--max-mb", type=float, default=limits.max_body_bytes / 2**20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--shapes", nargs="+",
                        default=["text", "base64", "escapes", "small_messages"])
    parser.add_argument("--dense-max-mb", type=float, default=8.0,
                        help="largest small_messages body (json.loads of 96 MB of tiny "
                             "objects needs GBs; no chat request has that many messages)")
    args = parser.parse_args()
    sizes, size = [], 10 * 1024
    while size < args.max_mb * 2**20:
        sizes.append(size)
        size *= 4
    sizes.append(int(args.max_mb * 2**20))
    rows = []
    for shape in args.shapes:
        for size in sizes:
            if shape == "small_messages" and size > args.dense_max_mb * 2**20:
                continue
            raw = body(shape, size)
            mb = len(raw) / 2**20
            best_check = min(check(raw, limits) for _ in range(args.repeat))
            best_loads = min(loads(raw) for _ in range(args.repeat))
            rows.append({"shape": shape, "bytes": len(raw),
                         "check_ms_per_mb": round(best_check * 1000 / mb, 3),
                         "json_loads_ms_per_mb": round(best_loads * 1000 / mb, 3),
                         "check_over_loads": round(best_check / best_loads, 3)})
            del raw
    flat = {}
    for shape in args.shapes:
        per_mb = [r["check_ms_per_mb"] for r in rows if r["shape"] == shape]
        large = [r["check_ms_per_mb"] for r in rows if r["shape"] == shape
                 and r["bytes"] >= 1 << 20] or per_mb
        flat[shape] = round(max(large) / min(large), 2)
    report = {"chunk_bytes": CHUNK, "rows": rows,
              "check_ms_per_mb_max_over_min_from_1mb": flat}
    print(json.dumps(report, indent=1))
    print(f"\n{'shape':<15}{'bytes':>12}{'check ms/MB':>14}{'loads ms/MB':>14}{'ratio':>8}")
    for r in rows:
        print(f"{r['shape']:<15}{r['bytes']:>12}{r['check_ms_per_mb']:>14.2f}"
              f"{r['json_loads_ms_per_mb']:>14.2f}{r['check_over_loads']:>8.2f}")


if __name__ == "__main__":
    main()
