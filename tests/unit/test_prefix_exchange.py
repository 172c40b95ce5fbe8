"""The cache-aware routers of one prefill deployment share their decisions (one router per
calling process: each ingress and decode replica): a turn routed from one process finds the
history another process's router sent somewhere; news of a replica that left is ignored; a log
that was lost (its actor died) is started over; decisions made while the log cannot be reached
are sent once it can. The shared log here is the actor's own class, held in-process."""

from __future__ import annotations

import asyncio
import time
import subprocess
import sys
import threading
from pathlib import Path

from ray.serve._private.common import DeploymentHandleSource

from services.workers import prefix_exchange
from services.workers.prefix_exchange import DecisionLog
from services.workers.prefix_router import CacheAwareRouter
from tests.unit.test_prefix_router import BLOCK, DEPLOYMENT, conversation, pending, replicas


class InProcess:
    """A `DecisionLog` called as the router calls the actor (awaited)."""

    def __init__(self, log: DecisionLog):
        self.log, self.calls = log, 0

    async def exchange(self, *args):
        self.calls += 1
        return self.log.exchange(*args)


class Unreachable:
    async def exchange(self, *args):
        raise ConnectionError("the log's actor is gone")


def make_router(connect) -> CacheAwareRouter:
    async def make():
        r = CacheAwareRouter(DEPLOYMENT, DeploymentHandleSource.REPLICA)
        r.initialize_state(block_tokens=BLOCK, capacity_tokens=64 * BLOCK, share_interval_s=0.1)
        r.sharing.connect = connect
        return r
    return asyncio.run(make())


def route(router, candidates, request):
    """One choice in its own event loop (the sharing loop starts with it and catches up first,
    as after an idle stop), then the routed bookkeeping."""
    chosen = asyncio.run(router.choose_replicas(candidates, request))[0][0]
    router.on_request_routed(request, chosen.replica_id, None)
    router.on_request_completed(chosen.replica_id, request.metadata.internal_request_id)
    return chosen


def sync(router):
    asyncio.run(router.sharing.sync(router.learn))


def test_a_turn_routed_from_another_process_finds_the_history_where_it_went():
    log = DecisionLog()
    ingress_a, ingress_b = (make_router(lambda: InProcess(log)) for _ in range(2))
    pool = replicas(3)
    for k in range(6):  # every first turn from A, every second turn from B
        first, second = conversation(k, 2)
        home = route(ingress_a, pool, pending(first))
        sync(ingress_a)  # A's loop sends its decisions every share_interval_s
        assert route(ingress_b, pool, pending(second)) is home, k
    assert ingress_b.sharing.learned == 6
    assert ingress_b.decisions["predicted_hit_tokens"] > 0


def test_without_sharing_the_other_process_routes_blind():
    """The case the sharing exists for: B's own index knows nothing of A's decisions."""
    ingress_a, ingress_b = (make_router(lambda: Unreachable()) for _ in range(2))
    pool = replicas(3)
    for k in range(6):
        first, second = conversation(k, 2)
        route(ingress_a, pool, pending(first))
        route(ingress_b, pool, pending(second))
    assert ingress_b.decisions["predicted_hit_tokens"] == 0


def test_news_of_a_replica_that_left_is_ignored():
    log = DecisionLog()
    ingress_a, ingress_b = (make_router(lambda: InProcess(log)) for _ in range(2))
    pool = replicas(2)
    home = route(ingress_a, pool, pending(conversation(0, 1)[0]))
    ingress_b.on_replica_actor_died(home.replica_id)
    sync(ingress_a)
    sync(ingress_b)
    assert home.replica_id not in ingress_b.index


def test_a_lost_log_is_started_over_and_held_decisions_are_sent_once_it_answers():
    logs = [DecisionLog()]
    reachable = [True]

    def connect():
        return InProcess(logs[-1]) if reachable[0] else Unreachable()

    ingress_a, ingress_b = make_router(connect), make_router(connect)
    pool = replicas(2)
    first = route(ingress_a, pool, pending(conversation(0, 1)[0]))
    sync(ingress_a)
    sync(ingress_b)
    assert ingress_b.sharing.learned == 1
    logs.append(DecisionLog())  # the actor died with its process; the next router made one
    reachable[0] = False
    ingress_a.sharing.log = ingress_b.sharing.log = None
    second = route(ingress_a, pool, pending(conversation(1, 1)[0]))
    sync(ingress_a)
    assert len(ingress_a.sharing.outbox) == 1  # kept while the log could not be reached
    reachable[0] = True
    sync(ingress_a)
    assert not ingress_a.sharing.outbox
    sync(ingress_b)  # B read up to seq 1 of the old log: the new epoch starts it over
    assert ingress_b.sharing.learned == 2
    chain = [key for _, key in ingress_b.keys.chain(conversation(1, 1)[0], "t")]
    assert ingress_b.predicted_hit(second.replica_id, chain) > 0
    assert first.replica_id in ingress_b.index


def test_the_log_is_bounded_in_keys_and_a_reader_far_behind_gets_what_is_kept():
    log = DecisionLog(max_keys=12)  # a decision counts its keys and itself: 3 here
    for i in range(10):
        log.exchange("a", [(f"r{i % 2}", [bytes([i]), b"x"])], "", 0)
    epoch, seq, news = log.exchange("b", [], log.epoch, 2)
    assert seq == 10 and len(log.entries) == 4 and log.keys == 12
    assert [keys for _, keys in news] == [[bytes([i]), b"x"] for i in range(6, 10)]
    _, _, none_new = log.exchange("b", [], epoch, seq)
    assert none_new == []
    _, _, own = log.exchange("a", [], epoch, 0)
    assert own == []  # a router never reads its own decisions back
    short = DecisionLog(max_keys=100)  # prompts shorter than a block have no keys
    for i in range(1000):
        short.exchange("a", [("r0", [])], "", 0)
    assert len(short.entries) == 100


def test_a_reader_far_behind_gets_the_newest_decisions_up_to_a_bound_in_slices(monkeypatch):
    """A new router (unknown epoch) was sent the whole log, up to 1M keys (36 MB), and applied
    it in one step of its loop (535 ms measured): it gets the newest up to `reply_keys`, and
    applies them yielding to its loop every `LEARN_SLICE` keys."""
    log = DecisionLog(max_keys=1000)
    for i in range(100):
        log.exchange("a", [(f"r{i % 2}", [bytes([i]), b"x"])], "", 0)
    _, _, news = log.exchange("new", [], "not this epoch", 0, reply_keys=30)
    assert [keys[0] for _, keys in news] == [bytes([i]) for i in range(90, 100)]

    monkeypatch.setattr(prefix_exchange, "LEARN_SLICE", 24)  # keys: 8 decisions of 2 + 1
    yields, learned = [], []
    real_sleep = asyncio.sleep
    here = threading.get_ident()

    async def counting_sleep(delay):  # the module is shared: loops on other threads sleep too
        if threading.get_ident() == here:
            yields.append(delay)
        await real_sleep(delay)

    monkeypatch.setattr(prefix_exchange.asyncio, "sleep", counting_sleep)
    sharing = prefix_exchange.Sharing(lambda: InProcess(log), 0.01)
    asyncio.run(sharing.sync(lambda replica, keys: learned.append(keys)))
    assert len(learned) == 100 and len(yields) == 100 // 8


def test_a_router_holds_a_bounded_outbox_while_the_log_cannot_be_reached(monkeypatch):
    monkeypatch.setattr(prefix_exchange, "OUTBOX_KEYS", 9)
    router = make_router(lambda: Unreachable())
    route(router, replicas(2), pending(conversation(0, 1)[0]))  # sharing starts
    router.sharing.outbox.clear()
    router.sharing.outbox_keys = 0
    for i in range(5):
        router.sharing.routed(f"r{i}", [bytes([i]), b"x"])
        sync(router)
    assert [replica for replica, _ in router.sharing.outbox] == ["r2", "r3", "r4"]
    assert router.sharing.outbox_keys == 9


def test_a_router_that_sat_idle_catches_up_before_its_next_choice(monkeypatch):
    """Its loop stopped after `IDLE_STOP_S` without routing; the next choice restarts it and
    waits (at most `FIRST_SYNC_S`) for what the others routed meanwhile."""
    monkeypatch.setattr(prefix_exchange, "IDLE_STOP_S", 0.0)
    log = InProcess(DecisionLog())
    ingress_a, ingress_b = make_router(lambda: log), make_router(lambda: log)
    pool = replicas(3)
    first, second = conversation(9, 2)
    home = route(ingress_a, pool, pending(first))
    sync(ingress_a)
    calls = log.calls
    assert route(ingress_b, pool, pending(second)) is home
    assert log.calls == calls + 1


def test_a_deployment_with_one_replica_shares_nothing():
    router = make_router(lambda: InProcess(DecisionLog()))
    one = replicas(1)
    for _ in range(3):
        assert route(router, one, pending(conversation(0, 1)[0])) is one[0]
    assert not router.sharing.outbox and router.sharing.task is None


def test_share_interval_0_turns_sharing_off():
    async def make():
        r = CacheAwareRouter(DEPLOYMENT, DeploymentHandleSource.REPLICA)
        r.initialize_state(block_tokens=BLOCK, share_interval_s=0)
        return r
    assert asyncio.run(make()).sharing is None


def test_a_router_outside_ray_starts_no_ray():
    """Asking Ray whether this is an actor starts a local Ray when none runs: the router must
    not (a later `ray.init` in that process would fail). In a fresh process, as this one may
    hold the suite's Ray."""
    code = ("import ray\n"
            "from tests.unit.test_prefix_exchange import DecisionLog, InProcess, make_router\n"
            "router = make_router(lambda: InProcess(DecisionLog()))\n"
            "print(router.sharing.log is None, ray.is_initialized())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parents[2])
    assert done.stdout.split() == ["True", "False"], done.stderr[-2000:]


def test_finding_the_log_never_blocks_the_routing_loop():
    """Finding the log actor asks the GCS and blocks: it runs off the loop that routes every
    call of the process, so a slow GCS does not stall the routing meanwhile."""
    import threading

    log = DecisionLog()
    threads = []

    def slow_connect():
        threads.append(threading.current_thread())
        time.sleep(0.3)
        return InProcess(log)

    router = make_router(slow_connect)

    async def go():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        await router.sharing.sync(router.learn)
        ticker.cancel()
        return ticks

    assert asyncio.run(go()) >= 10
    assert threads and threads[0] is not threading.main_thread()
    assert router.sharing.log is not None


def test_a_lookup_that_outlives_a_round_is_waited_for_again_not_repeated(monkeypatch):
    import threading

    monkeypatch.setattr(prefix_exchange, "CALL_TIMEOUT_S", 0.05)
    log, release, calls = DecisionLog(), threading.Event(), []

    def hung_connect():
        calls.append(1)
        release.wait(5)
        return InProcess(log)

    router = make_router(hung_connect)
    for _ in range(3):  # rounds while the GCS hangs
        sync(router)
    assert len(calls) == 1 and router.sharing.log is None
    release.set()
    time.sleep(0.1)
    sync(router)
    assert len(calls) == 1 and router.sharing.log is not None
