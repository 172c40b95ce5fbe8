"""Replay ops' own traffic: CSV trace files in the columns public production LLM traces use.

    TIMESTAMP,ContextTokens,GeneratedTokens[,Effort]

`TIMESTAMP` is seconds (any origin; epoch milliseconds or finer are refused, not read as seconds) or
an ISO date-time (as in Azure's LLM inference traces, `2023-11-16 18:15:46.6805900`; UTC where it
names no offset); column names are matched ignoring case; `ContextTokens` is the prompt,
`GeneratedTokens` the output. A row longer than the model's context (`MAX_CONTEXT`) is refused: the
stack would refuse it. `Effort` (optional) is the request's `reasoning_effort` and picks the pool as
the stack's default routing does (`none`, `minimal`, `low` → fast; `medium`, `high` → deep). A file
without an `Effort` column takes the effort given after its name (`FILE:EFFORT`): one file per pool,
or one mixed file. Times start at the first request of all files and are divided by `speedup`.

Every problem is a `TraceFileError` naming the file and, for a bad row, its line.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from autoscaling.simulator.workload import POOLS, Request, Trace

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens", "Effort")
REQUIRED = COLUMNS[:3]
# the pool each effort reaches under the stack's default routing (`routing.effort_map`)
EFFORT_POOL = {"none": "fast", "minimal": "fast", "low": "fast", "medium": "deep",
               "high": "deep", "xhigh": "deep", "max": "deep"}


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
        if not sep or not head or "/" in tail or "\\" in tail or Path(spec).exists():
            return cls(Path(spec))
        if tail.lower() not in EFFORT_POOL:
            if not Path(head).exists():  # `trace:v2.csv` is a file name, not a bad effort
                return cls(Path(spec))
            raise TraceFileError(f"{spec}: unknown effort {tail!r}; known: "
                                 f"{', '.join(EFFORT_POOL)}")
        return cls(Path(head), tail.lower())


MAX_TOKENS = 10_000_000  # per row and column: far beyond any context, still a number
# the production profile's context (Mistral Small 4's 256K): a row beyond it is a request the
# stack refuses (400), which would otherwise count as load that sizes the answer's budget
MAX_CONTEXT = 262_144
# seconds since 1970 stay below this until the year 5138; epoch milliseconds are above it
# from 1973 on: a file in milliseconds would otherwise be read as seconds, 1000x too slow
MAX_SECONDS = 1e11
MAX_SPAN_S = 7 * 86400.0  # simulated time (after --speedup): the simulator ticks every second
SECONDS, ISO = "seconds", "ISO date-times"


def _time(value: str) -> tuple[float, str]:
    """The time and its kind (`SECONDS` or `ISO`: one file, or one run, never mixes them)."""
    try:
        number = float(value)
    except ValueError:
        try:
            at = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"TIMESTAMP must be seconds or an ISO date-time; "
                             f"got {value!r}") from None
        if at.tzinfo is None:  # not this machine's zone: a daylight-saving change would
            at = at.replace(tzinfo=timezone.utc)  # drop or repeat an hour
        return at.timestamp(), ISO
    if not math.isfinite(number):
        raise ValueError(f"TIMESTAMP must be finite; got {value!r}")
    if abs(number) >= MAX_SECONDS:
        raise ValueError(f"TIMESTAMP {value!r} is not seconds (epoch milliseconds or finer?): "
                         "convert it to seconds or to an ISO date-time")
    return number, SECONDS


def _tokens(value: str, column: str) -> int:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{column} must be a number of tokens; got {value!r}") from None
    if not math.isfinite(number) or number < 0 or number != int(number):
        raise ValueError(f"{column} must be a whole number of tokens, 0 or more; got {value!r}")
    if number > MAX_TOKENS:
        raise ValueError(f"{column} must be at most {MAX_TOKENS:,} tokens; got {value!r}")
    return int(number)


def read_rows(source: TraceSource) -> list[tuple[float, str, int, int]]:
    """(time, pool, prompt, output) of every row of one file."""
    return _read(source)[0]


def _read(source: TraceSource) -> tuple[list[tuple[float, str, int, int]], str]:
    """`read_rows`, and the kind of its times (`SECONDS` or `ISO`)."""
    name = str(source.path)
    try:
        # utf-8-sig: a spreadsheet's export starts with a byte-order mark
        handle = source.path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise TraceFileError(f"{name}: cannot read: {exc.strerror or exc}") from None
    reader = csv.reader(handle)
    try:
        with handle:
            return _rows(name, source, reader)
    except UnicodeDecodeError as exc:
        raise TraceFileError(f"{name}: not UTF-8 text (byte {exc.start} of a chunk; a CSV "
                             "file is expected)") from None
    except csv.Error as exc:  # the header's, or a field beyond csv's limit
        raise TraceFileError(f"{name} line {reader.line_num}: {exc}") from None


def _rows(name: str, source: TraceSource, reader) -> tuple[list[tuple[float, str, int, int]],
                                                            str]:
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise TraceFileError(f"{name}: empty file; expected a header "
                             f"{','.join(REQUIRED)}[,Effort] and one row per request")
    canonical = {c.lower(): c for c in COLUMNS}
    header = [canonical.get(h.strip().lower(), h.strip()) for h in header]
    unknown = [h for h in header if h not in COLUMNS]
    if unknown:
        raise TraceFileError(f"{name}: unknown column {unknown[0]!r}; the columns are "
                             f"{', '.join(COLUMNS)} (Effort optional)")
    twice = [h for h in COLUMNS if header.count(h) > 1]
    if twice:
        raise TraceFileError(f"{name}: column {twice[0]!r} appears twice")
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise TraceFileError(f"{name}: missing column {missing[0]!r}")
    if "Effort" not in header and source.effort is None:
        raise TraceFileError(f"{name}: no Effort column; give the effort of its rows as "
                             f"{name}:EFFORT (one of {', '.join(EFFORT_POOL)})")
    index = {c: header.index(c) for c in header}
    rows, kinds = [], set()
    while True:
        line = reader.line_num + 1  # where the row starts (a quoted field may span lines)
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise TraceFileError(f"{name} line {line}: {exc}") from None
        if not row or not any(cell.strip() for cell in row):
            continue
        try:
            if len(row) != len(header):
                raise ValueError(f"{len(row)} fields, the header has {len(header)}")
            effort = source.effort
            if "Effort" in index and row[index["Effort"]].strip():
                effort = row[index["Effort"]].strip().lower()
            if effort is None:
                raise ValueError(f"no Effort on this row; fill it, or give the file's as "
                                 f"{name}:EFFORT (one of {', '.join(EFFORT_POOL)})")
            if effort not in EFFORT_POOL:
                raise ValueError(f"unknown Effort {effort!r}; known: "
                                 f"{', '.join(EFFORT_POOL)}")
            at, kind = _time(row[index["TIMESTAMP"]])
            kinds.add(kind)
            if len(kinds) > 1:
                raise ValueError(f"TIMESTAMP is {kind} here, the rows before have "
                                 f"{(kinds - {kind}).pop()}; a file keeps to one kind")
            prompt = max(_tokens(row[index["ContextTokens"]], "ContextTokens"), 1)
            output = max(_tokens(row[index["GeneratedTokens"]], "GeneratedTokens"), 1)
            if prompt + output > MAX_CONTEXT:
                raise ValueError(f"ContextTokens + GeneratedTokens is {prompt + output:,}, "
                                 f"beyond the model's context of {MAX_CONTEXT:,} tokens (the "
                                 "stack refuses such a request); leave the row out")
            rows.append((at, EFFORT_POOL[effort], prompt, output))
        except ValueError as exc:
            raise TraceFileError(f"{name} line {line}: {exc}") from None
    if not rows:
        raise TraceFileError(f"{name}: no requests after the header")
    return rows, kinds.pop()


def load_trace(sources: list[TraceSource], speedup: float = 1.0,
               name: str | None = None) -> Trace:
    """One trace of every file's requests, from the first arrival, time divided by `speedup`."""
    if not 0 < speedup < math.inf:
        raise TraceFileError(f"--speedup must be above 0 and finite; got {speedup}")
    read = [(s.path, *_read(s)) for s in sources]
    kinds = {kind: path for path, _, kind in read}
    if len(kinds) > 1:
        raise TraceFileError(f"{kinds[SECONDS]} has TIMESTAMP in seconds, {kinds[ISO]} as "
                             "ISO date-times: their times cannot be put on one clock")
    rows = sorted(r for _, rows, _ in read for r in rows)
    start = rows[0][0]
    requests = tuple(Request(i, pool, (t - start) / speedup, prompt, output)
                     for i, (t, pool, prompt, output) in enumerate(rows))
    duration = max(requests[-1].arrival, 1.0)
    if duration > MAX_SPAN_S:
        raise TraceFileError(f"the trace spans {duration / 86400:,.3g} days of simulated time; "
                             f"at most {MAX_SPAN_S / 86400:g} (compress it with --speedup, "
                             "or check TIMESTAMP's unit: seconds are expected)")
    counts = {p: sum(r.pool == p for r in requests) for p in POOLS}
    rates = {p: (lambda rate: lambda t: np.full_like(t, rate))(n / duration)
             for p, n in counts.items()}
    label = name or "+".join(s.path.name for s in sources)
    return Trace(label, duration, rates, requests=requests)
