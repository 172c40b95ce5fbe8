"""The one load window a worker keeps and a simulated engine keeps: what the autoscaler sees.

Production workers (`services.workers.load`) and the simulator (`autoscaling.simulator.sim`)
both record their events here and both turn it into the same typed `LoadReport`, so the policy
in the simulator sees what it sees under Ray Serve. Pure: the clock is injected (the worker
passes `time.monotonic`, the simulator its event time, tests a fake).

Three spans, one per kind of signal:

- rates, latencies, waits and SLO counts over the last `window_s` seconds (10 by default, a
  Prometheus `rate()` over the workers' series would use the same), in one-second buckets;
- the mean output length over the last `output_window_s` seconds (300 by default): long enough
  that a burst of short answers does not hide the long ones still decoding, short enough that
  a shift to long reasoning outputs is seen within minutes (the worker used to average over its
  whole life, the simulator over 30 minutes);
- the expected output of a request arriving now (`arriving_output_tokens`), from the decode
  streams that arrived in the last `recent_s` seconds (60): a finished one at its length, a
  running one at the mean length of the answers finished within `output_window_s` that were
  longer than its tokens so far (what it is still expected to reach: neither cut at what it
  has, which would read a rising load low because the short answers finish first, nor at the
  mean). When the mix moves to shorter answers this follows within a minute, where the mean
  of what finished stays on the long ones for minutes; the autoscaler multiplied that mean by
  the new, larger arrival rate and held decode engines the prefill-heavy traffic needed. A
  stream that ended before its first token (its prefill failed, its client left) decoded
  nothing and says nothing of what arrives: it is left out (a prefill overload would
  otherwise read as short answers and give decode engines away). The streams are reported
  with their count, so replicas pool by it (`autoscaling.serve_policy`).

Samples per bucket are capped (`MAX_SAMPLES`) so a burst cannot grow a window without bound.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, field
from typing import Literal

from autoscaling.metrics import RoleMetrics

MAX_SAMPLES = 4096
WINDOW_S = 10
OUTPUT_WINDOW_S = 300
RECENT_S = 60
BUSY_HORIZON_S = 120  # a prefill interval is compared with those that ended this long before


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of `values`, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class _Bucket:
    second: int
    arrivals: int = 0
    arrival_tokens: int = 0
    prefill_tokens: int = 0
    prefill_busy_s: float = 0.0
    generated: float = 0.0
    residencies: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # TTFT (prefill) or ITL (decode)
    waits: list[float] = field(default_factory=list)
    slo_met: int = 0
    slo_total: int = 0


@dataclass(slots=True)
class Stream:
    """One decode stream as the window follows it: the caller counts `tokens` as they leave;
    `output` is set when it ends (`LoadWindow.decoded`, or `ended` for one cut short)."""

    second: int
    tokens: int = 0
    output: int | None = None  # 0: it decoded nothing, and is left out

    def ended(self, tokens: int) -> None:
        """It stopped after `tokens` (an error, the client gone): counted at what it sent,
        left out when that is nothing."""
        if self.output is None:
            self.output = max(tokens, 0)


class _Spans:
    """Disjoint time intervals, sorted, ending within the last `BUSY_HORIZON_S`: `add`
    returns how much of a new interval they did not cover yet, and merges it in."""

    def __init__(self):
        self.starts: list[float] = []
        self.ends: list[float] = []

    def add(self, start: float, end: float) -> float:
        while self.ends and self.ends[0] < end - BUSY_HORIZON_S:
            del self.starts[0], self.ends[0]
        lo = bisect.bisect_left(self.ends, start)  # the first span ending at or after start
        hi = bisect.bisect_right(self.starts, end)  # past the last starting at or before end
        covered = sum(min(e, end) - max(s, start)
                      for s, e in zip(self.starts[lo:hi], self.ends[lo:hi]))
        new = max(end - start - covered, 0.0)
        if lo < hi:
            start, end = min(start, self.starts[lo]), max(end, self.ends[hi - 1])
        self.starts[lo:hi], self.ends[lo:hi] = [start], [end]
        return new


def _add(samples: list, value: float) -> None:
    if len(samples) < MAX_SAMPLES:
        samples.append(value)


@dataclass(frozen=True)
class LoadReport:
    """One replica's (or one simulated engine group's) load: window figures and the
    instantaneous counts the caller passes in. Field names are those of `RoleMetrics` where
    they mean the same thing."""

    arrival_requests_per_s: float = 0.0
    arrival_prompt_tokens_per_s: float = 0.0
    prefill_tokens_per_s: float = 0.0  # per busy second; 0 when nothing was prefilled
    prefill_busy_s: float = 0.0  # the busy seconds behind it (replicas pool by them)
    generated_tokens_per_s: float = 0.0
    decode_residency_s: float = 0.0
    mean_output_tokens: float = 0.0  # over `output_window_s`
    finished_outputs: int = 0  # the answers behind it
    arriving_output_tokens: float = 0.0  # expected of a request arriving now (recent streams)
    arriving_streams: int = 0  # the recent streams behind it (0: it is the finished mean)
    latency_p50_s: float | None = None
    latency_p90_s: float | None = None
    queue_wait_p90_s: float | None = None
    slo_met: int = 0
    slo_total: int = 0
    queued_requests: int = 0
    running_requests: int = 0
    max_running_per_replica: int = 0
    kv_tokens_used: int = 0
    kv_capacity_per_replica: int = 0

    def stats(self) -> dict[str, float]:
        """Numbers only, as Ray Serve's `record_autoscaling_stats` takes them: a percentile
        with no samples is left out."""
        return {k: float(v) for k, v in asdict(self).items() if v is not None}

    def role_metrics(self, role: Literal["prefill", "decode"], replicas: int, starting: int = 0,
                     decode_tokens_per_s_per_replica: float = 0.0) -> RoleMetrics:
        """The policy's view of this report (summed over replicas already, if it was)."""
        mean_prompt = (self.arrival_prompt_tokens_per_s / self.arrival_requests_per_s
                       if self.arrival_requests_per_s else 0.0)
        return RoleMetrics(
            replicas=replicas, starting=starting, queued_requests=self.queued_requests,
            queued_prompt_tokens=int(self.queued_requests * mean_prompt),
            arrival_requests_per_s=self.arrival_requests_per_s,
            arrival_prompt_tokens_per_s=self.arrival_prompt_tokens_per_s,
            prefill_tokens_per_s=self.prefill_tokens_per_s,
            running_requests=self.running_requests,
            max_running_per_replica=self.max_running_per_replica,
            decode_residency_s=self.decode_residency_s,
            generated_tokens_per_s=self.generated_tokens_per_s,
            mean_output_tokens=self.mean_output_tokens,
            arriving_output_tokens=self.arriving_output_tokens,
            decode_tokens_per_s_per_replica=decode_tokens_per_s_per_replica,
            kv_tokens_used=self.kv_tokens_used,
            kv_capacity_per_replica=self.kv_capacity_per_replica,
            itl_p50_s=self.latency_p50_s if role == "decode" else None,
            itl_p90_s=self.latency_p90_s if role == "decode" else None,
            ttft_p90_s=self.latency_p90_s if role == "prefill" else None,
            queue_wait_p90_s=self.queue_wait_p90_s)


class LoadWindow:
    """The recent load of one prefill or decode worker. `slo_s` is its role's latency
    objective: time to first token (prefill) or seconds per output token (decode)."""

    def __init__(self, slo_s: float, clock: Callable[[], float], window_s: int = WINDOW_S,
                 output_window_s: int = OUTPUT_WINDOW_S, recent_s: int = RECENT_S):
        if window_s < 1 or output_window_s < 1 or recent_s < 1:
            raise ValueError("windows are whole seconds, at least one")
        self.slo_s, self.clock = slo_s, clock
        self.window_s, self.output_window_s, self.recent_s = window_s, output_window_s, recent_s
        self.buckets: deque[_Bucket] = deque()
        self.outputs: deque[list] = deque()  # [second, sum, count]
        self.output_sum, self.output_count = 0, 0
        self.finished: deque[tuple[int, int]] = deque()  # (second, output), MAX_SAMPLES at most
        self.lengths: list[int] = []  # the outputs in `finished`, sorted
        self.streams: deque[Stream] = deque()  # arrived within `recent_s`, MAX_SAMPLES at most
        self.busy: dict[Hashable, _Spans] = {}  # per engine: the prefill time counted

    def _now(self) -> _Bucket:
        second = int(self.clock())
        if not self.buckets or self.buckets[-1].second != second:
            self.buckets.append(_Bucket(second))
        while self.buckets[0].second <= second - self.window_s:
            self.buckets.popleft()
        while self.outputs and self.outputs[0][0] <= second - self.output_window_s:
            _, total, count = self.outputs.popleft()
            self.output_sum, self.output_count = self.output_sum - total, self.output_count - count
        while self.finished and self.finished[0][0] <= second - self.output_window_s:
            self._forget()
        while self.streams and self.streams[0].second <= second - self.recent_s:
            self.streams.popleft()
        return self.buckets[-1]

    def _forget(self) -> None:
        _, n = self.finished.popleft()
        del self.lengths[bisect.bisect_left(self.lengths, n)]

    def stream(self) -> Stream:
        """A decode stream arrived now: the caller keeps its `tokens` current and passes it to
        `decoded` when it finishes (or calls its `ended`)."""
        stream = Stream(self._now().second)
        if len(self.streams) >= MAX_SAMPLES:
            self.streams.popleft()
        self.streams.append(stream)
        return stream

    def arrived(self, prompt_tokens: int) -> None:
        """A request arrived for this role."""
        b = self._now()
        b.arrivals += 1
        b.arrival_tokens += prompt_tokens

    def prefilled(self, tokens: int, compute_s: float, wait_s: float, ttft_s: float,
                  engine: Hashable = None) -> None:
        """A prompt finished prefill on `engine` now, after `compute_s` in it (queueing
        excluded; in a batch, the batch's time), `wait_s` queued, `ttft_s` after it arrived.

        The engine's busy time is the union of its prompts' compute intervals, not their sum:
        an engine that prefills a batch of k prompts (SGLang) reports each one's whole batch
        time, and the sum read its rate k times low. Each interval ends now; the part of it
        that intervals reported earlier already covered, in whatever order they ended, is not
        counted again."""
        b = self._now()
        b.prefill_tokens += tokens
        now = self.clock()
        spans = self.busy.setdefault(engine, _Spans())
        b.prefill_busy_s += spans.add(now - max(compute_s, 0.0), now)
        _add(b.waits, wait_s)
        _add(b.latencies, ttft_s)
        b.slo_total += 1
        b.slo_met += ttft_s <= self.slo_s

    def waited(self, wait_s: float) -> None:
        """A request waited `wait_s` in this role's queue before its work began."""
        _add(self._now().waits, wait_s)

    def generated(self, tokens: float, seconds_per_token: float) -> None:
        """`tokens` more output tokens left, `seconds_per_token` apart."""
        b = self._now()
        b.generated += tokens
        for _ in range(min(int(tokens), 64)):
            _add(b.latencies, seconds_per_token)

    def decoded(self, output_tokens: int, residency_s: float, wait_s: float | None = None,
                stream: Stream | None = None) -> None:
        """A request left decode after `residency_s`, having waited `wait_s` (if known); its
        `stream`, when the caller followed it, ends at `output_tokens`."""
        b = self._now()
        if stream is not None:
            stream.output = output_tokens
        if len(self.finished) >= MAX_SAMPLES:
            self._forget()
        self.finished.append((b.second, output_tokens))
        bisect.insort(self.lengths, output_tokens)
        _add(b.residencies, residency_s)
        if wait_s is not None:
            _add(b.waits, wait_s)
        if self.outputs and self.outputs[-1][0] == b.second:
            self.outputs[-1][1] += output_tokens
            self.outputs[-1][2] += 1
        else:
            self.outputs.append([b.second, output_tokens, 1])
        self.output_sum += output_tokens
        self.output_count += 1
        b.slo_total += 1
        b.slo_met += residency_s / max(output_tokens, 1) <= self.slo_s

    @property
    def mean_output_tokens(self) -> float:
        """Mean output of the requests that finished within `output_window_s`; 0 without."""
        return self.output_sum / self.output_count if self.output_count else 0.0

    def _arriving(self) -> tuple[float, int]:
        """The expected output of a request arriving now (see the module's docstring) and the
        streams behind it; the mean of what finished, and 0, when no stream arrived within
        `recent_s` (or nothing finished)."""
        self._now()
        if not self.streams or not self.finished:
            return self.mean_output_tokens, 0
        lengths, below = self.lengths, None
        total, counted = 0.0, 0
        for s in self.streams:
            if s.output == 0:
                continue
            counted += 1
            if s.output is not None:
                total += s.output
                continue
            if below is None:  # below[i]: the sum of lengths[:i]
                below = [0, *itertools.accumulate(lengths)]
            i = bisect.bisect_right(lengths, s.tokens)
            longer = len(lengths) - i
            total += (below[-1] - below[i]) / longer if longer else s.tokens
        if not counted:
            return self.mean_output_tokens, 0
        return total / counted, counted

    def snapshot(self, queued: int = 0, running: int = 0, max_running: int = 0, kv_used: int = 0,
                 kv_capacity: int = 0) -> LoadReport:
        """The window's figures with the caller's instantaneous counts."""
        self._now()
        arriving, streams = self._arriving()
        b, span = self.buckets, float(self.window_s)
        busy = sum(x.prefill_busy_s for x in b)
        residencies = [r for x in b for r in x.residencies]
        latencies = [v for x in b for v in x.latencies]
        return LoadReport(
            arrival_requests_per_s=sum(x.arrivals for x in b) / span,
            arrival_prompt_tokens_per_s=sum(x.arrival_tokens for x in b) / span,
            prefill_tokens_per_s=sum(x.prefill_tokens for x in b) / busy if busy else 0.0,
            prefill_busy_s=busy,
            generated_tokens_per_s=sum(x.generated for x in b) / span,
            decode_residency_s=sum(residencies) / len(residencies) if residencies else 0.0,
            mean_output_tokens=self.mean_output_tokens, finished_outputs=self.output_count,
            arriving_output_tokens=arriving, arriving_streams=streams,
            latency_p50_s=percentile(latencies, 0.5), latency_p90_s=percentile(latencies, 0.9),
            queue_wait_p90_s=percentile([v for x in b for v in x.waits], 0.9),
            slo_met=sum(x.slo_met for x in b), slo_total=sum(x.slo_total for x in b),
            queued_requests=queued, running_requests=running, max_running_per_replica=max_running,
            kv_tokens_used=int(kv_used), kv_capacity_per_replica=int(kv_capacity))
