"""The one load window production workers and the simulator share: its spans, its typed report,
and the worker's Ray-facing view of it, on an injected clock."""

from __future__ import annotations

import pytest

from autoscaling.window import LoadReport, LoadWindow
from services.engines.protocol import EngineStats
from services.workers.load import LoadWindow as WorkerWindow


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_rates_cover_the_window_and_expire_with_it():
    clock = Clock()
    w = LoadWindow(slo_s=1.0, clock=clock, window_s=10)
    for _ in range(30):
        w.arrived(prompt_tokens=200)
    w.prefilled(tokens=4000, compute_s=0.5, wait_s=0.2, ttft_s=0.8)
    clock.t += 0.5  # the next prompt's prefill ran after it
    w.prefilled(tokens=4000, compute_s=0.5, wait_s=1.5, ttft_s=2.0)
    r = w.snapshot(queued=4)
    assert isinstance(r, LoadReport)
    assert r.arrival_requests_per_s == pytest.approx(3.0)
    assert r.arrival_prompt_tokens_per_s == pytest.approx(600.0)
    assert r.prefill_tokens_per_s == pytest.approx(8000.0)  # per busy second
    assert (r.slo_met, r.slo_total) == (1, 2) and r.queued_requests == 4
    clock.t += 9.0  # still inside the ten seconds
    assert w.snapshot().arrival_requests_per_s == pytest.approx(3.0)
    clock.t += 1.0
    later = w.snapshot()
    assert later.arrival_requests_per_s == 0 and later.slo_total == 0
    assert later.latency_p90_s is None and later.queue_wait_p90_s is None


def test_the_mean_output_length_follows_a_shift_within_its_own_span():
    clock = Clock()
    w = LoadWindow(slo_s=0.05, clock=clock, window_s=10, output_window_s=300)
    for _ in range(50):
        w.decoded(output_tokens=200, residency_s=4.0)
    assert w.snapshot().mean_output_tokens == pytest.approx(200)
    clock.t += 200  # long reasoning outputs start; the short ones are still in the span
    for _ in range(50):
        w.decoded(output_tokens=4000, residency_s=100.0)
    assert w.snapshot().mean_output_tokens == pytest.approx(2100)
    clock.t += 150  # the short ones have left the span (a lifetime mean would stay at 2100)
    assert w.snapshot().mean_output_tokens == pytest.approx(4000)
    clock.t += 400
    assert w.snapshot().mean_output_tokens == 0.0


def test_the_expected_output_of_an_arriving_request_follows_a_shift_within_a_minute():
    clock = Clock()
    w = LoadWindow(slo_s=0.05, clock=clock, window_s=10, output_window_s=300, recent_s=60)
    for n in (100, 1000) * 50:  # what finished: half short, half long answers
        w.decoded(output_tokens=n, residency_s=10.0, stream=w.stream())
    clock.t += 61  # those arrived more than a minute ago: the mean of what finished stands
    assert w.snapshot().arriving_output_tokens == pytest.approx(550) == \
        w.snapshot().mean_output_tokens
    # a running stream counts at the mean of the finished answers longer than its tokens so
    # far: not at what it has (a rise would read low, the short ones finishing first)
    running = w.stream()
    assert w.snapshot().arriving_output_tokens == pytest.approx(550)  # 0 so far: all count
    running.tokens = 200
    assert w.snapshot().arriving_output_tokens == pytest.approx(1000)
    running.tokens = 5000  # longer than anything finished: at least what it has
    assert w.snapshot().arriving_output_tokens == pytest.approx(5000)
    # the mix moves to short answers: those arriving finish within seconds
    for _ in range(9):
        w.decoded(output_tokens=50, residency_s=1.0, stream=w.stream())
    assert w.snapshot().arriving_output_tokens == pytest.approx((5000 + 9 * 50) / 10)
    running.ended(300)  # cut short: counted at what it sent
    assert w.snapshot().arriving_output_tokens == pytest.approx((300 + 9 * 50) / 10)
    assert w.snapshot().mean_output_tokens > 450  # the finished mean still reads long
    clock.t += 61
    assert w.snapshot().arriving_output_tokens == w.snapshot().mean_output_tokens


def test_streams_that_decoded_nothing_say_nothing_of_what_arrives():
    clock = Clock()
    w = LoadWindow(slo_s=0.05, clock=clock, recent_s=60)
    for _ in range(10):
        w.decoded(output_tokens=800, residency_s=10.0, stream=w.stream())
    report = w.snapshot()
    assert (report.arriving_output_tokens, report.arriving_streams) == (800, 10)
    for _ in range(90):  # a prefill overload: most requests fail before their first token
        w.stream().ended(0)
    report = w.snapshot()
    assert (report.arriving_output_tokens, report.arriving_streams) == (800, 10)
    clock.t += 61  # none left within the minute: the finished mean, and no streams to pool
    report = w.snapshot()
    assert (report.arriving_output_tokens, report.arriving_streams) == (800, 0)


def test_finished_lengths_stay_sorted_and_in_step_through_expiry_and_the_cap(monkeypatch):
    from autoscaling import window as module

    monkeypatch.setattr(module, "MAX_SAMPLES", 8)
    clock = Clock()
    w = LoadWindow(slo_s=0.05, clock=clock, output_window_s=300)
    for n in (5, 3, 9, 3, 7, 1, 8, 2, 6, 4):  # two past the cap: the oldest (5, 3) go
        w.decoded(output_tokens=n, residency_s=1.0)
        clock.t += 1
    assert w.lengths == sorted(n for _, n in w.finished) == [1, 2, 3, 4, 6, 7, 8, 9]
    clock.t += 295  # past 300 s for the first ones
    w.snapshot()
    assert w.lengths == sorted(n for _, n in w.finished) and len(w.lengths) < 8


def test_decode_latency_slo_and_waits():
    clock = Clock()
    w = LoadWindow(slo_s=0.05, clock=clock)
    w.generated(10, 0.02)
    w.generated(200, 0.08)  # at most 64 samples a call: a long chunk does not swamp the rest
    w.waited(0.3)
    w.decoded(output_tokens=10, residency_s=0.2)  # 20 ms/token: met
    w.decoded(output_tokens=10, residency_s=2.0, wait_s=0.1)  # 200 ms/token: missed
    r = w.snapshot(running=3, max_running=8, kv_used=500, kv_capacity=4000)
    assert r.generated_tokens_per_s == pytest.approx(21.0)
    assert r.latency_p50_s == pytest.approx(0.08) and r.latency_p90_s == pytest.approx(0.08)
    assert r.queue_wait_p90_s == pytest.approx(0.3)
    assert (r.slo_met, r.slo_total) == (1, 2)
    assert r.decode_residency_s == pytest.approx(1.1)
    m = r.role_metrics("decode", replicas=2, starting=1, decode_tokens_per_s_per_replica=5000)
    assert (m.itl_p90_s, m.ttft_p90_s) == (pytest.approx(0.08), None)
    assert (m.running_requests, m.kv_tokens_used, m.kv_capacity_per_replica) == (3, 500, 4000)
    assert (m.replicas, m.starting, m.decode_tokens_per_s_per_replica) == (2, 1, 5000)


def test_prefill_role_metrics_estimate_queued_tokens_from_the_mean_prompt():
    w = LoadWindow(slo_s=1.0, clock=Clock())
    for n in (1000, 3000):
        w.arrived(n)
    w.prefilled(tokens=1000, compute_s=0.1, wait_s=0.0, ttft_s=0.4)
    m = w.snapshot(queued=5).role_metrics("prefill", replicas=1)
    assert m.queued_prompt_tokens == 10_000 and m.ttft_p90_s == pytest.approx(0.4)
    assert m.itl_p90_s is None


def test_a_bucket_keeps_at_most_max_samples():
    w = LoadWindow(slo_s=1.0, clock=Clock())
    for _ in range(10_000):
        w.waited(1.0)
    assert len(w.buckets[-1].waits) == 4096


def test_windows_are_whole_seconds():
    with pytest.raises(ValueError, match="whole seconds"):
        LoadWindow(slo_s=1.0, clock=Clock(), window_s=0)


def test_the_worker_reports_the_same_window_as_numbers_for_ray():
    clock = Clock()
    worker = WorkerWindow(slo_s=0.05, window_s=10, clock=clock)
    shared = LoadWindow(slo_s=0.05, clock=clock)
    for w in (worker, shared):
        w.arrived(100)
        w.generated(10, 0.02)
        w.decoded(output_tokens=10, residency_s=0.2, wait_s=0.1)
    stats = EngineStats("simulated", "decode", running=3, waiting=2, kv_tokens=500,
                        kv_capacity=4000)
    report = worker.report(stats, max_running=8)
    expected = shared.snapshot(queued=2, running=3, max_running=8, kv_used=500,
                               kv_capacity=4000).stats()
    assert report == {**expected, "healthy": 1.0}
    assert all(isinstance(v, float) for v in report.values())


def test_prefill_time_is_the_union_of_an_engines_prompts_not_their_sum():
    """SGLang prefills a batch together and reports each prompt's whole batch time: summed,
    an engine prefilling 4 prompts at a time read a quarter of its rate, and the policy
    asked for 4 times the prefill engines. Sequential prompts still add up; the simulator's
    engines, sharing one window per role, keep their own union each."""
    clock = Clock()
    w = LoadWindow(slo_s=1.0, clock=clock, window_s=10)
    for _ in range(4):  # one batch of four 2,000-token prompts in 0.5 s
        w.prefilled(tokens=2000, compute_s=0.5, wait_s=0.0, ttft_s=0.5)
    assert w.snapshot().prefill_tokens_per_s == pytest.approx(16000.0)
    clock.t += 0.3  # a prompt that joined the batch late (chunked prefill): 0.3 s more
    w.prefilled(tokens=3200, compute_s=0.6, wait_s=0.0, ttft_s=0.6)
    assert w.snapshot().prefill_tokens_per_s == pytest.approx(11200 / 0.8)
    for order in ((2.0, 0.5), (0.5, 2.0)):  # a long prompt and one that joined its last step,
        nested = LoadWindow(slo_s=1.0, clock=clock, window_s=10)  # reported in either order
        for compute_s in order:
            nested.prefilled(tokens=1000, compute_s=compute_s, wait_s=0.0, ttft_s=compute_s)
        assert nested.snapshot().prefill_tokens_per_s == pytest.approx(1000.0), order
    other = LoadWindow(slo_s=1.0, clock=clock, window_s=10)
    for engine in ("a", "b"):  # two engines at once in one pooled window: both count
        other.prefilled(tokens=4000, compute_s=0.5, wait_s=0.0, ttft_s=0.5, engine=engine)
    assert other.snapshot().prefill_tokens_per_s == pytest.approx(8000.0)
