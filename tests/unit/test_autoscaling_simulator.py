"""The cluster simulator: its performance model against the anchors, its engines, the cluster's
engine lifecycle, the traces, determinism, and small runs with sane numbers."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from autoscaling.perf import PerfModel
from autoscaling.simulator.capacity import best_split, engine_seconds_per_request
from autoscaling.simulator.cluster import READY, Cluster
from autoscaling.simulator.engines import DecodeEngine, PrefillEngine
from autoscaling.simulator.report import PoolSLO, meets, recovery_s
from autoscaling.simulator.scenario import SimSettings, capacity_rps, make_controller, run
from autoscaling.simulator.workload import Request, Workload, arrivals, make_trace

PERF = PerfModel()
FP, FD, DP, DD = ("fast", "prefill"), ("fast", "decode"), ("deep", "prefill"), ("deep", "decode")


def test_the_performance_model_reproduces_the_anchors():
    ideal = PERF.model_copy(update={"prefill_efficiency": 1.0, "prefill_batch_overhead_s": 0})
    assert 8192 / ideal.prefill_s([8192]) == pytest.approx(2 * 34_000, rel=0.03)  # 34k/GPU
    assert 8192 / PERF.prefill_s([8192]) < 0.7 * 2 * 34_000
    ceiling = PERF.model_copy(update={"decode_bandwidth_efficiency": 1.0, "step_floor_s": 0})
    assert 128 / ceiling.decode_step_s(128, 128 * 8192) == pytest.approx(9_561, rel=0.01)
    tp1 = ceiling.model_copy(update={"gpus_per_engine": 1, "kv_bytes_per_token": 23_040})
    assert 1 / tp1.decode_step_s(1, 8192) == pytest.approx(764, rel=0.01)
    assert 32 / tp1.decode_step_s(32, 32 * 8192) == pytest.approx(1_862, rel=0.01)
    assert 9e6 < PERF.kv_capacity_tokens < 1e7


def test_prefill_batches_up_to_the_token_budget_in_order():
    engine, queue = PrefillEngine(PERF), deque(Request(i, "fast", 0.0, n, 10)
                                               for i, n in enumerate([6000, 6000, 6000, 100]))
    done_at = engine.start(queue, 1.0)
    assert [r.rid for r in engine.batch] == [0, 1] and len(queue) == 2
    assert done_at == pytest.approx(1.0 + PERF.prefill_s([6000, 6000]))
    assert [r.prefill_end for r in engine.finish(done_at)] == [done_at, done_at]


def test_decode_sequences_gain_a_token_per_step_of_the_whole_batch():
    engine = DecodeEngine(PERF, 0.0)
    a, b = Request(0, "fast", 0.0, 1000, 100), Request(1, "fast", 0.0, 1000, 50)
    engine.admit(a, 0.0)
    step_one = engine.step
    engine.admit(b, 0.0)
    assert engine.step > step_one  # more experts and KV read per step
    finish_b = engine.next_finish()
    assert finish_b == pytest.approx(50 * engine.step)
    assert engine.finish_due(finish_b) == [b] and engine.step < PERF.decode_step_s(2, 2200)
    alone = engine.step
    finish_a = engine.next_finish()
    assert engine.finish_due(finish_a) == [a]
    assert finish_a == pytest.approx(finish_b + 50 * alone, rel=1e-6)
    assert engine.kv_reserved == 0 and not engine.running


def test_a_moved_engine_drains_then_cold_starts():
    events = []
    cluster = Cluster(PERF, 2, {FP: 1, FD: 1}, lambda *e: events.append(e))
    busy = cluster.of(FD, "ready")[0]
    busy.engine.admit(Request(0, "fast", 0.0, 100, 1000), 0.0)
    cluster.reconcile({FP: 1, FD: 0, DD: 1}, 10.0)
    assert busy.phase == "draining" and cluster.assigned(DD) == 0
    cluster.free(busy, 30.0)
    cluster.fill(30.0)
    assert busy.phase == "starting" and busy.key == DD
    when, kind, slot, epoch = events[-1]
    assert kind == READY and when == 30.0 + PERF.cold_start_s
    cluster.ready(slot, when)
    assert cluster.assigned(DD) == 1 and cluster.moves == 1
    assert cluster.allocated_engine_s(200.0) == pytest.approx(200.0 + 30.0 + (200.0 - 30.0))


class MoveAt:
    """A controller that moves one fast decode engine to deep decode at `at` seconds."""

    name = "move"

    def __init__(self, at: float):
        self.at = at

    def targets(self, now, metrics):
        moved = now >= self.at
        return {FP: 1, FD: 1 if moved else 2, DP: 1, DD: 1 if moved else 0}


def test_a_stream_on_a_decode_engine_that_outlives_its_drain_is_resumed_on_another():
    """The ingress resumes a stream whose replica went (prompt and tokens sent prefilled
    again); the simulator does the same at the drain deadline, and the client's request ends
    when the continuation does: late, never aborted."""
    from autoscaling.simulator.sim import Simulation

    perf = PERF.model_copy(update={"drain_timeout_s": 5.0})
    long = [Request(i, "fast", 0.0, 1000, 20_000) for i in range(2)]  # minutes of decode
    short = [Request(2 + i, "fast", 1.0 + i, 1000, 10) for i in range(3)]
    sim = Simulation(long + short, MoveAt(10.0), perf, budget=5,
                     initial={FP: 1, FD: 2, DP: 1, DD: 0}, duration_s=30.0, grace_s=600.0)
    result = sim.run()
    assert result.resumed == 1 and result.engine_moves == 1
    for r in long + short:
        assert r.finish is not None and not r.aborted, r
    # the resumed one ended after the undisturbed one: its remainder waited for a prefill of
    # its prompt plus the tokens it had sent, then shared the other engine's batch
    undisturbed, resumed = sorted(long, key=lambda r: r.finish)
    assert resumed.finish > undisturbed.finish


class Recording:
    """A controller that keeps the split and records what each role reported at each tick."""

    name = "recording"

    def __init__(self, split):
        self.split, self.seen = split, []

    def targets(self, now, metrics):
        self.seen.append((now, metrics))
        return self.split


def test_decode_counts_a_request_when_it_arrives_not_when_prefill_lets_it_through():
    """In production (SGLang's PD) the ingress opens the decode leg with the request, so
    decode reports an arrival before the prompt is prefilled: a prefill backlog must not hide
    the decode work behind it from the policy (it would give decode's engines to prefill, then
    take them back a cold start later)."""
    from autoscaling.simulator.sim import Simulation

    split = {FP: 1, FD: 1, DP: 1, DD: 1}
    # 40 long prompts in 10 s: one prefill engine has prefilled a handful when the report runs
    requests = [Request(i, "fast", i * 0.25, 120_000, 200) for i in range(40)]
    recording = Recording(split)
    Simulation(requests, recording, PERF, budget=4, initial=split, duration_s=12.0,
               grace_s=0.0).run()
    now, metrics = recording.seen[-1]
    prefill, decode = metrics[FP], metrics[FD]
    assert prefill.queued_requests > 10  # the backlog is real
    assert prefill.arrival_requests_per_s > 0
    assert decode.arrival_requests_per_s == pytest.approx(prefill.arrival_requests_per_s)


class RecordingMove(MoveAt):
    """`MoveAt`, recording what each role reported at each tick."""

    def __init__(self, at: float):
        super().__init__(at)
        self.seen = []

    def targets(self, now, metrics):
        self.seen.append((now, metrics))
        return super().targets(now, metrics)


def test_an_engine_granted_while_its_donor_drains_reports_as_starting():
    """Serve reports a grant as starting from the moment the target rose (target less
    running), through the donor's drain and the cold start: the policy must not ask again
    for an engine it was given (its `starting == 0` rule would add one more)."""
    from autoscaling.simulator.sim import Simulation

    perf = PERF.model_copy(update={"drain_timeout_s": 30.0})
    # two long streams, one per fast decode engine: the one moved drains until its deadline
    busy = [Request(i, "fast", 0.0, 1000, 50_000) for i in range(2)]
    recording = RecordingMove(10.0)
    Simulation(busy, recording, perf, budget=4, initial={FP: 1, FD: 2, DP: 1, DD: 0},
               duration_s=60.0, grace_s=0.0).run()
    draining = [m[DD] for now, m in recording.seen if 12.0 <= now < 38.0]
    assert draining and all(m.starting == 1 and m.replicas == 0 for m in draining)


def test_decode_follows_a_stream_from_its_arrival_and_ends_it_when_prefill_gives_up():
    """Production's decode worker starts following a stream when its leg opens (for the
    answer length of the work arriving) and ends it at nothing sent when the leg fails; the
    simulator does the same for requests that expire in the prefill queue."""
    from autoscaling.simulator.sim import Simulation

    split = {FP: 1, FD: 1, DP: 1, DD: 1}
    requests = [Request(i, "fast", i * 0.25, 120_000, 200) for i in range(40)]
    sim = Simulation(requests, Recording(split), PERF, budget=4, initial=split,
                     duration_s=12.0, grace_s=0.0, prefill_deadline=(2.0, 1e9))
    sim.run()
    streams = list(sim.windows[FD].streams)
    aborted = [r for r in requests if r.aborted]
    assert aborted and len(streams) == len(requests)  # one per arrival, prefilled or not
    assert sum(s.output == 0 for s in streams) == len(aborted)


def test_traces_follow_their_shapes():
    w = Workload()
    step = make_trace("step", 30.0, w)
    reqs = arrivals(step, w, seed=1)
    before = sum(r.arrival < step.step_at_s for r in reqs) / step.step_at_s
    after = sum(r.arrival >= step.step_at_s for r in reqs) / (step.duration_s - step.step_at_s)
    assert after / before == pytest.approx(3.0, rel=0.1)
    assert sum(r.pool == "deep" for r in reqs) / len(reqs) == pytest.approx(0.3, abs=0.02)
    diurnal = make_trace("diurnal", 30.0, w)
    rates = diurnal.rates["fast"]
    t = np.array([0.0, diurnal.duration_s / 2])
    assert rates(t)[1] / rates(t)[0] == pytest.approx(3.0)


def test_capacity_finds_the_best_split():
    cost = engine_seconds_per_request(PERF, Workload())
    assert cost[DD] > cost[DP] > cost[FP]
    split, rps = best_split(PERF, Workload(), 8)
    assert sum(split.values()) == 8 and split[DD] >= 3 and 15 < rps < 40


def test_meeting_the_slo_and_recovering_from_a_step():
    slo = PoolSLO(ttft_s=1.0, itl_s=0.05)
    ok = Request(0, "fast", 0.0, 100, 11, first_token=0.5, finish=0.9)
    slow = Request(1, "fast", 0.0, 100, 11, first_token=0.5, finish=1.6)
    assert meets(ok, slo) and not meets(slow, slo)
    assert not meets(Request(2, "fast", 0.0, 100, 11), slo)
    rolling = [(t, a) for t, a in zip(range(0, 200, 10), [1.0] * 6 + [0.5] * 4 + [0.95] * 10)]
    assert recovery_s(rolling, 50.0, 150.0, 0.9) == 50.0
    assert recovery_s([(t, 1.0) for t in range(0, 200, 10)], 50.0, 150.0, 0.9) == 0.0
    assert recovery_s(rolling[:9], 50.0, 150.0, 0.9) is None


SMALL = SimSettings()


def test_a_small_run_completes_with_sane_numbers():
    report = run("steady", "static", SMALL, seed=3, duration_s=300.0, capacity=20.0)
    assert report["requests"] == pytest.approx(0.6 * 20.0 * 300, rel=0.1)
    assert report["slo_attainment"] > 0.97
    assert report["goodput_rps"] == pytest.approx(report["offered_rps"], rel=0.03)
    # the trace's five minutes, not the two after it where only its last streams end
    assert report["gpu_hours_allocated"] == pytest.approx(16 * 300 / 3600)
    assert 0 < report["gpu_hours_busy"] < report["gpu_hours_allocated"]
    fast = report["pools"]["fast"]
    assert 0.0 < fast["ttft_p50_s"] < 1.0 and 0.005 < fast["itl_p50_s"] < 0.05


def test_runs_are_deterministic_for_a_seed():
    a = run("bursty", "ours", SMALL, seed=1, duration_s=300.0, capacity=20.0)
    b = run("bursty", "ours", SMALL, seed=1, duration_s=300.0, capacity=20.0)
    c = run("bursty", "ours", SMALL, seed=2, duration_s=300.0, capacity=20.0)
    assert a == b and a["requests"] != c["requests"]


def test_the_slo_policies_move_engines_to_an_overloaded_role():
    overloaded = SMALL.model_copy(update={"static_split": {"fast/prefill": 2, "fast/decode": 3,
                                                           "deep/prefill": 2, "deep/decode": 1}})
    static = run("steady", "static", overloaded, seed=0, duration_s=600.0, capacity=20.0)
    ours = run("steady", "ours", overloaded, seed=0, duration_s=600.0, capacity=20.0)
    assert all(a < 0.75 for t, a in static["attainment_windows"] if t >= 60)
    assert all(a > 0.95 for t, a in ours["attainment_windows"] if t >= 240)
    assert ours["goodput_rps"] > 1.2 * static["goodput_rps"]
    assert ours["engine_moves"] <= 4
    final = ours["allocation_timeline"][-1][1]
    assert sum(final.values()) == 8 and final["deep/decode"] >= 3


def test_unknown_controllers_are_refused():
    with pytest.raises(KeyError, match="unknown controller 'hpa'"):
        make_controller("hpa", SMALL)
    assert capacity_rps(SMALL) > 0


@pytest.mark.parametrize("kind", ["mix-shift", "length-shift", "mix-length"])
def test_traces_where_the_mix_moves_shift_and_come_back(kind):
    w = Workload()
    trace = make_trace(kind, 20.0, w, capacity_of=lambda _: 20.0)
    a, b = trace.shifts
    assert (a, b) == (1200.0, 2400.0) and trace.duration_s == 3600.0
    reqs = arrivals(trace, w, seed=3)

    def phase(lo, hi):
        inside = [r for r in reqs if lo <= r.arrival < hi]
        deep = sum(r.pool == "deep" for r in inside) / len(inside)
        prompt = np.mean([r.prompt for r in inside])
        output = np.mean([r.output for r in inside])
        return deep, prompt / output

    first, middle, last = phase(0, a), phase(a + 300, b), phase(b + 300, 3600)
    if kind in ("mix-shift", "mix-length"):
        assert first[0] == pytest.approx(0.2, abs=0.03)
        assert middle[0] == pytest.approx(0.7, abs=0.03)
    else:
        assert first[0] == pytest.approx(0.3, abs=0.03) == middle[0]
    if kind != "mix-shift":  # decode-heavy (or today's) outside, prefill-heavy in the middle
        assert middle[1] > 5 * first[1]
    assert last == pytest.approx(first, rel=0.15)


def test_the_planner_sizes_roles_from_profiled_throughput_within_the_budget():
    from autoscaling.metrics import RoleMetrics
    from autoscaling.simulator.planner import (PlannerController, decode_tokens_per_s,
                                               fit_budget, prefill_tokens_per_s)

    split = {FP: 1, FD: 1, DP: 1, DD: 1}
    planner = PlannerController(split, PERF, {"fast": (1.0, 0.05), "deep": (4.0, 0.06)}, 8)
    busy = {FP: RoleMetrics(1, arrival_requests_per_s=20, arrival_prompt_tokens_per_s=60_000),
            FD: RoleMetrics(1, mean_output_tokens=300),
            DP: RoleMetrics(1, arrival_requests_per_s=2, arrival_prompt_tokens_per_s=8_000),
            DD: RoleMetrics(1, mean_output_tokens=3000)}
    for t in range(59):
        assert planner.targets(float(t), busy) == split  # once per interval
    plan = planner.targets(60.0, busy)
    assert plan[FP] == int(np.ceil(60_000 / prefill_tokens_per_s(PERF, 3000)))
    assert plan[DD] == int(np.ceil(2 * 3000 / decode_tokens_per_s(PERF, 4000 + 1500, 0.06)))
    assert sum(plan.values()) <= 8
    assert fit_budget({FP: 6, FD: 2, DP: 3, DD: 5}, 8, 1) == {FP: 3, FD: 1, DP: 2, DD: 2}
    # the profile: a longer ITL allows a bigger batch, so more tokens/s
    assert decode_tokens_per_s(PERF, 4000, 0.02) < decode_tokens_per_s(PERF, 4000, 0.06)


def test_the_hindsight_reference_counts_each_request_where_and_while_it_needs_an_engine():
    from autoscaling.simulator.capacity import request_cost
    from autoscaling.simulator.hindsight import role_needs

    requests = [Request(0, "deep", 100.2, 8000, 2000), Request(1, "fast", 50.0, 1000, 10)]
    need = role_needs(requests, PERF, 1000, smooth_s=1)
    prefill, stream = request_cost(PERF, 8000, 2000)
    assert need[DP].sum() == pytest.approx(prefill) and need[DP][100] == pytest.approx(prefill)
    alive = np.flatnonzero(need[DD])  # one stream, 1/max_running of an engine while it lasts
    assert alive[0] == 100 and len(alive) == int(np.ceil(stream))
    assert need[DD][100] == pytest.approx(1 / PERF.max_running)
    assert need[FP].sum() > 0 and need[FD][50] > 0 and not need[FD][:50].any()


def test_the_hindsight_reference_moves_engines_before_the_load_it_foresees():
    from autoscaling.simulator.hindsight import HindsightController

    # deep prompts flood in from t=600: enough prefill work for three engines
    per_s = 3 * PERF.prefill_flops_per_s / PERF.prompt_flops(12_000)
    flood = [Request(i, "deep", 600 + i / per_s, 12_000, 20) for i in range(int(300 * per_s))]
    split = {FP: 1, FD: 2, DP: 2, DD: 3}
    seer = HindsightController(split, flood, PERF, 8, 1200.0)
    assert seer.lead >= PERF.cold_start_s + PERF.drain_timeout_s
    assert seer.targets(0.0, {}) == split  # nothing foreseen within its lead: no move
    before = seer.targets(600.0 - seer.lead + 40, {})
    assert before[DP] >= 4 and sum(before.values()) == 8 and min(before.values()) >= 1
    assert seer.targets(605.0, {}) == before  # kept while it covers what comes


def test_knowing_the_future_carries_a_length_shift_that_ours_does_not():
    # The budget carries each phase at 0.8 of its best split; a clairvoyant split keeps 95 %
    # within SLO, so what ours misses there is foresight and measurement, not engines.
    seer = run("length-shift", "hindsight", SMALL, seed=0)
    static = run("length-shift", "static", SMALL, seed=0)
    assert seer["slo_attainment"] >= 0.95 > static["slo_attainment"]
    assert seer["engine_moves"] <= 20
    with pytest.raises(ValueError, match="needs the trace's requests"):
        make_controller("hindsight", SMALL)


def _report(goodput: float, pools: dict[str, tuple[int, float]]) -> dict:
    return {"goodput_rps": goodput, "offered_rps": 1.0, "slo_attainment": 0.95,
            "gpu_hours_allocated": 1.0, "engine_moves": 0,
            "pools": {p: {"requests": n, "slo_attainment": a} for p, (n, a) in pools.items()}}


def test_a_baseline_that_served_nothing_in_slo_has_no_ratio_not_a_crash():
    """One row whose prefill alone outlasts the TTFT SLO: the static split's goodput is 0,
    and the study died dividing by it after every run had finished (nothing written)."""
    from autoscaling.simulator.study import summarise, verdict

    zero = _report(0.0, {"fast": (1, 0.0), "deep": (0, None)})
    rows = summarise({"t": {"static": [zero], "planner": [zero], "ours": [zero]}},
                     SimSettings())
    ours = next(r for r in rows if r["policy"] == "ours")
    assert ours["vs_static"] is None and ours["ceiling"] is None and ours["vs_planner"] is None
    assert "vs_static" not in verdict(rows, SimSettings())["t"]


def test_the_answer_holds_every_pool_to_the_target_not_the_whole(monkeypatch):
    """95 % of requests in the fast pool at 99.8 % and 5 % in the deep pool at 16 %: 95.5 %
    within SLO overall, which the answer called met."""
    from autoscaling.simulator import study

    hidden = _report(1.0, {"fast": (1900, 0.998), "deep": (100, 0.163)})
    monkeypatch.setattr(study, "run_jobs", lambda jobs, workers, progress: [
        (None, None, None, hidden) for _ in jobs])
    assert study._attainment(None, SimSettings(), "ours", 1, 1, None) == pytest.approx(0.163)


def test_an_answer_that_found_nothing_says_what_it_tried():
    from autoscaling.simulator.study import answer_line

    line = answer_line({"trace": "huge.csv", "ours": None, "fixed_split": None,
                        "max_budget": 32, "ours_from": 228, "fixed_from": 12})
    assert "need 228 engines, above the 32 this answer tries" in line
    assert "no budget of 12-32 engines tried" in line


def test_the_table_shows_a_missing_ratio_as_a_dash():
    from autoscaling.simulator.study import summarise, table

    zero = _report(0.0, {"fast": (1, 0.0), "deep": (0, None)})
    printed = table(summarise({"t": {"static": [zero], "ours": [zero]}}, SimSettings()))
    assert printed.splitlines()[-1].split("|")[3].strip() == "-"


@pytest.mark.parametrize("output", [2000, 30000])
def test_the_busiest_window_counts_a_long_stream_in_every_window_it_holds_a_slot(output):
    """A steady request a second for an hour: the decode engines busy at once are the rate
    times a stream's length over the slots of an engine, whether a stream lasts a minute or
    fourteen (counted only in its arrival window, one of 843 s was under a third of it)."""
    from types import SimpleNamespace

    from autoscaling.simulator.capacity import demand_peaks, request_cost

    perf = SimSettings().perf
    _, stream = request_cost(perf, 4000, output)
    requests = [SimpleNamespace(arrival=float(t), pool="deep", prompt=4000, output=output)
                for t in range(3600)]
    peaks, _ = demand_peaks(perf, requests)
    assert peaks[("deep", "decode")] == pytest.approx(stream / perf.max_running, rel=0.02)


def test_requests_too_long_for_their_ttft_slo_are_left_out_of_the_answers_target(monkeypatch):
    """A fast-pool prompt of 40K tokens prefills for longer than the pool's 1 s TTFT SLO on an
    idle engine: no budget meets it, and counting it made the answer try every budget."""
    from types import SimpleNamespace

    from autoscaling.simulator import study

    s = SimSettings()
    drawn = [[SimpleNamespace(pool="fast", prompt=40_000, output=10)] + [
        SimpleNamespace(pool="fast", prompt=500, output=10) for _ in range(14)]]
    reachable = study._reachable(s, drawn)
    assert reachable == {"fast": pytest.approx(14 / 15), "deep": 1.0}
    report = _report(1.0, {"fast": (15, 14 / 15), "deep": (0, None)})
    monkeypatch.setattr(study, "run_jobs", lambda jobs, workers, progress: [
        (None, None, None, report) for _ in jobs])
    assert study._attainment(None, s, "static", 1, 1, None, reachable) == pytest.approx(1.0)
    assert study._attainment(None, s, "static", 1, 1, None) == pytest.approx(14 / 15)


def test_the_planner_keeps_a_pool_it_has_nothing_to_size_from():
    """An interval in which no stream ended (no output length yet) or nothing arrived: the
    planner kept sizing decode from an output length of 0, cutting a pool with a minute of
    streams running to one engine; Dynamo's skips such an interval."""
    from autoscaling.metrics import RoleMetrics
    from autoscaling.simulator.planner import PlannerController

    split = {FP: 1, FD: 1, DP: 1, DD: 3}
    planner = PlannerController(split, PERF, {"fast": (1.0, 0.05), "deep": (4.0, 0.06)}, 8)
    quiet = {FP: RoleMetrics(1), FD: RoleMetrics(1),
             DP: RoleMetrics(1, arrival_requests_per_s=1, arrival_prompt_tokens_per_s=3000),
             DD: RoleMetrics(3)}  # streams running, none ended
    for t in range(61):
        plan = planner.targets(float(t), quiet)
    assert plan[DD] == 3 and plan[FD] == 1


def test_a_stream_within_its_slo_that_ends_after_the_run_is_met(tmp_path):
    """Long answers (12K tokens at the deep pool's 60 ms/token SLO may take 12 minutes) still
    streaming when the controller stops: they were counted as misses, so the answer sized
    decode for streams to end two minutes after the last arrival."""
    from autoscaling.simulator.scenario import run_trace
    from autoscaling.simulator.tracefile import TraceSource, load_trace

    path = tmp_path / "long.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    + "".join(f"{t},3000,12000\n" for t in range(120)))
    trace = load_trace([TraceSource(path, "high")], 1.0)
    report = run_trace(trace, "static", SimSettings())
    deep = report["pools"]["deep"]
    assert deep["unfinished"] == 0 and deep["itl_p90_s"] < SimSettings().slos["deep"].itl_s
    assert report["slo_attainment"] == 1.0


def test_busy_engines_are_counted_over_the_trace_as_allocated_ones_are(tmp_path):
    """An overloaded trace's backlog is served after it: busy engine time was counted past
    the trace's end, allocated time not, and busy came out above allocated."""
    from autoscaling.simulator.scenario import run_trace
    from autoscaling.simulator.tracefile import TraceSource, load_trace

    path = tmp_path / "over.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    + "".join(f"{t / 10},20000,2000\n" for t in range(1200)))
    report = run_trace(load_trace([TraceSource(path, "high")], 1.0), "static", SimSettings())
    assert 0 < report["gpu_hours_busy"] <= report["gpu_hours_allocated"]


def test_a_burst_at_one_instant_is_sized_by_the_time_its_work_lasts():
    """200 requests at t = 0: their work was divided by one second (the last arrival's time,
    floored), 77 decode engines for what 200 streams on 32-slot engines hold at once."""
    from types import SimpleNamespace

    from autoscaling.simulator.capacity import demand_peaks

    perf = SimSettings().perf
    requests = [SimpleNamespace(arrival=0.0, pool="deep", prompt=4000, output=2000)
                for _ in range(200)]
    peaks, _ = demand_peaks(perf, requests)
    assert peaks[("deep", "decode")] <= 200 / perf.max_running * 1.05


def test_the_answer_tries_every_budget_on_the_same_traffic(monkeypatch):
    """A synthetic trace's rate follows a budget's capacity: each candidate budget was run on
    traffic sized for itself (a smaller budget on lighter traffic), not the user's."""
    from autoscaling.simulator import study

    s = SimSettings()
    jobs_seen = []

    def run_jobs(jobs, workers, progress):
        jobs_seen.extend(jobs)
        return [(None, None, None, _report(1.0, {"fast": (1, 1.0), "deep": (1, 1.0)}))
                for _ in jobs]

    monkeypatch.setattr(study, "run_jobs", run_jobs)
    spec = study.TraceSpec("steady", kind="steady", duration_s=600.0)
    study.answer(spec, s, seeds=1, workers=1)
    expected = len(arrivals(spec.build(s, 0), s.workload, 0))
    budgets = {settings.budget_engines for *_, settings in jobs_seen}
    assert budgets - {s.budget_engines}, budgets  # other budgets were tried
    for job_spec, _, seed, settings in jobs_seen:
        assert len(arrivals(job_spec.build(settings, seed), s.workload, seed)) == expected


def test_the_ceiling_is_computed_before_rounding():
    """A trace of a request every ten minutes: the offered rate rounded to 0.002 first made the
    ceiling 1.17 where the static split served everything (1.0)."""
    from autoscaling.simulator.study import summarise

    served = _report(0.00171, {"fast": (2, 1.0), "deep": (0, None)}) | {"offered_rps": 0.00171}
    rows = summarise({"t": {"static": [served], "ours": [served]}}, SimSettings())
    assert {r["ceiling"] for r in rows} == {1.0}
