"""The dashboard and alert rules the chart ships only name metrics the stack exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import promql_parser
import yaml

from services.telemetry import metrics
from tests.promql import evaluate, fires

FILES = Path(__file__).resolve().parents[2] / "helm" / "small4" / "files"
SUFFIXES = {"Histogram": ("_bucket", "_count", "_sum"), "Counter": ("",), "Gauge": ("",)}


def exported_names() -> set[str]:
    """Prometheus names of every metric the stack defines (Ray prefixes `ray_`)."""
    names = set()
    for value in vars(metrics).values():
        if isinstance(value, metrics._Metric):
            names |= {f"ray_{value.name}{s}" for s in SUFFIXES[value.kind]}
    return names


def referenced(text: str) -> set[str]:
    return set(re.findall(r"\bray_small4_\w+", text))


def test_dashboard_is_grafana_json_naming_only_exported_metrics():
    dashboard = json.loads((FILES / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = referenced(" ".join(exprs))
    assert names and names <= exported_names(), names - exported_names()
    assert {"ray_small4_ttft_seconds_bucket", "ray_small4_itl_seconds_bucket",
            "ray_small4_queue_depth", "ray_small4_kv_tokens_used",
            "ray_small4_errors_total", "ray_small4_spillover_total"} <= names
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for expr in exprs:  # Prometheus's grammar reads each, Grafana's variables filled in
        promql_parser.parse(expr.replace("$__rate_interval", "5m").replace("$pool", ".*"))


def test_alert_rules_cover_queue_growth_and_errors():
    """(The TTFT burn rates are written per pool by the chart: tests/helm.)"""
    rules = yaml.safe_load((FILES / "alert-rules.yaml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert {"Small4QueueGrowing", "Small4ErrorRateHigh"} <= set(alerts)
    names = referenced(" ".join(r["expr"] for r in alerts.values()))
    assert names <= exported_names(), names - exported_names()
    assert all(r["labels"]["severity"] in {"page", "ticket"} for r in alerts.values())


def test_error_rules_count_every_request_refusals_before_routing_included():
    """A request shed before routing (503, pool "none") never reaches the latency histograms:
    the error rates are over `small4_requests_total`, which counts every outcome, and the
    overall rule keeps pool "none" in (no grouping by pool); the 504s at a client's own deadline
    are taken out of the failures."""
    rules = yaml.safe_load((FILES / "alert-rules.yaml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    overall, per_pool = alerts["Small4ErrorRateHigh"]["expr"], alerts["Small4PoolErrorRateHigh"][
        "expr"]
    for expr in (overall, per_pool):
        assert referenced(expr) == {"ray_small4_requests_total",
                                    "ray_small4_client_deadlines_total"}, expr
        assert 'status=~"5.."' in expr
    assert "by (" not in overall and 'pool!="none"' in per_pool


def requests(pool: str, status: str, rate: float) -> tuple:
    return "ray_small4_requests_total", {"tenant": "all", "pool": pool, "status": status}, rate


def client_deadlines(pool: str, rate: float) -> tuple:
    return "ray_small4_client_deadlines_total", {"pool": pool}, rate


def test_error_rate_alerts_page_on_the_stacks_failures_not_on_a_clients_deadline():
    """Evaluated, not read: one client setting a short x-request-timeout makes 504s that are
    its deadline's, and must not page; the same 504s at the stack's own deadline, or 500s, do,
    also before any client deadline was ever counted (the counter has no series then, and
    subtracting an empty vector would empty the whole rule); per pool, one pool's client
    deadlines neither hide another's failures nor drop that pool from the rule."""
    rules = yaml.safe_load((FILES / "alert-rules.yaml").read_text())
    alerts = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    overall, per_pool = alerts["Small4ErrorRateHigh"], alerts["Small4PoolErrorRateHigh"]
    served = [requests("fast", "200", 90.0), requests("deep", "200", 47.0)]
    theirs = served + [requests("fast", "504", 10.0), client_deadlines("fast", 10.0)]
    assert not fires(overall, theirs) and not fires(per_pool, theirs)
    ours = served + [requests("fast", "504", 10.0)]
    assert fires(overall, ours) and fires(per_pool, ours)
    failing = served + [requests("deep", "500", 3.0)]
    assert fires(overall, failing)
    assert set(evaluate(per_pool, failing)) == {frozenset({("pool", "deep")})}
    both = theirs + [requests("deep", "500", 3.0)]
    assert set(evaluate(per_pool, both)) == {frozenset({("pool", "deep")})}
    assert not fires(overall, both)  # 3 of 150 (2 %) failed, the 504s being the client's
    shed = served + [requests("none", "503", 5.0)]  # refused before routing
    assert fires(overall, shed) and not fires(per_pool, shed)


def test_a_pool_that_sends_no_first_token_pages_before_its_requests_end():
    """A stalled pool's requests reach the burn and error alerts only at their deadlines;
    the stall alert reads the requests waiting past their SLO now, unless the pool still
    sends first tokens (a busy pool's slow tail is the burn alerts' to judge)."""
    rules = yaml.safe_load((FILES / "alert-rules.yaml").read_text())
    expr = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}["Small4PoolStalled"][
        "expr"]

    def overdue(pool: str, n: float) -> tuple:
        return "ray_small4_first_token_overdue", {"pool": pool, "replica": "a"}, n

    def first_tokens(pool: str, rate: float) -> tuple:
        return "ray_small4_ttft_seconds_count", {"pool": pool, "role": "ingress"}, rate

    stalled = [overdue("deep", 3), first_tokens("fast", 20.0)]  # deep never answered
    assert set(evaluate(expr, stalled)) == {frozenset({("pool", "deep")})}
    stopped = stalled + [first_tokens("deep", 0.0)]  # deep answered once, then stopped
    assert set(evaluate(expr, stopped)) == {frozenset({("pool", "deep")})}
    busy = [overdue("deep", 3), first_tokens("deep", 4.0)]
    assert not fires(expr, busy)
    assert not fires(expr, [overdue("deep", 0), first_tokens("deep", 0.0)])


def test_the_readme_names_every_metric_the_stack_exports():
    readme = (FILES.parents[2] / "README.md").read_text()
    names = {v.name for v in vars(metrics).values() if isinstance(v, metrics._Metric)}
    spelled = set(re.findall(r"small4_\w+", readme)) | {
        f"small4_{kind}_tokens_total" for kind in ("prompt", "completion", "reasoning")} | {
        f"small4_prefix_cache_{kind}_tokens" for kind in ("lookup", "hit")}
    assert names <= spelled, names - spelled


def test_the_latency_histogram_reaches_the_longest_request_a_client_may_ask_for():
    """The dashboard's E2E quantiles read `small4_e2e_seconds`: a top bucket below the longest
    request would pin every long answer's p90 at it."""
    from services.settings import LimitSettings

    buckets = metrics.E2E.options["boundaries"]  # what Ray's exporter is built with
    assert buckets[-1] >= LimitSettings().max_request_timeout_s
    assert buckets == sorted(set(buckets))
