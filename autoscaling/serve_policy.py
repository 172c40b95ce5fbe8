"""The adapter to Ray Serve 2.60's custom autoscaling policy: our policies, under Serve.

Each autoscaled prefill or decode deployment gets `AutoscalingConfig(policy=AutoscalingPolicy(
policy_function="autoscaling.serve_policy:ServePolicy", policy_kwargs=...))`. Serve makes one
`ServePolicy` per deployment in its controller and calls it every control-loop tick with an
`AutoscalingContext`. The policy:

1. turns the replicas' reports (`record_autoscaling_stats` of the workers, a
   `services.workers.load.LoadWindow` each, averaged by Serve over `look_back_period_s`) into
   the role's `RoleMetrics`: counts and rates summed, capacities per replica, worst p90;
2. runs the pure prefill or decode policy (`autoscaling.policy`) with its own state;
3. posts the wish on the application's board (`autoscaling.board`), where one arbiter run fits
   every role's wish into the GPU budget with the overrides ops pinned (`autoscaling.control`),
   and returns this deployment's share;
4. publishes what it saw and decided for `small4 status`.

Serve applies the count; a replica that goes drains (Serve stops routing to it and waits up to
`graceful_shutdown_timeout_s`, the role's `drain_deadline_s`, for its requests to finish).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from autoscaling import board, control
from autoscaling.arbiter import ArbiterSettings
from autoscaling.metrics import RoleMetrics, Wish
from autoscaling.perf import PerfModel
from autoscaling.policy import (PolicySettings, PolicyState, SharedPolicySettings, decode_wish,
                                prefill_wish)

POLICY_PATH = "autoscaling.serve_policy:ServePolicy"
SUMMED = ("queued_requests", "running_requests", "kv_tokens_used", "arrival_requests_per_s",
          "arrival_prompt_tokens_per_s", "generated_tokens_per_s", "slo_met", "slo_total")
PER_REPLICA = ("max_running_per_replica", "kv_capacity_per_replica")
# a replica's mean over its own few requests, pooled weighted by them (the simulator keeps one
# window per role, which is that pooled mean): the largest of 8 replicas' means of a handful of
# answers each read 1.3-1.7x high, and a replica with none reports 0, which is not a mean.
# A prefill rate is pooled by the busy seconds behind it (the role's tokens over its busy time):
# the largest replica's, from a few big batches, read the role's capacity high and its wish low
POOLED = {"decode_residency_s": "slo_total",  # decode: one per request that left in the window
          "mean_output_tokens": "finished_outputs",
          "arriving_output_tokens": "arriving_streams",
          "prefill_tokens_per_s": "prefill_busy_s"}
WORST = ("latency_p90_s", "queue_wait_p90_s")
_log = logging.getLogger("small4.autoscaling")
FAILURE_LOG_S = 60.0  # a policy that keeps failing logs it once a minute
PUBLISH_S = 1.0  # status for `small4 status`, at most once a second per deployment
# a replica's report unchanged for this long is not read (replicas report every
# `autoscaling.report_interval_s`, 1 s by default; under load the stalest is a few seconds old)
STALE_REPORT_S = 15.0


class AutoscalingSettings(BaseModel):
    """Autoscaling of the prefill and decode roles whose `max_replicas` exceeds `min_replicas`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    budget_engines: int | None = Field(
        None, gt=0, description="engines all roles may hold together; default: what the "
        "topology holds when engines use GPUs, else the sum of the roles' max_replicas")
    look_back_period_s: float = Field(
        12.0, gt=10, description="how long Serve keeps reports; must exceed report_interval_s. "
        "The policy reads each replica's latest report; the workers already average rates "
        "over their own 10 s window")
    report_interval_s: float = Field(
        1.0, gt=0, le=10, description="how often each replica's load report reaches the "
        "policy (Serve's metrics_interval_s: Ray 2.60 pushes replica reports on it, 10 s by "
        "default, and does not read the RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S "
        "that its deprecation names). The simulator's policy reads a report a second old")
    decode_tokens_per_s_per_replica: float = Field(
        0.0, ge=0, description="profiled decode throughput at full batch; 0 = unknown")
    decode_capacity: Literal["profiled", "perf_model"] = Field(
        "profiled", description="an engine's full-batch decode tokens/s as the decode policy "
        "reads it: profiled, decode_tokens_per_s_per_replica; perf_model, the performance "
        "model of autoscaling/perf.py (SGLang on H200s, the profile's tensor parallelism and "
        "batch) at the role's current mean context, as the simulator reads it (an engine "
        "decoding 64K contexts makes ~3.2k tok/s where one at 4K makes ~5.3k)")
    # (a role's SLOs and bounds are its own and its pool's, not settable here)
    policy: SharedPolicySettings = SharedPolicySettings()
    arbiter: ArbiterSettings = ArbiterSettings()

    def serve_config(self, *, pool: str, role: str, replicas: int, lowest: int, highest: int,
                     ttft_slo_s: float, itl_slo_s: float, budget_engines: int,
                     priorities: dict[str, int], roles: dict[str, list[int]],
                     fixed: dict[str, int], perf: PerfModel | None = None) -> dict[str, Any]:
        """Serve's `autoscaling_config` for one role running `ServePolicy`: its bounds, and
        the policy's constructor arguments (`roles`: every autoscaled "pool/role" →
        [replicas, min, max]; `fixed`: the others → replicas; `perf`: the profile's engines'
        performance model, which `decode_capacity: perf_model` needs)."""
        decode_perf = None
        if role == "decode" and self.decode_capacity == "perf_model":
            if perf is None:
                raise ValueError("autoscaling.decode_capacity perf_model needs the engines' "
                                 "performance model")
            decode_perf = perf.model_dump()
        policy = PolicySettings(**self.policy.model_dump(), ttft_slo_s=ttft_slo_s,
                                itl_slo_s=itl_slo_s, min_replicas=lowest, max_replicas=highest)
        return {
            "min_replicas": lowest, "max_replicas": highest, "initial_replicas": replicas,
            "look_back_period_s": self.look_back_period_s,
            "metrics_interval_s": self.report_interval_s,
            # Serve wraps a custom policy in its own delays (30 s up, 600 s down by default);
            # ours already holds a wish for upscale_delay_s/downscale_delay_s before acting.
            "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
            "policy": {"policy_function": POLICY_PATH, "policy_kwargs": {
                "pool": pool, "role": role, "budget_engines": budget_engines,
                "priorities": priorities, "policy": policy.model_dump(),
                "arbiter": self.arbiter.model_dump(), "roles": roles, "fixed": fixed,
                "decode_tokens_per_s_per_replica": self.decode_tokens_per_s_per_replica,
                "decode_perf": decode_perf, "report_interval_s": self.report_interval_s}}}


def role_metrics(aggregated: dict[str, dict[Any, float]], role: str, replicas: int,
                 starting: int, profiled_tokens_per_s: float = 0.0,
                 silent: int | None = None) -> RoleMetrics:
    """A role's metrics from Serve's per-replica aggregates of the workers' reports.
    `silent`: the running replicas whose report is missing though they had reported before
    (default: every running replica without a report)."""
    def values(name: str) -> list[float]:
        return list((aggregated.get(name) or {}).values())

    # a replica whose report is missing (its stats call failed or timed out, and Serve let
    # the last one expire) is not idle: the role's totals count it as the reporters' mean.
    # One that never reported (just started: its first report comes within a push
    # interval) has no load yet: counted at the mean, a scale-up doubled what it saw
    reported = len(values("running_requests"))
    silent = replicas - reported if silent is None else silent
    scale = (reported + silent) / reported if reported and silent > 0 else 1.0
    summed = {k: sum(values(k)) * scale for k in SUMMED}
    per_replica = {k: max(values(k), default=0.0) for k in PER_REPLICA}
    pooled = {k: _pooled(aggregated, k, n) for k, n in POOLED.items()}
    worst = {k: max(values(k), default=None) for k in WORST}
    arrivals = summed["arrival_requests_per_s"]
    mean_prompt = summed["arrival_prompt_tokens_per_s"] / arrivals if arrivals else 0.0
    latency = worst["latency_p90_s"]
    return RoleMetrics(
        replicas=replicas, starting=starting,
        queued_requests=int(summed["queued_requests"]),
        queued_prompt_tokens=int(summed["queued_requests"] * mean_prompt),
        arrival_requests_per_s=arrivals,
        arrival_prompt_tokens_per_s=summed["arrival_prompt_tokens_per_s"],
        prefill_tokens_per_s=pooled["prefill_tokens_per_s"],
        running_requests=int(summed["running_requests"]),
        max_running_per_replica=int(per_replica["max_running_per_replica"]),
        decode_residency_s=pooled["decode_residency_s"],
        generated_tokens_per_s=summed["generated_tokens_per_s"],
        mean_output_tokens=pooled["mean_output_tokens"],
        arriving_output_tokens=pooled["arriving_output_tokens"],
        decode_tokens_per_s_per_replica=profiled_tokens_per_s,
        kv_tokens_used=int(summed["kv_tokens_used"]),
        kv_capacity_per_replica=int(per_replica["kv_capacity_per_replica"]),
        itl_p90_s=latency if role == "decode" else None,
        ttft_p90_s=latency if role == "prefill" else None,
        queue_wait_p90_s=worst["queue_wait_p90_s"])


def _pooled(aggregated: dict[str, dict[Any, float]], name: str, weight: str) -> float:
    """The replicas' `name` weighted by their `weight` (0 when none has any). While a replica
    reports the figure without its weight (an older worker, in a rolling upgrade), the
    largest figure, as before the weights: counting it as one sample would let a single new
    replica outweigh old ones that each averaged hundreds."""
    values, weights = aggregated.get(name) or {}, aggregated.get(weight) or {}
    if any(v > 0 and r not in weights for r, v in values.items()):
        return max(values.values())
    counted = {r: weights[r] for r in values if weights.get(r, 0) > 0}
    total = sum(counted.values())
    return sum(values[r] * n for r, n in counted.items()) / total if total else 0.0


def report_age_s(ctx, now: float) -> float | None:
    """How old the stalest running replica's latest report is (None before any report)."""
    running, stamps = set(ctx.running_replicas), []
    for replica, series in ((ctx.raw_metrics or {}).get("running_requests") or {}).items():
        if replica in running and series:
            stamps.append(series[-1].timestamp)
    return max(now - min(stamps), 0.0) if stamps else None


def latest_reports(ctx, stale: set[Any] = frozenset()) -> dict[str, dict[Any, float]]:
    """Each running replica's latest report (`raw_metrics`), else Serve's window average; none
    of the `stale` replicas (`ReportClock`)."""
    fresh = set(ctx.running_replicas) - set(stale)
    out = {name: {r: v for r, v in per.items() if r in fresh}
           for name, per in (ctx.aggregated_metrics or {}).items()}
    for name, per in (ctx.raw_metrics or {}).items():
        for replica, series in per.items():
            if replica in fresh and series:
                out.setdefault(name, {})[replica] = series[-1].value
    return out


class ReportClock:
    """Which replicas' reports stopped coming. Serve keeps a replica's last report for as long
    as it runs: one whose event loop is stuck would feed the policy the same figures for ever.
    A replica whose latest report has not changed for `stale_s` of this process's time is
    stale (left out, it counts as silent, at the reporters' mean). Its stamps are the
    replica's own clock, so they are compared with each other, never with this one's. Read
    from a figure only our report carries (Serve records its own `running_requests` for a
    replica whose report call failed)."""

    KEY = "max_running_per_replica"

    def __init__(self, stale_s: float = STALE_REPORT_S):
        self.stale_s = stale_s
        self.seen: dict[Any, tuple[float, float]] = {}  # replica -> (its stamp, when it came)

    def stale(self, ctx, now: float) -> set[Any]:
        running = set(ctx.running_replicas)
        per = (ctx.raw_metrics or {}).get(self.KEY) or {}
        for replica, series in per.items():
            if replica in running and series:
                stamp = series[-1].timestamp
                if self.seen.get(replica, (None, 0.0))[0] != stamp:
                    self.seen[replica] = (stamp, now)
        self.seen = {r: v for r, v in self.seen.items() if r in running}
        return {r for r, (_, at) in self.seen.items() if now - at > self.stale_s}


class ServePolicy:
    """One deployment's policy; Serve builds it once with `policy_kwargs` and calls it per tick.

    `roles` lists every autoscaled role of the application as "pool/role" → [replicas, min,
    max], `fixed` the roles that do not scale → replicas; both count against the budget.
    """

    def __init__(self, pool: str, role: str, budget_engines: int, priorities: dict[str, int],
                 policy: dict[str, Any], arbiter: dict[str, Any],
                 roles: dict[str, list[int]], fixed: dict[str, int] | None = None,
                 decode_tokens_per_s_per_replica: float = 0.0, report_interval_s: float = 1.0,
                 decode_perf: dict[str, Any] | None = None):
        self.key = (pool, role)
        self.settings = PolicySettings(**policy)
        self.budget, self.priorities = budget_engines, dict(priorities)
        self.arbiter = ArbiterSettings(**arbiter)
        self.roles = {_split(k): tuple(v) for k, v in roles.items()}
        self.fixed = {_split(k): n for k, n in (fixed or {}).items()}
        self.profiled = decode_tokens_per_s_per_replica
        self.perf = PerfModel(**decode_perf) if decode_perf and role == "decode" else None
        self.wish = prefill_wish if role == "prefill" else decode_wish
        self.state: PolicyState | None = None
        self.published = 0.0
        self.reporters: set[Any] = set()  # running replicas that have reported
        # (a report may come a push late when Ray skips one still in flight)
        self.failure_logged = float("-inf")
        self.clock = ReportClock(max(STALE_REPORT_S, 3 * report_interval_s))

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        """The deployment's replicas now. A failure here holds the count (pinned on the board)
        and is logged: raised, it would abort Serve's update of every application's state for
        this control loop, and for every loop after it while it lasts."""
        try:
            return self._decide(ctx)
        except Exception as exc:
            now = time.monotonic()
            if now - self.failure_logged >= FAILURE_LOG_S:  # not every control loop
                self.failure_logged = now
                _log.exception("autoscaling policy of %s/%s failed; holding %d replicas",
                               *self.key, ctx.target_num_replicas)
            self._board(ctx).hold(self.key, ctx.target_num_replicas)
            return ctx.target_num_replicas, {"held": f"{type(exc).__name__}: {exc}"}

    def _board(self, ctx) -> board.Board:
        """The application's board, shared by its deployments' policies."""
        return board.board_for(ctx.app_name or "", self.budget, self.priorities, self.arbiter)

    def _decide(self, ctx) -> tuple[int, dict[str, Any]]:
        now = ctx.current_time or time.time()
        running = len(ctx.running_replicas)
        reports = latest_reports(ctx, self.clock.stale(ctx, now))
        if ctx.target_num_replicas and not reports.get("running_requests"):
            # no replica's report arrived (stats calls failing, event loops blocked, or every
            # replica still loading its model): no load known is not no load; hold the count,
            # pinned there on the board (its engines are not handed out meanwhile)
            self._board(ctx).hold(self.key, ctx.target_num_replicas)
            return ctx.target_num_replicas, {"held": "no reports"}
        now_reporting = set(reports.get("running_requests") or ())
        self.reporters = (self.reporters & set(ctx.running_replicas)) | now_reporting
        metrics = role_metrics(reports, self.key[1], running,
                               max(ctx.target_num_replicas - running, 0), self.profiled,
                               silent=len(self.reporters - now_reporting))
        if self.perf is not None:  # at the context the role decodes now, as the simulator
            context = (metrics.kv_tokens_used / metrics.running_requests
                       if metrics.running_requests else None)
            capacity = self.perf.decode_tokens_per_s(context)
            metrics = replace(metrics, decode_tokens_per_s_per_replica=capacity)
        state = self.state or PolicyState(ctx.target_num_replicas)
        wish, self.state = self.wish(metrics, self.settings, state, now)
        app = ctx.app_name or ""
        shared = self._board(ctx)
        shared.seed(self.roles, now)
        decision = shared.decide(self.key, wish, ctx.target_num_replicas, now,
                                 lambda: _overrides(app), self.fixed)
        if now - self.published >= PUBLISH_S:
            self.published = now
            _publish(app, self.key, metrics, reports, wish, decision, shared, self.settings,
                     ctx.target_num_replicas, sum(self.fixed.values()), report_age_s(ctx, now))
        return decision, {"wish": wish.replicas, "decision": decision}


def _split(name: str) -> tuple[str, str]:
    pool, _, role = name.partition("/")
    return pool, role


_LAST_OVERRIDES: dict[str, dict] = {}


def _overrides(app: str) -> dict:
    """The pins ops set; while the KV store cannot be read, the last ones read (dropping
    them for one failed read would move engines away and back: two drains, two cold starts)."""
    try:
        _LAST_OVERRIDES[app] = control.read_overrides(app)
    except Exception:
        pass
    return _LAST_OVERRIDES.get(app, {})


def _publish(app: str, key, m: RoleMetrics, reports: dict, wish: Wish, decision: int, shared,
             s, target: int, fixed: int, age: float | None = None) -> None:
    met = sum((reports.get("slo_met") or {}).values())
    total = sum((reports.get("slo_total") or {}).values())
    latency = m.itl_p90_s if key[1] == "decode" else m.ttft_p90_s
    status = {
        "replicas": m.replicas, "target": target, "decision": decision,
        "wish": wish.replicas, "load_engines": round(wish.load, 3),
        "min": wish.min_replicas, "max": wish.max_replicas, "budget": shared.budget,
        "fixed_engines": fixed,  # held by the roles that do not scale, within the budget
        "queued": m.queued_requests, "running": m.running_requests,
        "kv_used": m.kv_tokens_used,
        "kv_capacity": m.kv_capacity_per_replica * max(m.replicas, 1),
        "latency_p90_s": latency,
        "slo_s": s.itl_slo_s if key[1] == "decode" else s.ttft_slo_s,
        "slo_attainment": met / total if total else None,
        "override": shared.applied_overrides.get(key), "error": shared.error,
        "report_age_s": None if age is None else round(age, 2),  # the stalest replica's
        "at": time.time()}
    try:
        control.publish_status(app, key, status)
    except Exception:
        pass
