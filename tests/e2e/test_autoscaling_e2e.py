"""Autoscaling on local Ray with the simulated engine: our policy behind Serve's custom policy
API scales the fast pool's decode deployment up under a load step and back down after it, with
every request completing in full (scale-down drains); `small4 scale`/`release` pin and unpin it.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.conftest import SIM_PROFILE, deployed

pytestmark = pytest.mark.ray

MAX_TOKENS = 60
AUTO_PROFILE = SIM_PROFILE | {
    "profile": "autoscaling-e2e",
    "engine": {"kind": "simulated", "max_running_requests": 4,
               "simulated": {"decode_step_ms": 40, "output": "counter"}},
    "pools": {
        "fast": {"effort": "none", "max_queue": 64, "priority": 1,
                 "prefill": {"num_cpus": 0.05},
                 "decode": {"num_cpus": 0.05, "replicas": 1, "min_replicas": 1,
                            "max_replicas": 3, "drain_deadline_s": 30}},
        "deep": {"effort": "high", "prefill": {"num_cpus": 0.05}, "decode": {"num_cpus": 0.05}},
    },
    "ingress": {"num_cpus": 0.05},
    "multimodal": {"num_cpus": 0.05},
    "autoscaling": {
        "enabled": True,
        "budget_engines": 5,  # the three fixed roles and fast decode's 2 (its max is 3)
        "policy": {"upscale_delay_s": 1, "downscale_delay_s": 3, "load_rise_s": 1,
                   "load_fall_s": 2, "smoothing": 0.5, "prior_decode_residency_s": 3,
                   "burst_memory_s": 2, "lead_s": 1},
        "arbiter": {"settle_s": 0, "cooldown_s": 0, "preempt_settle_s": 0, "spare": "release"}},
}


@pytest.fixture(scope="module")
def auto(stack):
    with deployed(AUTO_PROFILE, "auto", stack["ref"]) as url:
        yield url


def decode_replicas() -> int:
    from ray import serve

    dep = serve.status().applications["auto"].deployments["fast-decode"]
    return sum(n for state, n in dep.replica_states.items()
               if str(getattr(state, "value", state)) == "RUNNING")


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Load:
    """`workers` threads streaming fixed-length requests until stopped; every outcome kept."""

    def __init__(self, url: str, workers: int):
        from openai import OpenAI

        self.client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        self.stop = threading.Event()
        self.outcomes: list[tuple[str, int] | BaseException] = []
        self.pool = ThreadPoolExecutor(workers)
        self.futures = [self.pool.submit(self._run) for _ in range(workers)]

    def _one(self) -> tuple[str, int]:
        stream = self.client.chat.completions.create(
            model="mistral-small-4", messages=[{"role": "user", "content": "count"}],
            max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True})
        finish, tokens = None, 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return finish, tokens

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.outcomes.append(self._one())
            except Exception as exc:  # kept and asserted on: a failed request fails the test
                self.outcomes.append(exc)

    def finish(self) -> list:
        self.stop.set()
        for f in self.futures:
            f.result(timeout=120)
        self.pool.shutdown()
        self.client.close()
        return self.outcomes


def report_ages(seconds: int) -> list[float]:
    """The stalest fast/decode report's age, as the policy published it, once a second."""
    from autoscaling import control

    ages = []
    for _ in range(seconds):
        row = control.read_status("auto").get(("fast", "decode")) or {}
        if row.get("report_age_s") is not None:
            ages.append(row["report_age_s"])
        time.sleep(1)
    return ages


def test_load_step_scales_decode_up_then_down_without_losing_a_request(auto):
    assert decode_replicas() == 1
    step = Load(auto, workers=12)  # 12 streams over 4 decode slots per replica
    trickle = None
    try:
        wait_for(lambda: decode_replicas() >= 2, 90, "decode to scale up under the load step")
        peak = decode_replicas()
        ages = report_ages(6)
        trickle = Load(auto, workers=1)  # requests keep running while replicas leave
        outcomes = step.finish()
        wait_for(lambda: decode_replicas() == 1, 120, "decode to scale back down")
    finally:
        step.finish()
        outcomes_trickle = trickle.finish() if trickle else []
    everything = outcomes + outcomes_trickle
    failures = [o for o in everything if isinstance(o, BaseException)]
    assert not failures, f"{len(failures)} of {len(everything)} requests failed: {failures[:3]}"
    assert peak >= 2
    # the policy decides on reports about a second old (the simulator's age), not Serve's
    # default push interval of 10 s
    assert ages and max(ages) <= 5, ages
    assert len(outcomes) >= 12 and outcomes_trickle, "the load never ran"
    assert all(o == ("length", MAX_TOKENS) for o in everything), \
        sorted({o for o in everything if o != ("length", MAX_TOKENS)})


def test_scale_pins_the_role_until_release(auto, capsys):
    from cluster.cli import main

    wait_for(lambda: decode_replicas() == 1, 120, "decode at its minimum")
    assert main(["scale", "fast", "decode", "2", "--app", "auto"]) == 0
    wait_for(lambda: decode_replicas() == 2, 60, "the override to take effect")
    time.sleep(6)  # idle for longer than the downscale delay: the override holds
    assert decode_replicas() == 2
    assert main(["status", "--app", "auto", "--url", auto]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("fast/decode"))
    assert row.split()[-1] == "2", table  # the override column
    assert main(["scale", "fast", "decode", "9", "--app", "auto"]) == 2  # beyond max_replicas
    capsys.readouterr()
    assert main(["scale", "fast", "decode", "3", "--app", "auto"]) == 2  # beyond the budget
    assert "would need 6 engines; the budget is 5" in capsys.readouterr().err
    assert main(["scale", "deep", "decode", "2", "--app", "auto"]) == 2  # not autoscaled
    assert main(["release", "fast", "decode", "--app", "auto"]) == 0
    wait_for(lambda: decode_replicas() == 1, 60, "the policy to take the role back")
