"""The cache-aware prefill router on Ray Serve's real `RequestRouter` base: a prompt goes where
its prefix was sent, unless that replica's queue makes it slower; a hot prefix cannot pin one
replica; replicas that leave drop out; reports trim the index."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from ray.serve._private.common import (DeploymentHandleSource, DeploymentID, ReplicaID,
                                       RequestMetadata)
from ray.serve.request_router import PendingRequest

from services.engines.protocol import EngineRequest, SamplingParams
from services.workers import router_state
from services.workers.prefix_router import CacheAwareRouter

BLOCK = 16
DEPLOYMENT = DeploymentID(name="fast-prefill", app_name="small4")


@dataclass
class Replica:
    """What the router reads of Serve's RunningReplica."""

    replica_id: ReplicaID
    max_ongoing_requests: int = 64


@pytest.fixture
def router():
    async def make():
        r = CacheAwareRouter(DEPLOYMENT, DeploymentHandleSource.REPLICA)
        r.initialize_state(block_tokens=BLOCK, capacity_tokens=64 * BLOCK, max_imbalance=1.5,
                           share_interval_s=0)  # no Ray here: see the sharing test
        return r
    return asyncio.run(make())


def replicas(n: int) -> list[Replica]:
    return [Replica(ReplicaID(f"r{i}", DEPLOYMENT)) for i in range(n)]


count = iter(range(10**6))


def pending(prompt: list[int], salt: str = "t", internal: str | None = None
            ) -> PendingRequest:
    """A prefill call; `internal`: the internal id of the request making it (Serve gives every
    call a request makes that request's id), by default one of its own."""
    request = EngineRequest(f"q{next(count)}", prompt, SamplingParams(max_tokens=4),
                            cache_salt=salt)
    metadata = RequestMetadata(request_id=request.request_id,
                               internal_request_id=internal or request.request_id)
    return PendingRequest(args=[object(), request], kwargs={}, metadata=metadata,
                          future=None)


def route(router, candidates, request) -> Replica:
    ranks = asyncio.run(router.choose_replicas(candidates, request))
    chosen = ranks[0][0]
    router.on_request_routed(request, chosen.replica_id, None)
    return chosen


def conversation(k: int, turns: int) -> list[list[int]]:
    """Prompts of one conversation: each turn extends the last."""
    system = [1000 + k] * (8 * BLOCK)
    return [system + list(range(2000, 2000 + 3 * BLOCK * (t + 1))) for t in range(turns)]


def test_each_conversation_stays_on_the_replica_that_holds_its_prefix(router):
    pool = replicas(3)
    homes = {}
    for turn in range(4):
        for k in range(6):
            request = pending(conversation(k, 4)[turn])
            chosen = route(router, pool, request)
            router.on_request_completed(chosen.replica_id,
                                        request.metadata.internal_request_id)
            homes.setdefault(k, set()).add(chosen.replica_id)
    assert all(len(h) == 1 for h in homes.values()), homes
    assert len(set().union(*homes.values())) == 3  # new conversations go to the emptier caches
    assert router.decisions["predicted_hit_tokens"] > 0


def test_a_hot_prefix_spills_over_when_its_replica_queues(router):
    pool = replicas(2)
    prompt = conversation(0, 1)[0]
    chosen = [route(router, pool, pending(prompt)).replica_id for _ in range(12)]
    assert len(set(chosen)) == 2, "one replica took every request of a hot prefix"
    queued = sorted(router.queued.values())
    assert queued[-1] <= 1.5 * queued[0] + len(prompt)


def test_a_hot_long_prefix_whose_hits_queue_little_still_spreads_its_calls():
    """A long shared prefix prefilled on one replica, then many calls with short tails: each
    queues a few uncached tokens there, so the token ceiling would let ~240 pile onto it
    (every one still costs its whole prompt there). The calls guard spreads them."""
    async def make():
        r = CacheAwareRouter(DEPLOYMENT, DeploymentHandleSource.REPLICA)
        r.initialize_state(block_tokens=BLOCK, capacity_tokens=4096 * BLOCK, share_interval_s=0)
        return r
    router = asyncio.run(make())
    pool = replicas(2)
    system = [7] * (256 * BLOCK)
    warm = pending(system + [1])
    home = route(router, pool, warm)
    router.prefilled(warm.args[1].request_id, 0)
    router.on_request_completed(home.replica_id, warm.metadata.internal_request_id)
    tails = iter(range(10_000, 10**6, BLOCK))
    chosen = [route(router, pool, pending(system + list(range(next(tails), next(tails) + BLOCK))))
              .replica_id for _ in range(40)]
    assert min(chosen.count(r.replica_id) for r in pool) >= 12, chosen.count(home.replica_id)


def test_calls_past_their_prefill_do_not_count_for_the_guard(router):
    """On the concurrent handoff a call stays open until its decode stream ends: those
    streams are no load on the prefill replica, and counting them sent every call to a
    replica just started (no hit there)."""
    router.load_tokens = 0  # no recent-load term: the guard alone keeps a turn off home
    pool = replicas(2)
    system = [7] * (8 * BLOCK)
    home = route(router, pool, pending(system + [1]))
    for i in range(12):  # prefilled and replied; their calls stay open (streams decoding)
        request = pending(system + list(range(100 + 20 * i, 120 + 20 * i)))
        router.on_request_routed(request, home.replica_id, None)
        router.prefilled(request.args[1].request_id, 8 * BLOCK)
    router.prefilled(next(iter(router.by_request)), 0)
    assert router.open[home.replica_id] == 13 and router.prefilling[home.replica_id] == 0
    turn = pending(system + list(range(900, 920)))
    assert route(router, pool, turn) is home


def test_a_turn_returns_to_its_replica_once_the_last_turns_prefill_reported(router):
    """The call of the last turn stays open while decode fetches its KV; its prefill is done,
    so it no longer counts as queued there and the next turn goes where its history is."""
    pool = replicas(2)
    first, second = conversation(3, 2)
    request = pending(first)
    home = route(router, pool, request)
    assert router.queued[home.replica_id] == len(first)
    router_state.correct(home.replica_id.unique_id, 10**6, request.args[1].request_id,
                         cached_tokens=0)
    assert router.queued[home.replica_id] == 0 and router.open[home.replica_id] == 1
    assert route(router, pool, pending(second)) is home  # call 1 not yet completed
    assert router.decisions["predicted_hit_tokens"] == len(first) // BLOCK * BLOCK


@pytest.mark.parametrize("weight", [1.0, 3.0])
def test_recompute_weight_sets_how_long_a_queue_a_hit_is_worth(weight):
    """A turn's home replica holds its history but queues other prompts: at weight 1 the idle
    replica wins as soon as the queue is longer than what the hit saves; at weight 3 the hit
    keeps the turn home until the queue is longer than 3 x that (the cost counts what
    recomputing costs the requests after it), and no further (the guard scales with it)."""
    async def make():
        r = CacheAwareRouter(DEPLOYMENT, DeploymentHandleSource.REPLICA)
        r.initialize_state(block_tokens=BLOCK, capacity_tokens=64 * BLOCK, max_imbalance=1.5,
                           load_blocks=0, recompute_weight=weight, share_interval_s=0)
        return r
    router = asyncio.run(make())
    pool = replicas(2)
    first, second = conversation(5, 2)
    request = pending(first)
    home = route(router, pool, request)
    router_state.correct(home.replica_id.unique_id, 10**6, request.args[1].request_id, 0)
    other = next(r for r in pool if r is not home)
    saved = len(first) // BLOCK * BLOCK  # what a hit at home saves
    router.queued[home.replica_id] = 2 * saved  # two such prompts ahead of it there
    assert (route(router, pool, pending(second)) is home) == (weight == 3.0)
    router.queued[home.replica_id] = 4 * saved
    router.queued[other.replica_id] = 0
    assert route(router, pool, pending(second)) is other


def test_calls_other_routers_sent_count_as_queued_tokens(router):
    """Serve's probe sees calls there beyond this router's own: each costs the mean uncached
    prompt, so a replica busy with other callers' prefills loses a small hit."""
    pool = replicas(2)
    prompt = conversation(4, 1)[0]
    home = route(router, pool, pending(prompt))
    router.on_request_completed(home.replica_id, "unknown")  # nothing of ours settles
    router_state.correct(home.replica_id.unique_id, 10**6, "nobody", 0)
    other = next(r for r in pool if r is not home)
    idle = router.queued_tokens(other)
    router.replica_queue_len_cache.update(home.replica_id, 1 + 40)  # ours + 40 of others'
    assert router.queued_tokens(home) == pytest.approx(
        router.queued[home.replica_id] + 40 * router.mean_uncached)
    assert route(router, pool, pending(prompt + [7] * BLOCK)) is other
    assert idle == 0


def test_new_conversations_go_where_fewer_live_ones_send_turns(router):
    """A conversation's turns follow its history, so where many turns were routed lately more
    will come: a new conversation (no hit anywhere) goes to the replica with fewer recent
    requests even if it holds more KV; the busy conversation's own next turn stays home."""
    pool = replicas(2)

    def done(request):
        chosen = route(router, pool, request)
        router.on_request_completed(chosen.replica_id, request.metadata.internal_request_id)
        return chosen

    big = done(pending([5] * (80 * BLOCK)))  # one long prompt: much KV, one request
    turns = [[6] * (40 * BLOCK) + list(range(3 * BLOCK * (t + 1))) for t in range(6)]
    home = done(pending(turns[0]))
    assert home is not big
    for prompt in turns[1:5]:
        assert done(pending(prompt)) is home
    assert len(router.index[big.replica_id]) > len(router.index[home.replica_id])
    assert done(pending([7] * (40 * BLOCK))) is big
    assert done(pending(turns[5])) is home


def test_salts_keep_tenants_apart_in_the_index(router):
    pool = replicas(2)
    prompt = conversation(1, 1)[0]
    first = route(router, pool, pending(prompt, salt="a"))
    router.on_request_completed(first.replica_id, "x")
    chain = [key for _, key in router.keys.chain(prompt, "b")]
    assert router.predicted_hit(first.replica_id, chain) == 0


def test_a_replica_that_leaves_drops_out_and_reports_trim_the_index(router):
    pool = replicas(2)
    request = pending(conversation(2, 1)[0])
    home = route(router, pool, request)
    assert router.index[home.replica_id]
    # its own prefill's reply: the engine holds two blocks of prompt KV now
    router_state.correct(home.replica_id.unique_id, 2 * BLOCK, request.args[1].request_id, 0)
    assert len(router.index[home.replica_id]) == 2
    # the engine evicts a chain from its tail: what the index keeps is the prompt's head
    chain = [key for _, key in router.keys.chain(request.args[1].prompt_ids, "t")]
    assert router.predicted_hit(home.replica_id, chain) == 2 * BLOCK
    router.on_replica_actor_died(home.replica_id)
    assert home.replica_id not in router.index and home.replica_id not in router.queued


def test_one_replica_is_handed_back_and_other_calls_are_spread(router):
    one = replicas(1)
    assert asyncio.run(router.choose_replicas(one, pending([1, 2, 3]))) == [one]
    other = PendingRequest(args=["not a prompt"], kwargs={},
                           metadata=RequestMetadata(request_id="h", internal_request_id="h"),
                           future=None)
    ranks = asyncio.run(router.choose_replicas(replicas(3), other))
    assert len(ranks) == 1 and len(ranks[0]) == 3


def test_a_lone_replica_costs_no_hashing_and_news_of_unlisted_replicas_is_dropped(router):
    """With one replica listed there is nothing to choose: its calls are counted (the load
    stays known if more come) but their prompts are not hashed or indexed. Another router's
    news of a replica this one does not list (one that died before) indexes nothing."""
    one, = replicas(1)

    async def listed():  # Serve lists replicas on its loop
        router.update_replicas([one])
    asyncio.run(listed())
    request = pending(conversation(0, 1)[0])
    assert route(router, [one], request) is one
    assert router.open[one.replica_id] == 1 and not router.index.get(one.replica_id)
    dead = replicas(3)[2].replica_id
    router.learn(dead, [b"k"] * 4)
    assert dead not in router.index and dead not in router.recent


def test_chains_hashed_for_calls_never_routed_are_bounded_by_their_keys(router, monkeypatch):
    """A call cancelled while it waited for a replica leaves the chain hashed for it: they are
    kept up to a number of keys, not of calls (4,096 chains of a 256K prompt were ~2 GB)."""
    # the globals the class reads (Serve may have loaded its module again, by value)
    monkeypatch.setitem(CacheAwareRouter._chain.__globals__, "MAX_CHAIN_KEYS", 100)
    for _ in range(12):  # 20 blocks each, never routed
        asyncio.run(router.choose_replicas(replicas(2), pending([7] * (20 * BLOCK))))
    assert router._chain_keys == sum(map(len, router._chains.values())) <= 100
    assert len(router._chains) == 5


def test_prefill_roles_that_may_have_several_replicas_get_the_router():
    from cluster.settings import RAY_PREFIX_ROUTER, parse_settings

    def options(prefill: dict, cache: bool = True, **routing):
        settings = parse_settings({"pools": {"fast": {"effort": "none", "prefill": prefill},
                                             "deep": {"effort": "high"}},
                                   "engine": {"prefix_cache": {"enabled": cache}},
                                   "routing": {"prefix": routing}, "auth": {"enabled": False}})
        return settings.role_options("fast", "prefill")

    config = options({"replicas": 2})["request_router_config"]
    assert config.request_router_class.endswith("prefix_router.CacheAwareRouter")
    assert config.request_router_kwargs["block_tokens"] == 64
    tuned = options({"replicas": 2}, load_blocks=0.5, load_half_life_s=5.0,
                    recompute_weight=3.0, share_interval_s=0.5)
    kwargs = tuned["request_router_config"].request_router_kwargs
    assert (kwargs["load_blocks"], kwargs["load_half_life_s"], kwargs["recompute_weight"],
            kwargs["share_interval_s"]) == (0.5, 5.0, 3.0, 0.5)
    assert "request_router_config" not in options({"replicas": 1})
    assert "request_router_config" not in options({"replicas": 2}, router="serve_default")
    assert "request_router_config" not in options({"replicas": 2}, cache=False)
    ray_own = options({"replicas": 2}, router="ray_prefix_affinity")["request_router_config"]
    assert ray_own.request_router_class == RAY_PREFIX_ROUTER


def test_recent_load_fades_at_its_half_life():
    """`routing.prefix.load_half_life_s`: the recent requests a replica was sent count half
    as much once that long has passed."""
    async def make(half_life_s: float):
        r = CacheAwareRouter(DEPLOYMENT, DeploymentHandleSource.REPLICA)
        r.initialize_state(block_tokens=BLOCK, load_half_life_s=half_life_s, share_interval_s=0)
        return r

    for half_life_s in (5.0, 30.0):
        r = asyncio.run(make(half_life_s))
        replica = ReplicaID("r0", DEPLOYMENT)
        r.recent[replica] = (8.0, 100.0)
        assert r.recent_requests(replica, now=100.0 + half_life_s) == pytest.approx(4.0)
        assert r.recent_requests(replica, now=100.0 + 2 * half_life_s) == pytest.approx(2.0)


def test_calls_of_one_request_are_counted_each_on_its_own(router):
    """A request's `n` prefills (and an abort beside them) share its internal id: each is
    queued where it went, a reply takes that one's tokens off, and each completion settles
    one call there, so everything is back to zero when all have ended."""
    pool = replicas(2)
    prompt = conversation(3, 1)[0]
    siblings = [pending(prompt, internal="req-1") for _ in range(3)]
    chosen = [route(router, pool, call) for call in siblings]
    assert sum(router.open.values()) == 3
    assert sum(router.queued.values()) >= 3 * BLOCK
    abort = PendingRequest(args=[object(), siblings[0].args[1].request_id], kwargs={},
                           metadata=siblings[0].metadata, future=None)
    router.on_request_routed(abort, chosen[0].replica_id, None)
    assert sum(router.open.values()) == 4
    first = siblings[0].args[1]
    router_state.correct(chosen[0].replica_id.unique_id, 10**6, first.request_id, 0)
    others = sum(router.queued.values())
    assert 0 < others < 3 * len(prompt)
    for replica in chosen:
        router.on_request_completed(replica.replica_id, "req-1")
    router.on_request_completed(chosen[0].replica_id, "req-1")  # the abort
    assert sum(router.open.values()) == 0 and sum(router.queued.values()) == 0
    assert router.routed == {} and router.by_request == {}


def test_a_replica_chosen_for_a_call_goes_to_that_call_not_its_sibling():
    """Serve's base router hands a chosen replica to the waiting call with the chosen call's
    internal id, and a request's calls share it: the second of two waiting siblings was never
    matched. It goes to the call it was chosen for (Serve's own matching, driven here)."""
    async def go():
        router = CacheAwareRouter(DEPLOYMENT, DeploymentHandleSource.REPLICA)
        router.initialize_state(block_tokens=BLOCK, share_interval_s=0)
        loop = asyncio.get_running_loop()
        calls = [pending([1] * BLOCK, internal="req-2") for _ in range(2)]
        for call in calls:
            call.future = loop.create_future()
            router._pending_requests_to_fulfill.append(call)
            router._add_pending_request_to_indices(call)
        one, two = replicas(2)
        router._fulfill_next_pending_request(two, calls[1].metadata)
        router._fulfill_next_pending_request(one, calls[0].metadata)
        return [call.future.result() for call in calls]

    assert [r.replica_id.unique_id for r in asyncio.run(go())] == ["r0", "r1"]


def test_a_call_routed_just_before_its_replica_left_brings_nothing_of_it_back(router):
    pool = replicas(2)
    gone = route(router, pool, pending(conversation(5, 1)[0]))
    router.on_replica_actor_died(gone.replica_id)
    request = pending(conversation(6, 1)[0])
    router.on_request_routed(request, gone.replica_id, None)
    assert gone.replica_id not in router.index and gone.replica_id not in router.open
    assert request.args[1].request_id not in router.by_request


def test_a_replica_listed_again_after_it_left_is_routed_and_counted_again():
    pool = replicas(2)

    async def go():
        router = CacheAwareRouter(DEPLOYMENT, DeploymentHandleSource.REPLICA)
        router.initialize_state(block_tokens=BLOCK, share_interval_s=0)
        router.update_replicas(pool)
        router.update_replicas(pool[:1])  # pool[1] unreachable a moment
        left = pool[1].replica_id in router.gone
        router.update_replicas(pool)
        router.on_request_routed(pending(conversation(8, 1)[0]), pool[1].replica_id, None)
        return left, router.open.get(pool[1].replica_id)

    assert asyncio.run(go()) == (True, 1)


def test_a_prompts_blocks_from_its_first_image_on_predict_no_hit(router, tokenizer):
    """The engines key a block by the images beginning in it, which a router does not see:
    two requests of one template with other images have the same ids. Only the text before
    the first image is predicted to hit."""
    img = tokenizer.special("[IMG]")
    text = [1000 + i for i in range(4 * BLOCK)]
    prompt = text + [img] * (4 * BLOCK) + [7] * BLOCK
    pool = replicas(2)
    first = pending(prompt)
    first.args[1].images = ["pixels of one photo"]
    home = route(router, pool, first)
    second = pending(prompt)
    second.args[1].images = ["pixels of another"]
    chain = router._chain(second, second.args[1])
    assert router.predicted_hit(home.replica_id, chain) == 4 * BLOCK
    text_only = pending(prompt)
    assert len(router._chain(text_only, text_only.args[1])) == len(prompt) // BLOCK


def test_a_reply_keeps_the_blocks_of_prefills_still_running_there(router):
    """A prefill's reply reports what its engine holds then; prompts routed there after it,
    still prefilling, are indexed but not held yet: trimming to the report must not make room
    for them by dropping what the engine does hold."""
    pool = replicas(2)
    first, second = pending([1] * (4 * BLOCK) + [5]), pending([2] * (4 * BLOCK) + [5])
    for call in (first, second):
        asyncio.run(router.choose_replicas(pool, call))
        router.on_request_routed(call, pool[0].replica_id, None)
    # the first prefill ran; the engine holds its four blocks (the second has not run yet)
    router_state.correct("r0", 4 * BLOCK, first.args[1].request_id, 0)
    for call in (first, second):
        chain = [key for _, key in router.keys.chain(call.args[1].prompt_ids, "t")]
        assert router.predicted_hit(pool[0].replica_id, chain) == 4 * BLOCK
    # once the second has reported too, its blocks count as held like any others
    router_state.correct("r0", 4 * BLOCK, second.args[1].request_id, 0)
    assert len(router.index[pool[0].replica_id]) == 4 and router.unfilled[pool[0].replica_id] == 0


class Result:
    """What the router reads of Serve's ReplicaResult: its completion callbacks (Serve runs
    them on another thread)."""

    def __init__(self):
        self.callbacks = []

    def add_done_callback(self, callback):
        self.callbacks.append(callback)

    def complete(self):
        import threading

        for callback in self.callbacks:
            thread = threading.Thread(target=callback, args=(self,))
            thread.start()
            thread.join()


def test_a_rejected_sibling_does_not_settle_the_call_that_was_routed(router):
    """A replica at its `max_ongoing_requests` rejects a call; Serve cancels it, which fires
    the completion hook, naming the request's internal id, for a call never routed. A routed
    sibling (the same request's other choice) keeps its accounting until its own result
    completes."""
    pool = replicas(2)
    prompt = conversation(4, 1)[0]
    routed, rejected = (pending(prompt, internal="req-2") for _ in range(2))
    result = Result()

    async def scenario():
        await router.choose_replicas(pool, routed)
        router.on_request_routed(routed, pool[0].replica_id, result)
        await router.choose_replicas(pool, rejected)  # sent to r0, which rejects it
        router.on_request_completed(pool[0].replica_id, "req-2")
        counts = (router.open.get(pool[0].replica_id), router.queued.get(pool[0].replica_id),
                  router.prefilling.get(pool[0].replica_id))
        result.complete()
        await asyncio.sleep(0)  # the completion is put on the router's loop
        router.on_request_completed(pool[0].replica_id, "req-2")  # Serve's hook for it
        return counts

    open_, queued, prefilling = asyncio.run(scenario())
    assert open_ == 1 and prefilling == 1 and queued > 0
    assert router.open[pool[0].replica_id] == 0 and router.queued[pool[0].replica_id] == 0
    assert router.prefilling[pool[0].replica_id] == 0 and router.routed == {}


def test_a_reply_handed_over_from_another_thread_is_applied_on_the_routers_loop(router):
    """With `ray.throughput_optimized` off Serve routes on a loop of its own thread, and the
    caller's code hands prefill replies over from another: the router's state is changed on
    its loop only."""
    import threading

    pool = replicas(2)
    call = pending(conversation(5, 1)[0])
    seen = []
    prefilled = router.prefilled
    router.prefilled = lambda *args: (seen.append(threading.get_ident()), prefilled(*args))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        async def routed():
            await router.choose_replicas(pool, call)
            router.on_request_routed(call, pool[0].replica_id, Result())
        asyncio.run_coroutine_threadsafe(routed(), loop).result(10)
        router_state.correct("r0", 10**6, call.args[1].request_id, 0)  # from this thread
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    assert seen == [thread.ident]
    assert router.queued[pool[0].replica_id] == 0


def test_a_retried_calls_earlier_leg_is_settled_once(router):
    """A retry settles its earlier leg when routed; that leg's own completion, later, takes
    nothing off the retry's counts."""
    pool = replicas(2)
    call = pending(conversation(6, 1)[0])
    first, second = Result(), Result()

    async def scenario():
        await router.choose_replicas(pool, call)
        router.on_request_routed(call, pool[0].replica_id, first)
        await router.choose_replicas(pool, call)
        router.on_request_routed(call, pool[0].replica_id, second)
        first.complete()
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert router.open[pool[0].replica_id] == 1 and router.prefilling[pool[0].replica_id] == 1
    assert router.queued[pool[0].replica_id] > 0


def test_on_a_concurrent_handoff_the_probe_is_not_read_as_other_routers_prefills():
    """On `paired` and `sglang` a prefill call is open until its decode stream ends: Serve's
    probe counts streams there, and reading them as other routers' queued prefills sent a turn
    away from its history. The sequential handoffs keep reading it."""
    from cluster.settings import parse_settings

    def kwargs(backend: str) -> dict:
        settings = parse_settings({
            "pools": {"fast": {"effort": "none", "prefill": {"replicas": 2}},
                      "deep": {"effort": "high"}},
            "kv_handoff": {"backend": backend}, "auth": {"enabled": False}})
        return settings.role_options("fast", "prefill")[
            "request_router_config"].request_router_kwargs

    assert kwargs("object_store")["probe_others"] is True
    assert kwargs("paired")["probe_others"] is False

    async def make():
        r = CacheAwareRouter(DEPLOYMENT, DeploymentHandleSource.REPLICA)
        r.initialize_state(block_tokens=BLOCK, capacity_tokens=64 * BLOCK,
                           share_interval_s=0, probe_others=False)
        return r
    router = asyncio.run(make())
    pool = replicas(2)
    prompt = conversation(7, 1)[0]
    home = route(router, pool, pending(prompt))
    router_state.correct(home.replica_id.unique_id, 10**6, "nobody", 0)
    router.on_request_completed(home.replica_id, next(iter(router.routed)))
    router.replica_queue_len_cache.update(home.replica_id, 40)  # others' decode streams
    assert router.queued_tokens(home) == 0
    assert route(router, pool, pending(prompt + [7] * BLOCK)) is home
