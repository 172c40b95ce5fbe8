"""Metrics that count in-process and, inside a Ray worker, export through Ray's metrics agent
(Prometheus names get Ray's `ray_` prefix). Local values make them testable without Ray."""

from __future__ import annotations

from collections import Counter as _Tally
from collections import defaultdict


class _Metric:
    kind = ""

    def __init__(self, name: str, description: str, labels: tuple[str, ...], **options):
        self.name, self.description, self.labels, self.options = name, description, labels, options
        self._ray = None

    def _key(self, tags: dict[str, str]) -> tuple[str, ...]:
        return tuple(str(tags[label]) for label in self.labels)

    def _exporter(self):
        if self._ray is None:
            import ray

            if not ray.is_initialized():
                return None
            from ray.util import metrics

            self._ray = getattr(metrics, self.kind)(self.name, self.description,
                                                    tag_keys=self.labels, **self.options)
        return self._ray


class Counter(_Metric):
    """A monotonically increasing, labelled count."""

    kind = "Counter"

    def __init__(self, name, description, labels):
        super().__init__(name, description, labels)
        self._local: _Tally = _Tally()

    def inc(self, amount: float = 1.0, **tags: str) -> None:
        self._local[self._key(tags)] += amount
        if amount > 0 and (exporter := self._exporter()) is not None:
            exporter.inc(amount, tags=tags)

    def value(self, **tags: str) -> float:
        return self._local[self._key(tags)]


class TenantCounter(Counter):
    """A counter with a `tenant` label that names the tenant only where settings ask for it
    (`telemetry.tenant_labels`, see `show_tenants`); otherwise the label reads `all`."""

    show = False

    def inc(self, amount: float = 1.0, **tags: str) -> None:
        if not TenantCounter.show:
            tags = tags | {"tenant": "all"}
        super().inc(amount, **tags)

    def value(self, **tags: str) -> float:
        return super().value(**(tags if TenantCounter.show else tags | {"tenant": "all"}))


def show_tenants(on: bool) -> None:
    """Whether this process's tenant-labelled counters name tenants."""
    TenantCounter.show = on


class Gauge(_Metric):
    """A labelled last value."""

    kind = "Gauge"

    def __init__(self, name, description, labels):
        super().__init__(name, description, labels)
        self._local: dict[tuple[str, ...], float] = {}

    def set(self, value: float, **tags: str) -> None:
        self._local[self._key(tags)] = value
        if (exporter := self._exporter()) is not None:
            exporter.set(value, tags=tags)

    def value(self, **tags: str) -> float | None:
        return self._local.get(self._key(tags))


class Histogram(_Metric):
    """A labelled distribution with fixed bucket boundaries (seconds)."""

    kind = "Histogram"

    def __init__(self, name, description, labels, boundaries: list[float]):
        super().__init__(name, description, labels, boundaries=boundaries)
        # a count and a sum per label set, never the values: the decode worker observes once
        # per output token, for the replica's whole life
        self._count: _Tally = _Tally()
        self._sum: defaultdict[tuple[str, ...], float] = defaultdict(float)

    def observe(self, value: float, **tags: str) -> None:
        key = self._key(tags)
        self._count[key] += 1
        self._sum[key] += value
        if (exporter := self._exporter()) is not None:
            exporter.observe(value, tags=tags)

    def count(self, **tags: str) -> int:
        return self._count[self._key(tags)]

    def sum(self, **tags: str) -> float:
        return self._sum.get(self._key(tags), 0.0)


# (the Helm chart's alert rules read them: helm/small4/templates/_helpers.tpl)
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 2.5, 4, 5, 10, 30, 60, 120]


# how often a process publishes its gauges again: Ray's metrics agent drops a gauge that is not
# set within about 20 s, and a count that stays put (a stalled queue) is not set by its changes
GAUGE_REPUBLISH_S = 2.0


def slo_bucket(seconds: float) -> float:
    """The latency bucket bound at or above `seconds`: what the TTFT burn alerts (and the
    ingress, counting the requests they add) take as within an SLO of `seconds`."""
    return next((b for b in LATENCY_BUCKETS if b >= seconds), seconds)


ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2]
ROLE = ("pool", "role")

# a whole answer runs up to the longest request timeout (limits.max_request_timeout_s, 1 h):
# a deep-pool answer of a few thousand tokens passes 120 s, where the TTFT buckets stop
E2E_BUCKETS = LATENCY_BUCKETS + [300, 600, 1200, 1800, 3600]

TTFT = Histogram("small4_ttft_seconds", "time to first token, as seen by each role", ROLE,
                 LATENCY_BUCKETS)
ITL = Histogram("small4_itl_seconds", "time between output tokens", ROLE, ITL_BUCKETS)
E2E = Histogram("small4_e2e_seconds", "request latency, arrival to last byte", ROLE,
                E2E_BUCKETS)
QUEUE_DEPTH = Gauge("small4_queue_depth", "requests waiting in an engine", ROLE)
RUNNING = Gauge("small4_running_requests", "requests running in an engine", ROLE)
KV_USED = Gauge("small4_kv_tokens_used", "KV cache tokens held", ROLE)
KV_CAPACITY = Gauge("small4_kv_tokens_capacity", "KV cache token capacity", ROLE)
PROMPT_TOKENS = Counter("small4_prompt_tokens_total", "prompt tokens served", ("pool",))
COMPLETION_TOKENS = Counter("small4_completion_tokens_total", "completion tokens served",
                            ("pool",))
REASONING_TOKENS = Counter("small4_reasoning_tokens_total", "reasoning tokens served", ("pool",))
SPILLOVER = Counter("small4_spillover_total", "requests served by another pool than their "
                    "effort's", ("from_pool", "to_pool"))
ERRORS = Counter("small4_errors_total", "failed requests by error type", ("pool", "role", "type"))
REQUESTS = TenantCounter("small4_requests_total", "requests answered at the ingress, by tenant and "
                   "HTTP status", ("tenant", "pool", "status"))
TTFT_MISSED = Counter("small4_ttft_missed_total", "requests routed to a pool that ended without "
                      "a first token after waiting longer than the pool's TTFT SLO (timed out, "
                      "failed, or their client left): the TTFT burn alerts count them as misses",
                      ("pool",))
FIRST_TOKEN_OVERDUE = Gauge("small4_first_token_overdue", "requests in flight at this ingress "
                            "replica that a pool is serving, past the pool's TTFT SLO with no "
                            "first token yet (a stalled pool shows here before they end)",
                            ("pool",))
CLIENT_DEADLINES = Counter("small4_client_deadlines_total", "requests answered 504 at the "
                           "deadline their client set (x-request-timeout): counted in "
                           "small4_requests_total, left out of the error-rate alerts", ("pool",))
TENANT_TOKENS = TenantCounter("small4_tenant_tokens_total", "prompt and completion tokens by tenant",
                        ("tenant", "kind"))
RESUMES = Counter("small4_decode_resumes_total", "streams resumed on another decode replica",
                  ("pool",))
REPLICA = ("pool", "role", "replica")
CACHE_LOOKUP_TOKENS = Gauge("small4_prefix_cache_lookup_tokens", "prompt tokens looked up in "
                            "the prefix cache since the engine started", REPLICA)
CACHE_HIT_TOKENS = Gauge("small4_prefix_cache_hit_tokens", "prompt tokens served from the "
                         "prefix cache since the engine started (hit rate: divide by lookup tokens)",
                         REPLICA)
CACHE_TOKENS = Gauge("small4_prefix_cache_tokens", "prompt KV tokens the prefix cache holds",
                     REPLICA)
EDGE_ANSWERS = Counter("small4_edge_answers_total", "answers the HTTP edge (Serve's proxy, or "
                       "an ingress replica's own server) wrote itself, not the ingress (its "
                       "request metrics do not see them): 401 without a valid key, 413, 431, "
                       "408, 503 for a full queue or body budget, 500 when the ingress died "
                       "before answering, and the error event (503 stream_interrupted) ending a "
                       "stream it cut", ("status", "code"))
PREFILL_RETRIES = Counter("small4_prefill_retries_total", "prefills retried on another "
                          "replica", ("pool",))


def record_engine(stats, pool: str, replica: str = "") -> None:
    """Publish an engine's load gauges (`EngineStats`), and its prefix cache's per replica."""
    tags = {"pool": pool, "role": stats.role}
    QUEUE_DEPTH.set(stats.waiting, **tags)
    RUNNING.set(stats.running, **tags)
    KV_USED.set(stats.kv_tokens, **tags)
    KV_CAPACITY.set(stats.kv_capacity, **tags)
    if stats.cache_lookup_tokens:
        mine = tags | {"replica": replica or "-"}
        CACHE_LOOKUP_TOKENS.set(stats.cache_lookup_tokens, **mine)
        CACHE_HIT_TOKENS.set(stats.cache_hit_tokens, **mine)
        CACHE_TOKENS.set(stats.cache_tokens, **mine)
