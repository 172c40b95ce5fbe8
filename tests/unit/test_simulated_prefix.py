"""The simulator's prefix-cache model (issue #16): hits by routing, prefill only of the rest."""

from __future__ import annotations

from collections import deque

from autoscaling.perf import PerfModel
from autoscaling.simulator.engines import PrefillEngine
from autoscaling.simulator.prefix import PrefixCache, PrefixModel
from autoscaling.simulator.scenario import SimSettings, run
from autoscaling.simulator.workload import Request

PERF = PerfModel()


def request(rid: int, group: int, prompt: int = 4000, prefix: int = 3000,
            arrival: float = 0.0) -> Request:
    r = Request(rid, "fast", arrival, prompt, 100)
    r.group, r.prefix = group, prefix
    return r


def test_a_cached_prefix_is_not_prefilled_again():
    assert PERF.prefill_cached_s([(4000, 0)]) == PERF.prefill_s([4000])
    assert PERF.prefill_cached_s([(4000, 3000)]) < 0.5 * PERF.prefill_s([4000])


def test_the_cache_evicts_the_least_recently_used_prefix():
    cache = PrefixCache(capacity=7000)
    for g in (1, 2):
        cache.store(request(g, g))
    cache.hit(request(9, 1))
    cache.store(request(3, 1))  # 1 used again: 2 is the oldest
    cache.store(request(4, 3))
    assert cache.holds(request(5, 1)) and cache.holds(request(6, 3))
    assert not cache.holds(request(7, 2)) and cache.tokens <= 7000


def _serve(routing: str) -> float:
    """Two engines caching one prefix each; prompts of groups 0 and 1 alternate and the engine
    offered a prompt first rotates; the share of prefix tokens hit."""
    model = PrefixModel(share=0.75, routing=routing, cache_tokens=3000)
    engines = [PrefillEngine(PERF, model), PrefillEngine(PERF, model)]
    queue, now, done = deque(), 0.0, []
    for rid in range(40):
        queue.append(request(rid, rid % 2, arrival=now))
        first = (rid // 2) % 2
        for e in engines[first:] + engines[:first]:
            if queue and not e.busy:
                others = tuple(o for o in engines if o is not e)
                if e.start(queue, now, others) is not None:
                    done += e.finish(now + 1e-3)
        now += 1.0
    return sum(r.cached for r in done) / sum(r.prefix for r in done)


def test_cache_aware_routing_sends_a_prompt_where_its_prefix_is():
    # random: whichever engine is offered a prompt takes it, so both engines see both groups
    # and each evicts one for the other; cache-aware: each group sticks to its engine
    assert _serve("cache-aware") > 0.9
    assert _serve("cache-aware") > _serve("random")


def test_with_no_prefix_share_runs_are_unchanged():
    plain = run("steady", "ours", SimSettings(), seed=1, duration_s=120)
    off = run("steady", "ours", SimSettings(prefix=PrefixModel(share=0.0,
                                                                 routing="cache-aware")),
              seed=1, duration_s=120)
    assert plain == off and "prefix" not in plain
    on = run("steady", "static", SimSettings(prefix=PrefixModel(share=0.6)), seed=1,
             duration_s=300)
    assert 0 < on["prefix"]["hit_rate"] < 1
