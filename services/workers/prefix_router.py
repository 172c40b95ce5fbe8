"""Cache-aware routing of prefills, on Ray Serve's public `RequestRouter` API.

Each caller (a decode replica's handle to its pool's prefill deployment) keeps an approximate
index per prefill replica: the prompt blocks it has sent there, keyed as the engines' prefix
cache keys them (`services.engines.prefix_cache`: salted hash chain, `block_tokens` per block),
least recently used first and bounded by the replica's cache capacity (so the index forgets as
the engine evicts). A request goes where its prefill would start soonest and compute least,
both counted in prompt tokens:

    cost(replica) = `recompute_weight` × this prompt's tokens not cached there
                    + prefill tokens queued there
                    + `load_blocks` blocks × requests routed there lately (halving
                      every `load_half_life_s`; all settings of `routing.prefix`)

Queued tokens are the uncached tokens of the prefills this router sent there that have not yet
reported done (the decode worker hands each prefill's reply to `router_state.correct`; a call that
ends without one counts until it completes), plus, for calls of other routers that Serve's probe
sees there beyond this router's own, the mean uncached prompt each. No replica is chosen while its
queue exceeds `max_imbalance` × the shortest queue + `recompute_weight` × one prompt (a hot prefix
cannot pin one replica while others idle; the cost alone lets a replica's queue run that far ahead
before a hit there stops paying), nor while its prefills in flight (sent by this router, not yet
reported done) exceed `max_imbalance` × the fewest anywhere + `OPEN_SLACK`: hits queue few uncached
tokens, yet each still costs its whole prompt there (attention over the prefix, the KV handed to
decode), so a hot long prefix would otherwise draw every call to one replica. The last term is the
load the sessions living on a replica will bring back: a conversation's turns follow where its
history is, so a new conversation (no hit anywhere) goes where fewer live ones are, while a turn's
own history (thousands of tokens) outweighs it; among equal costs, the replica holding less KV wins.
A replica that dies or leaves drops out of the index; `router_state.correct` trims a replica's index
to the prompt KV its engine reports holding (its evictions). The routers of one deployment (one per
calling process: every ingress and decode replica) send each other their decisions every
`share_interval_s` through a small actor (`services.workers.prefix_exchange`), so a turn finds its
history wherever the last turn was routed from. With one replica the router only hands it back.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import ray
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from services.engines.prefix_cache import PrefixCache
from services.workers import prefix_exchange, router_state
from services.workers.call_match import PerCallMatch

# Chains hashed while choosing, kept until their call is routed: at most this many calls and
# keys (a key per block: 256K keys are 16M prompt tokens at 64 a block, ~10 MB)
MAX_CHAINS, MAX_CHAIN_KEYS = 4096, 262144
OPEN_SLACK = 4  # calls in flight a replica may run ahead of max_imbalance × the fewest


@dataclass(eq=False)
class _Routed:
    replica: ReplicaID
    request_id: str | None  # the EngineRequest's: what a prefill reply names (None: no prefill)
    tokens: int  # uncached prompt tokens expected to run there; 0 once the prefill reported
    prefilling: bool = False  # counted in `CacheAwareRouter.prefilling` until it reports
    blocks: int = 0  # blocks it added to the replica's index that its prefill has yet to fill
    tracked: bool = False  # settled by its own result's completion, not by Serve's hook
    settled: bool = False


class CacheAwareRouter(PerCallMatch, RequestRouter):
    """Prefix-cache-aware, load-guarded routing for prefill deployments (see the module)."""

    def initialize_state(self, block_tokens: int = 64, capacity_tokens: int = 262144,
                         max_imbalance: float = 1.5, load_blocks: float = 3.0,
                         load_half_life_s: float = 30.0, recompute_weight: float = 1.0,
                         share_interval_s: float = 0.1, model: dict | None = None,
                         probe_others: bool = True, **_: Any) -> None:
        self.keys = PrefixCache(block_tokens, capacity_tokens)  # its chain(), nothing stored
        self.model = model  # the served model's settings (its tokenizer), as a dict
        self.block_tokens = block_tokens
        self.capacity_blocks = max(1, capacity_tokens // block_tokens)
        self.max_imbalance = max_imbalance
        self.load_tokens = load_blocks * block_tokens  # per recent request
        self.load_half_life_s = load_half_life_s
        self.recompute_weight = recompute_weight
        # whether Serve's probe of a replica counts calls that are prefilling (sequential
        # handoffs); on a concurrent one it counts open decode streams (`prefill_router_options`)
        self.probe_others = probe_others
        self.recent: dict[ReplicaID, tuple[float, float]] = {}  # (decayed requests, at time)
        self.index: dict[ReplicaID, OrderedDict[bytes, None]] = {}
        self.queued: dict[ReplicaID, int] = {}  # uncached tokens routed, not yet prefilled
        self.open: dict[ReplicaID, int] = {}  # calls routed, not yet completed
        # prefills routed, not yet reported done: a call stays open after (its KV held for
        # decode; on the concurrent handoff until its decode stream ends), not in this count
        self.prefilling: dict[ReplicaID, int] = {}
        # blocks indexed for prefills not yet reported done: not in a replica's report yet
        self.unfilled: dict[ReplicaID, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop Serve routes on
        # the calls routed and not completed, by internal request id: every call one request
        # makes shares its id (its `n` prefills, an abort beside a retry; `call_match`)
        self.routed: dict[str, list[_Routed]] = {}
        self.by_request: dict[str, _Routed] = {}  # EngineRequest id -> its call
        self.mean_uncached = float(block_tokens)
        self.decisions = {"routed": 0, "predicted_hit_tokens": 0, "reported_hit_tokens": 0}
        # hashed while choosing, read when routed; by (internal request id, EngineRequest id);
        # bounded by the keys they hold (a call cancelled before it was routed leaves its own)
        self._chains: dict[tuple[str, str], list[bytes]] = {}
        self._chain_keys = 0
        self._img: int | None = None  # the `[IMG]` id, read from the tokenizer on first use
        self.live: set[ReplicaID] = set()
        self.gone: OrderedDict[ReplicaID, None] = OrderedDict()  # left: others' news ignored
        self.sharing = prefix_exchange.Sharing(self._connect, share_interval_s) \
            if share_interval_s > 0 else None
        # (asking an uninitialised Ray for its runtime context starts a local Ray)
        if (self.sharing is not None and ray.is_initialized()
                and ray.get_runtime_context().get_actor_id()):
            self.sharing.log = self._connect()  # in a replica: the first choice only reads
        router_state.register(self)  # for `router_state.correct` and `.prefilled`

    # ---- choice --------------------------------------------------------------------------
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if len(candidate_replicas) <= 1:
            return [candidate_replicas] if candidate_replicas else []
        request = _engine_request(pending_request)
        if request is None:
            return [random.sample(candidate_replicas, len(candidate_replicas))]
        if self.sharing is not None:
            await self.sharing.before_choice(self.learn)
        chain = self._chain(pending_request, request)
        scored = self.rank(candidate_replicas, chain, len(request.prompt_ids))
        return [[replica] for _, _, replica in scored]

    def rank(self, replicas: list[RunningReplica], chain: list[bytes],
             prompt_tokens: int) -> list[tuple[float, int, RunningReplica]]:
        """(cost, predicted hit tokens, replica), cheapest first; over-queued replicas last."""
        queued = {r.replica_id: self.queued_tokens(r) for r in replicas}
        ceiling = (self.max_imbalance * min(queued.values())
                   + self.recompute_weight * prompt_tokens)
        calls = {r.replica_id: self.calls_in_flight(r) for r in replicas}
        most_calls = self.max_imbalance * min(calls.values()) + OPEN_SLACK
        scored = []
        for replica in replicas:
            hit = min(self.predicted_hit(replica.replica_id, chain), prompt_tokens - 1)
            cost = self.recompute_weight * (prompt_tokens - hit) + queued[replica.replica_id] \
                + self.load_tokens * self.recent_requests(replica.replica_id)
            over = (queued[replica.replica_id] > ceiling
                    or calls[replica.replica_id] > most_calls)
            held = len(self.index.get(replica.replica_id, ()))  # ties: the emptier cache
            scored.append((over, cost, held, random.random(), hit, replica))
        scored.sort(key=lambda s: s[:4])
        return [(cost, hit, replica) for _, cost, _, _, hit, replica in scored]

    def predicted_hit(self, replica: ReplicaID, chain: list[bytes]) -> int:
        index = self.index.get(replica)
        hit = 0
        if index:
            for key in chain:
                if key not in index:
                    break
                hit += self.block_tokens
        return hit

    def queued_tokens(self, replica: RunningReplica) -> float:
        """Prefill tokens ahead of a new request there: this router's own not yet prefilled,
        and the mean uncached prompt for each call Serve's probe sees beyond this router's
        (where the probe counts prefills: `probe_others`)."""
        rid = replica.replica_id
        if not self.probe_others:
            return self.queued.get(rid, 0)
        probed = self.replica_queue_len_cache.get(rid) or 0
        others = max(0, probed - self.open.get(rid, 0))
        return self.queued.get(rid, 0) + others * self.mean_uncached

    def calls_in_flight(self, replica: RunningReplica) -> int:
        """Prefills this router sent to the replica that have not reported done (Serve's probe
        would also count calls past their prefill: decode streams, on the concurrent handoff,
        which would send every call to a replica just started)."""
        return self.prefilling.get(replica.replica_id, 0)

    def recent_requests(self, replica: ReplicaID, now: float | None = None) -> float:
        count, at = self.recent.get(replica, (0.0, 0.0))
        now = time.monotonic() if now is None else now
        return count * 0.5 ** ((now - at) / self.load_half_life_s)

    def _chain(self, pending: PendingRequest, request) -> list[bytes]:
        """The prompt's block keys, hashed once per request (choosing may be retried)."""
        rid = (pending.metadata.internal_request_id, request.request_id)
        if rid not in self._chains:
            chain = [key for _, key in self.keys.chain(self._before_images(request),
                                                       request.cache_salt)]
            while self._chains and (len(self._chains) >= MAX_CHAINS
                                    or self._chain_keys + len(chain) > MAX_CHAIN_KEYS):
                self._chain_keys -= len(self._chains.pop(next(iter(self._chains))))
            self._chains[rid] = chain
            self._chain_keys += len(chain)
        return self._chains[rid]

    def _take_chain(self, pending: PendingRequest, request) -> list[bytes]:
        """The chain hashed while choosing, forgotten here; hashed now only where a choice was
        made without it (a lone replica costs no hashing while this router has no other)."""
        chain = self._chains.pop((pending.metadata.internal_request_id, request.request_id),
                                 None)
        if chain is not None:
            self._chain_keys -= len(chain)
            return chain
        if len(self.live) <= 1:
            return []
        return [key for _, key in self.keys.chain(self._before_images(request),
                                                  request.cache_salt)]

    def _before_images(self, request) -> list[int]:
        """The prompt up to its first image: the engines key a block by the content of the
        images that begin in it, which a router does not see (two requests of one template
        and other images have the same ids: predicted a hit there, both missed)."""
        ids = request.prompt_ids
        if not request.images:
            return ids
        img = self._image_id()
        return ids[:next((i for i, t in enumerate(ids) if t == img), len(ids))]

    def _image_id(self) -> int:
        if self._img is None:
            from services.settings import ModelSettings
            from services.tokenizer import load_tokenizer

            path = ModelSettings(**self.model).tokenizer_file() if self.model else None
            self._img = load_tokenizer(path).special("[IMG]")
        return self._img

    # ---- bookkeeping ---------------------------------------------------------------------
    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: Any) -> None:
        internal = pending_request.metadata.internal_request_id
        if replica_id in self.gone:  # routed just before it left: nothing of it to keep
            request = _engine_request(pending_request)
            if request is not None:
                self._take_chain(pending_request, request)
            return
        calls = self.routed.setdefault(internal, [])
        request = _engine_request(pending_request)
        if request is None:  # no prefill (an abort): open until it completes, like any call
            calls.append(self._track(_Routed(replica_id, None, 0), internal, result))
            self.open[replica_id] = self.open.get(replica_id, 0) + 1
            return
        chain = self._take_chain(pending_request, request)
        prompt = len(request.prompt_ids)
        hit = min(self.predicted_hit(replica_id, chain), prompt - 1)
        tokens = prompt - hit
        for earlier in [c for c in calls if c.request_id == request.request_id]:
            self._settle(internal, earlier)  # a retried call: its earlier leg no longer counts
        routed = _Routed(replica_id, request.request_id, tokens, prefilling=True,
                         blocks=max(0, len(chain) - hit // self.block_tokens))
        self.prefilling[replica_id] = self.prefilling.get(replica_id, 0) + 1
        self.unfilled[replica_id] = self.unfilled.get(replica_id, 0) + routed.blocks
        self.routed.setdefault(internal, []).append(self._track(routed, internal, result))
        self.by_request[request.request_id] = routed
        self.queued[replica_id] = self.queued.get(replica_id, 0) + tokens
        self.open[replica_id] = self.open.get(replica_id, 0) + 1
        self.mean_uncached += (tokens - self.mean_uncached) / 16
        now = time.monotonic()
        self.recent[replica_id] = (self.recent_requests(replica_id, now) + 1, now)
        self.decisions["routed"] += 1
        self.decisions["predicted_hit_tokens"] += hit
        self._remember(replica_id, chain)
        if self.sharing is not None:
            self.sharing.routed(replica_id, chain)

    def _track(self, routed: _Routed, internal: str, result: Any) -> _Routed:
        """Settle `routed` when its own call's result completes. Serve's completion hook names
        only the replica and the request's internal id, which a request's calls share, and it
        also fires for a call the replica rejected (never routed: Serve cancels it and routes
        it again), which would settle a routed sibling's accounting in its place. Serve runs
        result callbacks on other threads: the settling is put on this router's loop."""
        loop = _running_loop()
        if loop is None or not hasattr(result, "add_done_callback"):
            return routed  # (tests) settled by the hook
        self._loop, routed.tracked = loop, True
        result.add_done_callback(
            lambda _: _soon(loop, self._settle, internal, routed))
        return routed

    def learn(self, replica_id: ReplicaID, chain: list[bytes]) -> None:
        """Another router of this deployment sent a prompt of `chain` to `replica_id` (news of
        a replica this router does not list is dropped: one that died before it listed
        replicas would otherwise stay indexed until the set next changed)."""
        if replica_id in self.gone or (self.live and replica_id not in self.live):
            return
        now = time.monotonic()
        self.recent[replica_id] = (self.recent_requests(replica_id, now) + 1, now)
        self._remember(replica_id, chain)

    def _remember(self, replica_id: ReplicaID, chain: list[bytes]) -> None:
        index = self.index.setdefault(replica_id, OrderedDict())
        for key in reversed(chain):  # the engine will hold these blocks once the prefill ran,
            index[key] = None  # and evicts a chain from its tail (`PrefixCache._touch`)
            index.move_to_end(key)
        while len(index) > self.capacity_blocks:
            index.popitem(last=False)

    def _connect(self):
        return prefix_exchange.actor_log(self._deployment_id.app_name, self._deployment_id.name)

    def report(self, replica_unique_id: str, held_tokens: int | None,
               request_id: str | None, cached_tokens: int) -> None:
        """What a prefill reply says (`router_state.correct`), applied on this router's loop:
        with `ray.throughput_optimized` off, Serve routes on a loop of its own, on another
        thread than the caller's code that hands the reply here."""
        if self._loop is not None and self._loop is not _running_loop():
            _soon(self._loop, self.report, replica_unique_id, held_tokens, request_id,
                  cached_tokens)
            return
        if request_id is not None:  # first: the held count includes this prefill's blocks
            self.prefilled(request_id, cached_tokens)
        if held_tokens is not None:
            self.correct_replica(replica_unique_id, held_tokens)

    def prefilled(self, request_id: str, cached_tokens: int) -> None:
        """The prefill of `request_id` ran (its reply came back, naming `cached_tokens`): its
        tokens leave the replica's queue now, not when the call closes after the KV handoff."""
        routed = self.by_request.get(request_id)
        if routed is not None:
            self._done_prefilling(routed)
        if routed is not None and routed.tokens:
            self.queued[routed.replica] = max(0, self.queued.get(routed.replica, 0)
                                              - routed.tokens)
            routed.tokens = 0
            self.decisions["reported_hit_tokens"] += cached_tokens

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """One of the request's calls to `replica_id` completed. Serve names only the request,
        so among its calls there, one whose prefill reported (or that had none) is taken
        first: a call completes after its prefill's reply, so it is most likely that one."""
        calls = [c for c in self.routed.get(internal_request_id, ())
                 if c.replica == replica_id and not c.tracked]
        if calls:
            self._settle(internal_request_id,
                         next((c for c in calls if not c.tokens), calls[0]))

    def _settle(self, internal_request_id: str, routed: _Routed) -> None:
        if routed.settled:  # (a retried call's earlier leg, then its own completion)
            return
        routed.settled = True
        calls = self.routed.get(internal_request_id, [])
        if routed in calls:
            calls.remove(routed)
        if not calls:
            self.routed.pop(internal_request_id, None)
        if routed.request_id is not None and self.by_request.get(routed.request_id) is routed:
            del self.by_request[routed.request_id]
        if routed.replica in self.queued:
            self.queued[routed.replica] = max(0, self.queued[routed.replica] - routed.tokens)
        if routed.replica in self.open:
            self.open[routed.replica] = max(0, self.open[routed.replica] - 1)
        self._done_prefilling(routed)

    def _done_prefilling(self, routed: _Routed) -> None:
        if routed.prefilling:
            routed.prefilling = False
            if routed.replica in self.prefilling:
                self.prefilling[routed.replica] = max(0, self.prefilling[routed.replica] - 1)
            if routed.replica in self.unfilled:
                self.unfilled[routed.replica] = max(0, self.unfilled[routed.replica]
                                                    - routed.blocks)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id for r in replicas}
        for gone in [r for r in set(self.index) | self.live if r not in live]:
            self._forget(gone)
        for back in live & set(self.gone):  # listed again (a replica only unreachable)
            del self.gone[back]
        self.live = live

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id)

    def _forget(self, replica_id: ReplicaID) -> None:
        self.gone[replica_id] = None
        while len(self.gone) > 1024:
            self.gone.popitem(last=False)
        self.index.pop(replica_id, None)
        self.queued.pop(replica_id, None)
        self.open.pop(replica_id, None)
        self.prefilling.pop(replica_id, None)
        self.unfilled.pop(replica_id, None)
        self.recent.pop(replica_id, None)

    def correct_replica(self, replica_unique_id: str, held_tokens: int) -> None:
        """The engine of `replica_unique_id` holds `held_tokens` of prompt KV now: keep no more
        than that many of the most recent blocks in its index (its evictions, as they happened,
        including those other callers' prompts caused), beside the blocks of this router's
        prefills still running there (indexed when routed, not held yet: counting them as
        held would trim as many blocks the engine does hold)."""
        for replica, index in list(self.index.items()):  # the router loop may add one
            if replica.unique_id == replica_unique_id:
                keep = held_tokens // self.block_tokens + self.unfilled.get(replica, 0)
                while len(index) > keep:
                    index.popitem(last=False)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _soon(loop: asyncio.AbstractEventLoop, callback, *args: Any) -> None:
    """`callback(*args)` on `loop` from any thread; dropped where that loop has closed (its
    router with it)."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass


def _engine_request(pending: PendingRequest | None):
    """The `EngineRequest` among a prefill call's arguments (None for other calls)."""
    if pending is None:
        return None
    for arg in pending.args:
        if hasattr(arg, "prompt_ids") and hasattr(arg, "cache_salt"):
            return arg
    return None
