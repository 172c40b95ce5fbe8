"""What the cache-aware routers of one prefill deployment tell each other.

Every process that calls a prefill deployment routes its own calls: each ingress replica the
first legs it prefills, each decode replica its retries and resumed legs. A router's index
holds only its own decisions, so with two ingress replicas (production's) a session's next turn
reaches, about half the time, a router that never saw where its history went. The routers of a
deployment share their decisions through one small actor holding a bounded log of them: every
`share_interval_s` while it routes, each router sends the prompt chains it routed since it last
asked and gets back the others' since then. Off the request path: a choice never waits on it,
except the first one after the router sat idle (its loop stops after `IDLE_STOP_S` without
routing), which waits up to `FIRST_SYNC_S` for the others' news. Ray's PrefixCacheAffinityRouter
shares one prefix tree that every choice queries (one actor call per request); here what
crosses processes is the decisions, in batches, and each router keeps its own index.

The log is lost with the actor (it lives as long as the replica whose router created it, and is
created again by the next router that finds it gone); routers then start over from its new
epoch. Decisions are hints: one that is lost or late costs a cache hit, never a wrong answer
(the engine's cache checks every token).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

logger = logging.getLogger("small4.prefix")

# Decisions kept, counted in block keys (32 bytes each; a 256K-token prompt is 4096 of them):
LOG_KEYS = 1 << 20  # by the actor: a router further behind misses the oldest
# sent in one reply: a new router, or one back from idling, gets the newest this many (16
# replicas' worth of a 256K-token cache at 64 tokens a block), not a 36 MB log applied in one
# step of its loop (535 ms measured)
REPLY_KEYS = 1 << 16
LEARN_SLICE = 4096  # keys applied between yields to the router's loop (a few ms)
OUTBOX_KEYS = 1 << 18  # by a router while the actor cannot be reached
IDLE_STOP_S = 60.0  # a router's sharing loop stops after this long without routing
# How long the first choice after such a stop (or a router's very first) waits for the others'
# news: an exchange takes milliseconds, but a process's first one (its first call to the actor)
# took over 50 ms on a busy 2-core box, and a choice made without the news can miss a whole
# conversation's KV (its prefill again).
FIRST_SYNC_S = 0.5
CALL_TIMEOUT_S = 2.0

Decision = tuple[Any, list[bytes]]  # (Serve ReplicaID, the prompt's block keys)


class DecisionLog:
    """The shared log (the actor's body; a plain class so tests can hold one in-process)."""

    def __init__(self, max_keys: int = LOG_KEYS):
        self.epoch = uuid.uuid4().hex
        self.seq = 0  # of the last entry
        self.entries: deque[tuple[int, str, Any, list[bytes]]] = deque()
        self.max_keys, self.keys = max_keys, 0

    def exchange(self, router: str, routed: list[Decision], epoch: str,
                 since: int, reply_keys: int = REPLY_KEYS) -> tuple[str, int, list[Decision]]:
        """Append `router`'s decisions; answer (epoch, last seq, the others' decisions after
        `since`, or all of them kept when `epoch` is not this log's; the newest of them up to
        `reply_keys`)."""
        if epoch != self.epoch:
            since = 0
        others, budget = [], reply_keys
        for seq, who, replica, keys in reversed(self.entries):
            if seq <= since or budget <= 0:
                break
            if who != router:
                others.append((replica, keys))
                budget -= _size(keys)
        others.reverse()
        for replica, keys in routed:
            self.seq += 1
            self.entries.append((self.seq, router, replica, keys))
            self.keys += _size(keys)
        while self.keys > self.max_keys and len(self.entries) > 1:
            self.keys -= _size(self.entries.popleft()[3])
        return self.epoch, self.seq, others


def _size(keys: list[bytes]) -> int:
    """What a decision counts against the bounds: its keys, and itself (a prompt shorter than
    a block has none, and would otherwise be kept for ever)."""
    return 1 + len(keys)


class Sharing:
    """One router's side: its outbox, where it has read the log up to, its loop."""

    def __init__(self, connect: Callable[[], Any], interval_s: float):
        self.connect = connect  # -> an object whose async `exchange` is DecisionLog's
        self.interval_s = interval_s
        self.router = uuid.uuid4().hex
        self.outbox: deque[Decision] = deque()
        self.outbox_keys = 0
        self.epoch, self.since = "", 0
        self.log: Any = None
        self._connecting: Future | None = None  # a lookup of the log in flight
        self.task: asyncio.Task | None = None
        self.last_routed = 0.0
        self.learned = 0  # decisions of other routers applied here

    def routed(self, replica: Any, keys: list[bytes]) -> None:
        if self.task is None:  # never a choice among several replicas: nothing to share
            return
        self.last_routed = time.monotonic()
        self._hold([(replica, keys)])

    def _hold(self, decisions: list[Decision]) -> None:
        for decision in decisions:
            self.outbox.append(decision)
            self.outbox_keys += _size(decision[1])
        while self.outbox_keys > OUTBOX_KEYS and len(self.outbox) > 1:  # the oldest go
            self.outbox_keys -= _size(self.outbox.popleft()[1])

    async def before_choice(self, learn: Callable[[Any, list[bytes]], None]) -> None:
        """Keep the loop running; after an idle stop, catch up first (briefly)."""
        if self.task is not None and not self.task.done():
            return
        self.last_routed = time.monotonic()
        first = asyncio.get_running_loop().create_future()
        self.task = asyncio.get_running_loop().create_task(self._loop(learn, first))
        try:
            await asyncio.wait_for(asyncio.shield(first), FIRST_SYNC_S)
        except asyncio.TimeoutError:
            pass

    async def _loop(self, learn, first: asyncio.Future) -> None:
        try:
            await self.sync(learn)
            first.set_result(None)
            while time.monotonic() - self.last_routed < IDLE_STOP_S:
                await asyncio.sleep(self.interval_s)
                await self.sync(learn)
        finally:
            if not first.done():
                first.set_result(None)

    async def sync(self, learn: Callable[[Any, list[bytes]], None]) -> None:
        routed = list(self.outbox)
        self.outbox.clear()
        self.outbox_keys = 0
        try:
            if self.log is None:
                self.log = await self._connected()
            epoch, since, others = await asyncio.wait_for(
                self.log.exchange(self.router, routed, self.epoch, self.since), CALL_TIMEOUT_S)
        except Exception as error:  # the actor died or is slow: try again next round
            logger.debug("prefix decisions not exchanged: %r", error)
            self.log = None
            held, self.outbox = self.outbox, deque()
            self.outbox_keys = 0
            self._hold(routed + list(held))
            return
        self.epoch, self.since = epoch, since
        applied = 0
        for replica, keys in others:
            learn(replica, keys)
            applied += _size(keys)
            if applied >= LEARN_SLICE:
                applied = 0
                await asyncio.sleep(0)  # calls are being routed on this loop meanwhile
        self.learned += len(others)


    async def _connected(self) -> Any:
        """The log, found off the loop: finding or creating the actor asks the GCS, blocking,
        and this loop routes every call of the process (a slow GCS must not stall it). One
        lookup at a time: a lookup that outlives a round is waited for again, not repeated
        (each would hold a thread for as long as the GCS hangs)."""
        if self._connecting is None:
            self._connecting = _LOOKUPS.submit(self.connect)
        lookup = self._connecting
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(lookup)),
                                          CALL_TIMEOUT_S)
        finally:
            if lookup.done():
                self._connecting = None


_LOOKUPS = ThreadPoolExecutor(1, thread_name_prefix="small4-prefix-log")


class _ActorLog:
    """The deployment's log actor, as `Sharing` calls it."""

    def __init__(self, handle):
        self.handle = handle

    async def exchange(self, *args):
        return await self.handle.exchange.remote(*args)


def actor_log(app: str, deployment: str) -> _ActorLog:
    """The log actor of `deployment` in `app`, created by the first router that asks; it lives
    as long as that router's process (no detached actor outlives the application)."""
    import ray

    actor = ray.remote(num_cpus=0, max_concurrency=1)(DecisionLog)
    return _ActorLog(actor.options(name="small4-prefix-decisions",
                                   namespace=f"small4::{app}::{deployment}",
                                   get_if_exists=True).remote())
