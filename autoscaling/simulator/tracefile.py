"""Replay ops' own traffic: CSV trace files in the columns public production LLM traces use.

    TIMESTAMP,ContextTokens,GeneratedTokens[,Effort]

`TIMESTAMP` is seconds (any origin) or an ISO date-time (as in Azure's LLM inference traces,
`2023-11-16 18:15:46.6805900`); `ContextTokens` is the prompt, `GeneratedTokens` the output;
`Effort` (optional) is the request's `reasoning_effort` and picks the pool as the stack's
default routing does (`none`, `minimal`, `low` → fast; `medium`, `high` → deep). A file without
an `Effort` column takes the effort given after its name (`FILE:EFFORT`): one file per pool, or
one mixed file. Times start at the first request of all files and are divided by `speedup`.

Every problem is a `TraceFileError` naming the file and, for a bad row, its line.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from autoscaling.simulator.workload import POOLS, Request, Trace

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens", "Effort")
REQUIRED = COLUMNS[:3]
EFFORT_POOL = {"none": "fast", "minimal": "fast", "low": "fast", "medium": "deep",
               "high": "deep"}


class TraceFileError(ValueError):
    """A trace file that cannot be replayed, and why."""


@dataclass(frozen=True)
class TraceSource:
    """One `--trace` argument: a path and the effort of its rows if the file has none."""

    path: Path
    effort: str | None = None

    @classmethod
    def parse(cls, spec: str) -> TraceSource:
        """`FILE` or `FILE:EFFORT` (the suffix only counts when it names an effort)."""
        head, sep, tail = spec.rpartition(":")
        if not sep or not head or "/" in tail or Path(spec).exists():
            return cls(Path(spec))
        if tail.lower() not in EFFORT_POOL:
            raise TraceFileError(f"{spec}: unknown effort {tail!r}; known: "
                                 f"{', '.join(EFFORT_POOL)}")
        return cls(Path(head), tail.lower())


def _time(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        try:
            return datetime.fromisoformat(value.strip()).timestamp()
        except ValueError:
            raise ValueError(f"TIMESTAMP must be seconds or an ISO date-time; "
                             f"got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"TIMESTAMP must be finite; got {value!r}")
    return number


def _tokens(value: str, column: str) -> int:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{column} must be a number of tokens; got {value!r}") from None
    if not math.isfinite(number) or number < 0 or number != int(number):
        raise ValueError(f"{column} must be a whole number of tokens, 0 or more; got {value!r}")
    return int(number)


def read_rows(source: TraceSource) -> list[tuple[float, str, int, int]]:
    """(time, pool, prompt, output) of every row of one file."""
    name = str(source.path)
    try:
        handle = source.path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise TraceFileError(f"{name}: cannot read: {exc.strerror or exc}") from None
    with handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise TraceFileError(f"{name}: empty file; expected a header "
                                 f"{','.join(REQUIRED)}[,Effort] and one row per request")
        header = [h.strip() for h in header]
        unknown = [h for h in header if h not in COLUMNS]
        if unknown:
            raise TraceFileError(f"{name}: unknown column {unknown[0]!r}; the columns are "
                                 f"{', '.join(COLUMNS)} (Effort optional)")
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise TraceFileError(f"{name}: missing column {missing[0]!r}")
        if "Effort" not in header and source.effort is None:
            raise TraceFileError(f"{name}: no Effort column; give the effort of its rows as "
                                 f"{name}:EFFORT (one of {', '.join(EFFORT_POOL)})")
        index = {c: header.index(c) for c in header}
        rows = []
        for row in reader:
            line = reader.line_num
            if not row or not any(cell.strip() for cell in row):
                continue
            try:
                if len(row) != len(header):
                    raise ValueError(f"{len(row)} fields, the header has {len(header)}")
                effort = source.effort
                if "Effort" in index and row[index["Effort"]].strip():
                    effort = row[index["Effort"]].strip().lower()
                if effort not in EFFORT_POOL:
                    raise ValueError(f"unknown Effort {effort!r}; known: "
                                     f"{', '.join(EFFORT_POOL)}")
                rows.append((_time(row[index["TIMESTAMP"]]), EFFORT_POOL[effort],
                             max(_tokens(row[index["ContextTokens"]], "ContextTokens"), 1),
                             max(_tokens(row[index["GeneratedTokens"]], "GeneratedTokens"), 1)))
            except ValueError as exc:
                raise TraceFileError(f"{name} line {line}: {exc}") from None
        if not rows:
            raise TraceFileError(f"{name}: no requests after the header")
        return rows


def load_trace(sources: list[TraceSource], speedup: float = 1.0,
               name: str | None = None) -> Trace:
    """One trace of every file's requests, from the first arrival, time divided by `speedup`."""
    if not speedup > 0:
        raise TraceFileError(f"--speedup must be above 0; got {speedup}")
    rows = sorted(r for s in sources for r in read_rows(s))
    start = rows[0][0]
    requests = tuple(Request(i, pool, (t - start) / speedup, prompt, output)
                     for i, (t, pool, prompt, output) in enumerate(rows))
    duration = max(requests[-1].arrival, 1.0)
    counts = {p: sum(r.pool == p for r in requests) for p in POOLS}
    rates = {p: (lambda rate: lambda t: np.full_like(t, rate))(n / duration)
             for p, n in counts.items()}
    label = name or "+".join(s.path.name for s in sources)
    return Trace(label, duration, rates, requests=requests)
