"""The Serve adapter of the autoscaling policies, on Ray Serve's real `AutoscalingContext`, and
the workers' load window: reports → role metrics → policy → board → replicas within budget."""

from __future__ import annotations

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
from ray.serve.config import AutoscalingContext

from autoscaling import board as board_module
from autoscaling.arbiter import ArbiterSettings
from autoscaling.board import SEED_WAIT_S, Board
from autoscaling.metrics import Wish
from autoscaling.serve_policy import ServePolicy, latest_reports, role_metrics
from cluster.settings import parse_settings
from services.engines.protocol import EngineStats
from services.workers.load import LoadWindow

QUICK_POLICY = {"upscale_delay_s": 1, "downscale_delay_s": 5, "load_rise_s": 0,
                "load_fall_s": 0, "min_replicas": 1, "max_replicas": 4, "burst_memory_s": 0}
QUICK_ARBITER = ArbiterSettings(settle_s=0, cooldown_s=0, preempt_settle_s=0, spare="release")


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_load_window_rates_expire_with_the_window():
    clock = Clock()
    window = LoadWindow(slo_s=0.05, window_s=10, clock=clock)
    for _ in range(20):
        window.arrived(prompt_tokens=100)
    window.generated(10, 0.02)
    window.decoded(output_tokens=10, residency_s=0.2, wait_s=0.1)  # 20 ms/token: met
    window.decoded(output_tokens=10, residency_s=2.0, wait_s=0.1)  # 200 ms/token: missed
    stats = EngineStats("simulated", "decode", running=3, waiting=2, kv_tokens=500,
                        kv_capacity=4000)
    report = window.report(stats, max_running=8)
    assert report["arrival_requests_per_s"] == pytest.approx(2.0)
    assert report["arrival_prompt_tokens_per_s"] == pytest.approx(200.0)
    assert report["decode_residency_s"] == pytest.approx(1.1)
    assert (report["slo_met"], report["slo_total"]) == (1, 2)
    assert report["latency_p90_s"] == pytest.approx(0.02)
    assert (report["running_requests"], report["queued_requests"]) == (3, 2)
    clock.t += 11  # the window has moved past every event; lifetime means remain
    later = window.report(stats, max_running=8)
    assert later["arrival_requests_per_s"] == 0 and later["slo_total"] == 0
    assert "latency_p90_s" not in later and later["mean_output_tokens"] == 10
    assert later["arriving_output_tokens"] == 10  # no stream followed: what finished


def test_the_expected_output_is_pooled_over_replicas_by_their_streams():
    a, b, c, old = replica("a"), replica("b"), replica("c"), replica("old")
    aggregated = {"running_requests": {a: 10, b: 10, c: 0, old: 5},
                  "arriving_output_tokens": {a: 100.0, b: 1000.0, c: 4000.0},
                  "arriving_streams": {a: 30, b: 10, c: 0},  # c: its finished mean, no streams
                  "mean_output_tokens": {a: 900.0, b: 1000.0, c: 4000.0, old: 700.0}}
    m = role_metrics(aggregated, "decode", replicas=4, starting=0)
    assert m.arriving_output_tokens == pytest.approx((30 * 100 + 10 * 1000) / 40)
    none = role_metrics({"running_requests": {old: 5}, "mean_output_tokens": {old: 700.0}},
                        "decode", replicas=1, starting=0)
    assert none.arriving_output_tokens == 0.0  # workers that do not report it: the policy's
    assert none.mean_output_tokens == 700.0    # fallback, the finished mean


def test_means_of_few_requests_are_pooled_over_replicas_by_their_requests():
    """Each replica's mean output and residency cover its own few requests: the largest of
    them read high at 8 replicas, a replica with no finished request reports 0 (not a mean).
    Pooled by their counts, they are the mean over every request, as the simulator's one
    window per role computes it; while an older worker reports a mean without its count, the
    largest mean stands, as before."""
    a, b, idle, old = replica("a"), replica("b"), replica("idle"), replica("old")
    aggregated = {"running_requests": {a: 10, b: 10, idle: 0, old: 4},
                  "mean_output_tokens": {a: 900.0, b: 3000.0, idle: 0.0, old: 600.0},
                  "finished_outputs": {a: 90, b: 10, idle: 0},
                  "decode_residency_s": {a: 20.0, b: 60.0, idle: 0.0, old: 0.0},
                  "slo_total": {a: 9, b: 1, idle: 0, old: 0}}
    m = role_metrics(aggregated, "decode", replicas=4, starting=0)
    assert m.mean_output_tokens == 3000.0  # `old` reports no count: the largest
    assert m.decode_residency_s == pytest.approx((9 * 20 + 60) / 10)
    upgraded = aggregated | {"finished_outputs": {a: 90, b: 10, idle: 0, old: 100}}
    assert role_metrics(upgraded, "decode", replicas=4, starting=0).mean_output_tokens == \
        pytest.approx((90 * 900 + 10 * 3000 + 100 * 600) / 200)
    assert role_metrics({"running_requests": {idle: 0}}, "decode", replicas=1,
                        starting=0).decode_residency_s == 0.0


def test_a_prefill_rate_is_pooled_over_replicas_by_their_busy_time():
    """Each prefill replica measures tokens per busy second over its window: one that ran a
    few large batches reads high. The role's rate is its tokens over its busy time (what the
    simulator's one window per role computes), not the largest replica's, which read capacity
    high and asked for too few prefill engines; an older worker without the weight keeps the
    largest, as before."""
    a, b, idle = replica("a"), replica("b"), replica("idle")
    aggregated = {"running_requests": {a: 1, b: 1, idle: 0},
                  "prefill_tokens_per_s": {a: 60_000.0, b: 30_000.0, idle: 0.0},
                  "prefill_busy_s": {a: 0.5, b: 8.0, idle: 0.0}}
    m = role_metrics(aggregated, "prefill", replicas=3, starting=0)
    assert m.prefill_tokens_per_s == pytest.approx((0.5 * 60_000 + 8 * 30_000) / 8.5)
    older = aggregated | {"prefill_busy_s": {b: 8.0}}
    assert role_metrics(older, "prefill", replicas=3, starting=0).prefill_tokens_per_s == 60_000


def test_the_window_reports_the_busy_time_behind_its_prefill_rate():
    clock = Clock()
    w = LoadWindow(slo_s=1.0, clock=clock)
    w.prefilled(8_000, 0.2, 0.0, 0.3, engine="e")
    clock.t += 1
    w.prefilled(8_000, 0.2, 0.0, 0.3, engine="e")
    report = w.snapshot()
    assert report.prefill_busy_s == pytest.approx(0.4)
    assert report.prefill_tokens_per_s == pytest.approx(16_000 / 0.4)


def replica(name: str) -> ReplicaID:
    return ReplicaID(name, DeploymentID("fast-decode", "app"))


def context(reports: dict[ReplicaID, dict[str, float]], target: int, now: float,
            state=None, app: str = "app") -> AutoscalingContext:
    raw = {}
    for rid, report in reports.items():
        for name, value in report.items():
            raw.setdefault(name, {})[rid] = [TimeStampedValue(now - 5, 0.0),
                                             TimeStampedValue(now, value)]
    return AutoscalingContext(
        deployment_id=DeploymentID("fast-decode", app), deployment_name="fast-decode",
        app_name=app, current_num_replicas=len(reports), target_num_replicas=target,
        running_replicas=list(reports), total_num_requests=0.0, total_queued_requests=0.0,
        aggregated_metrics={}, raw_metrics=raw, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=4, policy_state=state or {}, last_scale_up_time=None,
        last_scale_down_time=None, current_time=now, config=None)


def busy(running: int, queued: int) -> dict[str, float]:
    return {"running_requests": running, "queued_requests": queued,
            "max_running_per_replica": 4, "kv_tokens_used": 100 * running,
            "kv_capacity_per_replica": 10_000, "latency_p90_s": 0.04}


def test_role_metrics_sum_counts_and_keep_the_worst_latency():
    a, b = replica("a"), replica("b")
    reports = latest_reports(context({a: busy(4, 3) | {"latency_p90_s": 0.2},
                                      b: busy(2, 0)}, 2, 100.0))
    m = role_metrics(reports, "decode", replicas=2, starting=0)
    assert (m.running_requests, m.queued_requests, m.kv_tokens_used) == (6, 3, 600)
    assert m.max_running_per_replica == 4 and m.kv_capacity_per_replica == 10_000
    assert m.itl_p90_s == 0.2 and m.ttft_p90_s is None


def test_latest_reports_ignore_replicas_that_are_gone():
    a, gone = replica("a"), replica("gone")
    ctx = context({a: busy(1, 0), gone: busy(9, 9)}, 1, 100.0)
    ctx.running_replicas = [a]
    assert latest_reports(ctx)["running_requests"] == {a: 1}


def policy(budget: int = 6, fixed=None, app: str = "app") -> ServePolicy:
    return ServePolicy("fast", "decode", budget, {"fast": 1, "deep": 0}, QUICK_POLICY,
                       QUICK_ARBITER.model_dump(), roles={"fast/decode": [1, 1, 4]},
                       fixed=fixed or {"fast/prefill": 1, "deep/prefill": 1,
                                       "deep/decode": 1})


def test_policy_scales_up_after_its_delay_and_down_after_the_load_ends():
    board_module.BOARDS.clear()
    p, r = policy(app="up-down"), replica("a")
    n, _ = p(context({r: busy(4, 8)}, 1, 100.0, app="up-down"))
    assert n == 1  # the wish must hold for upscale_delay_s
    n, state = p(context({r: busy(4, 8)}, 1, 101.5, app="up-down"))
    # 12 requests / 4 slots / 0.85 → 4; the budget (6, 3 held by fixed roles) leaves 3
    assert n == 3 and state == {"wish": 4, "decision": 3}
    n, _ = p(context({r: busy(0, 0)}, 3, 102.0, app="up-down"))
    assert n == 3  # the downscale delay has not passed
    n, _ = p(context({r: busy(0, 0)}, 3, 108.0, app="up-down"))
    assert n == 1


def test_fixed_roles_and_the_budget_cap_the_decision():
    board_module.BOARDS.clear()
    p, r = policy(budget=5, app="capped"), replica("a")
    p(context({r: busy(4, 12)}, 1, 100.0, app="capped"))
    n, _ = p(context({r: busy(4, 12)}, 1, 102.0, app="capped"))
    assert n == 2  # wishes 4, but 3 engines are fixed elsewhere in a budget of 5


def test_board_pins_an_override_and_refuses_one_that_does_not_fit():
    key = ("fast", "decode")
    shared = Board(budget=4, priorities={"fast": 1}, settings=QUICK_ARBITER)
    idle = Wish(1, 1, 3, load=0.1)
    fixed = {("fast", "prefill"): 1}
    assert shared.decide(key, idle, 1, 0.0, lambda: {key: 3}, fixed) == 3
    assert shared.applied_overrides == {key: 3}
    shared.computed_at = None
    assert shared.decide(key, idle, 3, 1.0, lambda: {}, fixed) == 1  # released
    shared.computed_at = None
    assert shared.decide(key, idle, 1, 2.0, lambda: {key: 9}, fixed) == 3  # clipped to max
    other = ("deep", "decode")  # silent past the board's wait: counts at its start, 2
    shared.seed({other: (2, 2, 2)}, 3.0)
    shared.computed_at = None
    assert shared.decide(key, idle, 1, 3.0 + SEED_WAIT_S, lambda: {key: 3}, fixed) == 1
    assert "overrides ignored" in shared.error


def test_a_new_board_hands_out_no_engine_before_every_role_said_where_it_stands():
    # a Serve controller restarted: its new board knows the roles' starting counts (1 each);
    # the fast decode role runs 6 replicas under load, the deep one 2
    fast, deep = ("fast", "decode"), ("deep", "decode")
    shared = Board(budget=8, priorities={"fast": 1, "deep": 0}, settings=QUICK_ARBITER)
    roles = {fast: (1, 1, 7), deep: (1, 1, 7)}
    shared.seed(roles, 0.0)
    assert shared.decide(deep, Wish(2, 1, 7, load=1.8), 2, 0.0, dict, {}) == 2  # waits
    shared.seed(roles, 0.1)
    assert shared.decide(fast, Wish(6, 1, 7, load=5.5), 6, 0.1, dict, {}) == 6
    assert shared.decide(deep, Wish(2, 1, 7, load=1.8), 2, 0.2, dict, {}) == 2
    # a role that falls silent (Serve skips the policy of a role at zero replicas) keeps
    # its count on the board: its engines are not handed to the others
    for t in range(1, 100):
        got = shared.decide(deep, Wish(7, 1, 7, load=7.0), 2 if t == 1 else got, float(t),
                            dict, {})
    assert shared.current[fast] == 6 and got <= 2


def test_a_role_whose_reports_are_missing_is_not_taken_for_idle():
    board_module.BOARDS.clear()
    p, a, b = policy(app="silent"), replica("a"), replica("b")
    ctx = context({a: busy(4, 8)}, 2, 100.0, app="silent")
    ctx.running_replicas = [a, b]  # b's report expired
    m = role_metrics(latest_reports(ctx), "decode", replicas=2, starting=0)
    assert (m.running_requests, m.queued_requests) == (8, 16)
    ctx = context({}, 3, 100.0, app="silent")
    ctx.running_replicas = [a, b]  # nobody's report arrived: the count holds
    assert p(ctx)[0] == 3
    # a replica just started, not yet reported, has no load; one that reported before and
    # fell silent is counted at the mean
    def wished(p, t):
        ctx = context({a: busy(2, 2)}, 2, t, app=p.app)
        ctx.running_replicas = [a, b]
        return p(ctx)[1]["wish"]

    fresh = policy(app="fresh")
    fresh.app = "fresh"
    assert [wished(fresh, t) for t in (100.0, 101.5)] == [2, 2]  # 4 requests / 4 slots
    knew = policy(app="knew")
    knew.app = "knew"
    knew(context({a: busy(2, 2), b: busy(2, 2)}, 2, 99.0, app="knew"))
    assert [wished(knew, t) for t in (100.0, 101.5)] == [3, 3]  # silent b counted as a's twin
    # every replica still loading its model (minutes on GPUs): not idle either
    loading = policy(app="loading")
    for t in range(0, 300, 10):
        decision, why = loading(context({}, 3, 100.0 + t, app="loading"))
        assert decision == 3 and why == {"held": "no reports"}
    assert not getattr(board_module.BOARDS.get("loading"), "wishes", None)  # no idle wish


def test_settings_wire_our_policy_into_the_scalable_roles_only():
    settings = parse_settings({
        "pools": {"fast": {"effort": "none", "priority": 2, "slo": {"itl_s": 0.03},
                           "decode": {"replicas": 1, "max_replicas": 3}},
                  "deep": {"effort": "high"}},
        "autoscaling": {"enabled": True}, "auth": {"enabled": False}})
    decode = settings.role_options("fast", "decode")
    assert "num_replicas" not in decode
    config = decode["autoscaling_config"]
    assert (config["min_replicas"], config["max_replicas"]) == (1, 3)
    assert (config["upscale_delay_s"], config["downscale_delay_s"]) == (0.0, 0.0)
    kwargs = config["policy"]["policy_kwargs"]
    assert kwargs["policy"]["itl_slo_s"] == 0.03 and kwargs["budget_engines"] == 6
    assert kwargs["fixed"] == {"fast/prefill": 1, "deep/prefill": 1, "deep/decode": 1}
    assert settings.role_options("fast", "prefill")["num_replicas"] == 1
    assert decode["graceful_shutdown_timeout_s"] == 60.0
    import warnings

    from ray.serve.config import AutoscalingConfig

    with warnings.catch_warnings():  # its look-back outlasts the report interval
        warnings.simplefilter("error", FutureWarning)
        accepted = AutoscalingConfig(**config)  # Serve accepts it
    # Ray 2.60's replicas push their reports to the policy every metrics_interval_s (10 s by
    # default; the environment variable its deprecation note names is not read): the policy
    # decided on reports up to 12 s old, where the simulator's are a second old
    assert accepted.metrics_interval_s == 1.0 < accepted.look_back_period_s
    # the policy reads a report as stale only well past the interval its replicas push on
    slow = parse_settings({"pools": settings.model_dump()["pools"], "auth": {"enabled": False},
                           "autoscaling": {"enabled": True, "report_interval_s": 10}})
    kwargs = slow.role_options("fast", "decode")["autoscaling_config"]["policy"]["policy_kwargs"]
    assert ServePolicy(**kwargs).clock.stale_s == 30 and ServePolicy(**(kwargs | {
        "report_interval_s": 1.0})).clock.stale_s == 15


def test_status_shows_how_old_the_stalest_report_is():
    from autoscaling.serve_policy import report_age_s

    fresh, stale, gone = replica("fresh"), replica("stale"), replica("gone")
    ctx = context({fresh: {"running_requests": 1}, stale: {"running_requests": 2}}, 2, 100.0)
    ctx.raw_metrics["running_requests"][stale][-1] = TimeStampedValue(93.0, 2)
    ctx.raw_metrics["running_requests"][gone] = [TimeStampedValue(10.0, 0)]  # not running
    assert report_age_s(ctx, 100.0) == pytest.approx(7.0)
    assert report_age_s(context({}, 1, 100.0), 100.0) is None


def test_a_scalable_role_cannot_start_from_zero():
    from cluster.settings import SettingsError

    with pytest.raises(SettingsError, match="pools.deep.decode.min_replicas"):
        parse_settings({"autoscaling": {"enabled": True}, "auth": {"enabled": False},
                        "pools": {"fast": {"effort": "none"},
                                  "deep": {"effort": "high", "decode": {
                                      "min_replicas": 0, "max_replicas": 2}}}})


def test_min_replicas_beyond_the_budget_are_refused():
    from cluster.settings import SettingsError

    with pytest.raises(SettingsError, match="budget"):
        parse_settings({"autoscaling": {"enabled": True, "budget_engines": 3},
                        "auth": {"enabled": False},
                        "pools": {"fast": {"effort": "none", "decode": {"min_replicas": 2,
                                                                        "replicas": 2,
                                                                        "max_replicas": 4}},
                                  "deep": {"effort": "high"}}})


def test_starting_replicas_beyond_the_budget_are_refused():
    """Serve starts every role at `replicas` (on each redeploy too): more engines than the
    budget would load for minutes and then be shed."""
    from cluster.settings import SettingsError

    profile = {"autoscaling": {"enabled": True, "budget_engines": 5},
               "auth": {"enabled": False},
               "pools": {"fast": {"effort": "none", "decode": {"min_replicas": 1, "replicas": 3,
                                                               "max_replicas": 4}},
                         "deep": {"effort": "high"}}}
    with pytest.raises(SettingsError, match="replicas add up to 6 engines at start"):
        parse_settings(profile)
    profile["pools"]["fast"]["decode"]["replicas"] = 2
    assert parse_settings(profile).budget_engines() == 5


@pytest.mark.parametrize("field", ["min_replicas", "max_replicas", "ttft_slo_s", "itl_slo_s"])
def test_a_roles_own_bounds_and_slos_are_refused_under_the_shared_policy(field):
    """Each role's policy takes its bounds from the role and its SLOs from the pool: the same
    names under `autoscaling.policy` were accepted and replaced without a word."""
    from cluster.settings import SettingsError

    with pytest.raises(SettingsError, match=f"autoscaling.policy.{field}"):
        parse_settings({"autoscaling": {"enabled": True, "policy": {field: 2}},
                        "auth": {"enabled": False}})
    shared = parse_settings({"autoscaling": {"enabled": True, "policy": {
        "upscale_delay_s": 3}}, "auth": {"enabled": False}})
    config = shared.autoscaling.serve_config(
        pool="fast", role="decode", replicas=1, lowest=1, highest=3, ttft_slo_s=2.0,
        itl_slo_s=0.1, budget_engines=4, priorities={}, roles={}, fixed={})
    policy = config["policy"]["policy_kwargs"]["policy"]
    assert policy["upscale_delay_s"] == 3
    assert (policy["min_replicas"], policy["max_replicas"]) == (1, 3)
    assert (policy["ttft_slo_s"], policy["itl_slo_s"]) == (2.0, 0.1)


def test_pins_survive_a_failed_read_and_old_status_is_flagged(monkeypatch):
    from autoscaling import control, serve_policy
    from cluster.cli import status_table

    monkeypatch.setattr(control, "read_overrides", lambda app: {("fast", "decode"): 3})
    assert serve_policy._overrides("pins") == {("fast", "decode"): 3}

    def unreachable(app):
        raise ConnectionError("GCS restarting")

    monkeypatch.setattr(control, "read_overrides", unreachable)
    assert serve_policy._overrides("pins") == {("fast", "decode"): 3}  # not dropped
    row = {"replicas": 2, "target": 2, "wish": 2, "queued": 0, "running": 1, "kv_used": 0,
           "kv_capacity": 100, "latency_p90_s": None, "slo_s": 0.05, "slo_attainment": None,
           "override": None, "min": 1, "max": 4, "budget": 6}
    rows = {("fast", "decode"): row | {"at": 1000.0}, ("fast", "prefill"): row | {"at": 960.0}}
    assert list(control.fresh(rows, now=1001.0)) == [("fast", "decode")]
    table = status_table(rows, now=1001.0)
    flagged = [line for line in table.splitlines() if "no report for" in line]
    assert len(flagged) == 1 and "41 s" in flagged[0]
    assert table.splitlines()[2].startswith("fast/prefill")  # flagged right under it
    assert table.splitlines().index(flagged[0]) == 3
    aged = status_table({("fast", "decode"): row | {"at": 1000.0, "report_age_s": 1.26}},
                        now=1001.0).splitlines()
    assert aged[0].split()[-2:] == ["report", "override"] and aged[1].split()[-2:] == [
        "1.3s", "-"]


@pytest.mark.parametrize("how", ["skipped", "holding"])
def test_a_role_that_takes_no_decision_keeps_its_engines_on_the_board(how):
    """A role whose policy Serve skips (zero replicas, requests waiting), or that holds its
    count for want of reports, cannot apply a smaller count: the others' targets must not
    take its engines (they would wait for GPUs it still holds, the targets over budget)."""
    roles = {("fast", "prefill"): (1, 1, 3), ("fast", "decode"): (2, 1, 5),
             ("deep", "prefill"): (2, 1, 4), ("deep", "decode"): (3, 1, 5)}
    shared = Board(budget=8, priorities={"fast": 1, "deep": 0}, settings=QUICK_ARBITER)
    shared.seed(roles, 0.0)
    targets = {k: n for k, (n, _, _) in roles.items()}
    load = {("fast", "prefill"): (1, 0.5), ("fast", "decode"): (2, 1.6),
            ("deep", "prefill"): (2, 1.5), ("deep", "decode"): (3, 2.5)}
    quiet = ("deep", "decode")
    t = 0.0
    for _ in range(200):
        t += 0.5
        if t > 20:
            load[("fast", "decode")] = (5, 4.8)  # a surge on the fast pool
        for key, (wished, busy_) in load.items():
            _, low, high = roles[key]
            if key == quiet and t > 15:
                if how == "holding":
                    shared.hold(key, targets[key])
                continue
            targets[key] = shared.decide(key, Wish(wished, low, high, busy_, 0.0, busy_),
                                         targets[key], t, dict, {})
        assert sum(targets.values()) <= 8, (t, targets)
    assert targets[quiet] == 3 and targets[("fast", "decode")] > 2  # the rest moved


def test_a_replica_whose_report_stopped_coming_is_read_as_silent():
    """Serve keeps a replica's last report while it runs: one whose event loop is stuck would
    feed the policy its last figures for ever. A report unchanged for `STALE_REPORT_S` (of
    the controller's time: the stamps are the replica's clock, which may be skewed) is left
    out, counted at the reporters' mean as a silent replica is."""
    from autoscaling.serve_policy import STALE_REPORT_S, ReportClock

    a, stuck = replica("a"), replica("stuck")
    clock = ReportClock()
    skewed = -3600.0  # the stuck replica's node clock is an hour behind: not stale for that

    def ctx_at(now: float, stuck_stamp: float):
        ctx = context({a: busy(2, 0), stuck: busy(4, 9)}, 2, now)
        for series in ctx.raw_metrics.values():
            series[stuck] = [TimeStampedValue(stuck_stamp, series[stuck][-1].value)]
        return ctx

    for now in (100.0, 101.0, 102.0):  # its reports keep coming, stamped by its own clock
        ctx = ctx_at(now, now + skewed)
        assert latest_reports(ctx, clock.stale(ctx, now))["running_requests"] == {a: 2, stuck: 4}
    now = 102.0
    while now <= 103.0 + STALE_REPORT_S:  # then they stop: the same last report
        now += 1.0
        ctx = ctx_at(now, 102.0 + skewed)
        reports = latest_reports(ctx, clock.stale(ctx, now))
    assert reports["running_requests"] == {a: 2} and stuck not in reports["queued_requests"]


def test_a_failing_policy_holds_its_count_instead_of_raising_into_serve():
    """An exception out of a custom policy aborts Serve's update of every application's
    state for that control loop (and each loop while it lasts): it holds the count, pinned."""
    board_module.BOARDS.clear()
    p, r = policy(app="failing"), replica("a")

    def broken(*_):
        raise ZeroDivisionError("a wish that divides by zero")

    p.wish = broken
    decision, why = p(context({r: busy(4, 8)}, 2, 100.0, app="failing"))
    assert decision == 2 and "ZeroDivisionError" in why["held"]
    assert board_module.BOARDS["failing"].holding == {("fast", "decode")}


def test_silent_roles_holding_more_than_their_share_leave_the_others_where_they_are():
    """A role held at a count the budget cannot also give the others their minimums (a count
    set behind its policy's back): no allocation fits, and every role keeps its count rather
    than the board raising on every decision."""
    held, other = ("deep", "decode"), ("fast", "decode")
    shared = Board(budget=4, priorities={"fast": 1, "deep": 0}, settings=QUICK_ARBITER)
    shared.seed({held: (4, 1, 4), other: (1, 1, 3)}, 0.0)
    shared.decide(held, Wish(4, 1, 4, 3.5), 4, 0.0, dict, {})
    shared.hold(held, 4)
    assert shared.decide(other, Wish(2, 1, 3, 1.9), 1, 0.1, dict, {}) == 1
    assert "no allocation while roles are silent" in shared.error


def test_the_targets_never_add_up_to_more_than_the_budget_between_two_policies_calls():
    """Serve calls the roles' policies one after another. An allocation that moves a donor's
    engine to a surging role was handed to the recipient at once while the donor still held it
    (its policy called later in the pass, or holding its count: no reports): targets over the
    budget, replicas started for GPUs still in use. After every single call, over random
    wishes, call orders, holds and pins, the targets fit the budget."""
    import random

    keys = [("fast", "prefill"), ("fast", "decode"), ("deep", "prefill"), ("deep", "decode")]
    for seed in range(60):
        rng = random.Random(seed)
        budget = rng.randint(4, 10)
        shared = Board(budget, {"fast": 1, "deep": 0}, rng.choice(
            [ArbiterSettings(), QUICK_ARBITER]))
        targets = {k: 1 for k in keys}
        shared.seed({k: (1, 1, budget) for k in keys}, 0.0)
        now, pins = 0.0, {}
        for _ in range(150):
            now += rng.choice([0.1, 0.13, 0.2])
            if rng.random() < 0.02:
                pins = {rng.choice(keys): rng.randint(1, 3)} if rng.random() < 0.5 else {}
            order = rng.sample(keys, len(keys))
            for i, key in enumerate(order):
                if rng.random() < 0.02:
                    shared.hold(key, targets[key])
                    continue
                asked = rng.randint(1, budget)
                load = asked * rng.uniform(0.5, 1.0)
                targets[key] = shared.decide(key, Wish(asked, 1, budget, load,
                                                       rng.uniform(0, 2), load),
                                             targets[key], now + 0.01 * i, lambda: pins, {})
                assert sum(targets.values()) <= budget, (seed, targets, shared.error)


def test_a_new_pin_that_does_not_fit_is_refused_alone():
    """Pins that do not fit the budget together were all dropped: a new one that does not fit
    took away the pin ops had set before it (a role pinned at 2 fell back to its policy)."""
    fast, deep = ("fast", "decode"), ("deep", "decode")
    shared = Board(budget=5, priorities={"fast": 1, "deep": 0}, settings=QUICK_ARBITER)
    idle = Wish(1, 1, 4, load=0.1)
    pins = {fast: 2}
    assert shared.decide(fast, idle, 1, 0.0, lambda: pins, {}) == 2
    assert shared.decide(deep, idle, 1, 0.0, lambda: pins, {}) == 1
    pins = {fast: 2, deep: 4}  # 6 engines: does not fit 5
    shared.computed_at = None
    assert shared.decide(fast, idle, 2, 1.0, lambda: pins, {}) == 2  # the earlier pin holds
    assert shared.decide(deep, idle, 1, 1.0, lambda: pins, {}) == 1
    assert shared.applied_overrides == {fast: 2}
    assert "overrides ignored (deep/decode)" in shared.error


def test_h200_profile_reads_decode_capacity_from_the_perf_model_at_the_current_context():
    """`decode_capacity: perf_model` (the h200x16 profile): the decode policy takes an engine's
    full-batch tokens/s from the performance model at the context its role decodes now, as
    the simulator does, not a fixed 5,000: long reasoning contexts need more engines."""
    from pathlib import Path

    import yaml

    from cluster.settings import SettingsError

    root = Path(__file__).resolve().parents[2]
    settings = parse_settings(
        yaml.safe_load((root / "cluster" / "profiles" / "h200x16.yaml").read_text()))
    assert settings.autoscaling.decode_capacity == "perf_model"
    perf = settings.engine_perf()
    assert (perf.gpus_per_engine, perf.max_running) == (
        settings.topology.tensor_parallel, settings.engine.max_running_requests)
    kwargs = settings.role_options("deep", "decode")["autoscaling_config"]["policy"][
        "policy_kwargs"]
    assert kwargs["decode_perf"] == perf.model_dump()
    p = ServePolicy(**kwargs)
    seen = []
    wish = p.wish
    p.wish = lambda m, *rest: (seen.append(m), wish(m, *rest))[1]
    board_module.BOARDS.clear()
    a, b = replica("a"), replica("b")
    for context_tokens in (4096, 65536):
        load = {"running_requests": 64, "queued_requests": 0, "max_running_per_replica": 128,
                "kv_tokens_used": 64 * context_tokens, "kv_capacity_per_replica": 9_000_000,
                "arrival_requests_per_s": 2.0, "arriving_output_tokens": 4000.0,
                "arriving_streams": 64}
        p(context({a: load, b: load}, 2, 100.0 + context_tokens / 1000, app="perf"))
    short, long = (m.decode_tokens_per_s_per_replica for m in seen)
    assert short == pytest.approx(perf.decode_tokens_per_s(4096))
    assert long == pytest.approx(perf.decode_tokens_per_s(65536)) and long < 0.7 * short
    # the prefill roles and a profiled profile take no model
    assert settings.role_options("deep", "prefill")["autoscaling_config"]["policy"][
        "policy_kwargs"]["decode_perf"] is None
    assert ServePolicy(**(kwargs | {"role": "prefill"})).perf is None
    with pytest.raises(SettingsError, match="decode_capacity"):  # it times SGLang only
        parse_settings({"autoscaling": {"enabled": True, "decode_capacity": "perf_model"},
                        "auth": {"enabled": False}})
    assert parse_settings({"autoscaling": {"decode_capacity": "perf_model"},  # (unused: off)
                           "auth": {"enabled": False}})
