"""Serve's health check of an engine replica (`EngineHost.check_health`): without it Serve
checks only that the replica's loop answers, so a hung engine kept its replica routed to."""

from __future__ import annotations

import asyncio

import pytest

from services.engines.protocol import EngineStats
from services.workers import engine_host
from services.workers.engine_host import UNHEALTHY_FOR_S, EngineHost


class Engine:
    def __init__(self, probed: bool):
        self.probed_health = probed
        self.healthy, self.running = True, 0

    def stats(self) -> EngineStats:
        return EngineStats("x", "decode", running=self.running, waiting=0, kv_tokens=0,
                           kv_capacity=1, healthy=self.healthy, detail="stuck")


def host(engine: Engine) -> EngineHost:
    worker = object.__new__(EngineHost)  # no model: only what the check reads
    worker.engine, worker.role = engine, "decode"
    return worker


@pytest.mark.parametrize("probed, running, fails", [
    (True, 0, True),    # a probe through the engine failed: hung, with or without work
    (False, 3, True),   # a CPU engine whose steps keep failing while requests wait
    (False, 0, False),  # a CPU engine whose last step failed, idle since: not hung
])
def test_an_engine_unhealthy_for_a_minute_fails_the_replicas_check(monkeypatch, probed,
                                                                     running, fails):
    clock = [1000.0]
    monkeypatch.setattr(engine_host.time, "monotonic", lambda: clock[0])
    engine = Engine(probed)
    worker = host(engine)
    asyncio.run(worker.check_health())
    engine.healthy, engine.running = False, running
    asyncio.run(worker.check_health())  # unhealthy from here
    clock[0] += UNHEALTHY_FOR_S - 1
    asyncio.run(worker.check_health())  # not yet: a slow probe is not a hang
    clock[0] += 1
    worker._started = clock[0] - 10  # just started: a first token may wait on compilation
    asyncio.run(worker.check_health())
    worker._started = float("-inf")
    if fails:
        with pytest.raises(RuntimeError, match="unhealthy for 60 s: stuck"):
            asyncio.run(worker.check_health())
    else:
        asyncio.run(worker.check_health())
    engine.healthy = True  # recovered: the clock starts over
    asyncio.run(worker.check_health())
    engine.healthy = False
    asyncio.run(worker.check_health())


def test_the_start_up_grace_counts_from_the_engine_loaded(monkeypatch):
    """SGLang loads the weights in its constructor: 400 s from a cold volume used up the
    grace meant for a first token waiting on compilation, and a slow first probe had the
    replica replaced, to load again."""
    from cluster.settings import parse_settings

    clock = [1000.0]
    monkeypatch.setattr(engine_host.time, "monotonic", lambda: clock[0])
    engine = Engine(probed=True)

    def loading(*args, **kwargs):
        clock[0] += 400  # the weights, from a cold volume
        return engine

    monkeypatch.setattr(engine_host, "build_engine", loading)
    monkeypatch.setattr(engine_host, "build_handoff", lambda *args, **kwargs: None)
    settings = parse_settings({"auth": {"enabled": False}, "engine": {"kind": "simulated"}})
    worker = EngineHost(settings.worker("fast"))
    engine.healthy, engine.running = False, 1  # its first probe is slow
    asyncio.run(worker.check_health())
    clock[0] += UNHEALTHY_FOR_S + 1
    asyncio.run(worker.check_health())  # within the grace: compiling, not hung
    clock[0] += engine_host.STARTUP_GRACE_S
    with pytest.raises(RuntimeError, match="unhealthy"):
        asyncio.run(worker.check_health())
