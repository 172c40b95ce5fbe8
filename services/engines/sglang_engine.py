"""The SGLang engine (GPU hosts, the `sglang` extra) behind our engine and KV-handoff seams.

One `sglang.Engine` per prefill or decode replica, in PD mode, fed token ids (see
`sglang_args`). A prefill engine serves its KV bootstrap on the node's routable address and the
port its replica claimed from the pool's fixed range (`bootstrap_port`); the decode side learns
them from the prefill replica (`SGLangHandoff.bind`) and registers its engine request for the
room, and the prefill engine writes the KV into the decode engine's memory (NIXL) as it runs.
The KV has arrived when the decode engine emits its first token (`SGLangHandoff.receive`), so a
prefill that fails before then is retried in a new room. Stop strings and `stop_context` are ours
(`StopChecker`); an engine request we stop early, or whose client left, is aborted by `rid`.

Not run here (no GPU in CI): everything that starts `sglang.Engine`. The translation, the
handoff, the ports and the probe are tested on the CPU, against SGLang's own classes in the
conformance tier (`make test-sglang`).

Tenants stay apart in SGLang's radix cache as in our engines' prefix cache: each request carries
its `cache_salt` (one per tenant unless `routing.prefix.shared_tenants` groups them) as SGLang's
own `cache_salt`, which namespaces its radix tree (`RadixKey.cache_salt`: prompts of different
salts share no node, so no hit and no timing tells one tenant what another sent). Its
vision-embedding cache, keyed by image content alone, is off (`engine_env`).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

from services.engines.bootstrap_port import claim_port, replica_rank
from services.engines.protocol import (EngineRequest, EngineStats, PrefillResult, TokenChunk)
from services.engines.sglang_args import (BOOTSTRAP_FIELDS, FAKE_BOOTSTRAP_HOST, OutputReader,
                                          engine_env, engine_error, generate_args, image_payload,
                                          require_grammar_plugin, require_transfer_backend,
                                          server_args)
from services.engines.stops import OutputMarks, StopChecker
from services.errors import KVHandoffFailed
from services.kv.backends import new_room
from services.kv.protocol import KVTicket, PairedKV
from services.multimodal.uniform import ImageTokens
from services.settings import WorkerSettings
from services.telemetry.tracing import resolve as resolve_tracing
from services.tokenizer import PromptTokenizer

PROBE_TIMEOUT_S = 30.0   # one token with no peer; SGLang's own /health_generate allows 20 s
PROBE_EVERY_S = 10.0     # a healthy engine is probed again this often (a failing one at once)


def routable_host() -> str:
    """This node's address as Ray knows it (what other nodes reach), else loopback."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


class SGLangEngine:
    """An `Engine` running one SGLang prefill or decode engine in this process's children."""

    kind = "sglang"
    # `stats().healthy` comes from a probe through the engine itself (`EngineProbe`): a failed
    # one means the engine cannot produce a token, whether or not it has other work
    probed_health = True

    def __init__(self, worker: WorkerSettings, *, role: str, tokenizer: PromptTokenizer):
        try:
            import sglang
        except ImportError as exc:
            raise RuntimeError("engine.kind sglang needs the 'sglang' extra on a GPU host "
                               "(pip install '.[sglang]')") from exc
        require_transfer_backend(worker.engine.sglang.transfer_backend)
        require_grammar_plugin()
        if worker.model.tokenizer_file() != worker.model.path / "tekken.json":
            raise RuntimeError(f"{worker.model.path} has no tekken.json: SGLang serves a "
                               "Mistral-native checkpoint, whose prompts are encoded with its own")
        self.role, self.settings = role, worker
        self.eos_ids = (tokenizer.eos_id,)
        self.detokenize = tokenizer.decode
        self.marks = OutputMarks.of(tokenizer)
        self.image_tokens = ImageTokens.of(tokenizer)
        self.host = routable_host()
        self.port_claim = (claim_port(worker.bootstrap_ports, replica_rank())
                           if role == "prefill" else None)
        self.bootstrap_port = self.port_claim.port if self.port_claim else None
        tracing = resolve_tracing(worker.telemetry.tracing)
        os.environ.update(engine_env(worker.model, worker.kv_handoff, tracing))
        self.args = server_args(worker.model, worker.engine, role=role,
                                tp_size=worker.tensor_parallel,
                                host=self.host, bootstrap_port=self.bootstrap_port,
                                otlp_endpoint=tracing and tracing.otlp_endpoint())
        self.engine = sglang.Engine(**self.args)
        self.seeded = worker.engine.sglang.deterministic
        self.live: dict[str, list] = {}  # request id -> [engine rid, KV tokens it holds]
        self.health = EngineProbe(self.engine)

    def handoff(self) -> SGLangHandoff:
        return SGLangHandoff(self)

    async def prefill(self, request: EngineRequest) -> PrefillResult:
        """Run the prompt; the engine pushes the KV to the decode engine of the same room."""
        images = image_payload(request.prompt_ids, request.images, self.image_tokens)
        kwargs = salted(generate_args(request, self.eos_ids, images=images, seeded=self.seeded),
                        request)
        kwargs["stream"] = False
        started = time.perf_counter()
        # one attempt of the request: a retry in a new room may reach this engine before this
        # attempt's cancellation does, under the same request id (its own rid, though)
        attempt = self.live[request.request_id] = [kwargs["rid"], len(request.prompt_ids)]
        try:
            out = await self.engine.async_generate(**kwargs)
        except ValueError as exc:  # SGLang's answer to a request it refuses (400)
            raise engine_error(request.request_id, "abort", str(exc), 400) from exc
        except Exception as exc:  # e.g. a failed KV transfer (500): retried in a new room
            raise engine_error(request.request_id, "abort", f"{type(exc).__name__}: {exc}") \
                from exc
        except BaseException:  # cancelled (its deadline, or the decode side gave up): this
            # attempt's rid, never a later attempt's (SGLang aborts a cancelled call itself
            # too; a second abort of one rid is a no-op there)
            self.engine.tokenizer_manager.abort_request(rid=attempt[0])
            raise
        finally:
            if self.live.get(request.request_id) is attempt:
                del self.live[request.request_id]
        OutputReader(request.request_id).finish(out)  # raises if SGLang aborted it
        meta = out.get("meta_info") or {}
        ids = out.get("output_ids") or []
        elapsed = time.perf_counter() - started
        # time in the scheduler's queue, where SGLang reports it (its metrics on)
        queued = min(elapsed, max(0.0, float(meta.get("queue_time") or 0.0)))
        # the compute: from the prompt's first forward to its last chunk's, where SGLang
        # reports them (its metrics on). A PD prefill answers only once its KV reached the
        # decode engine, and its wait for that engine's room and the wire is decode's
        # shortage, not this engine's work (counted as compute, a slow decode side made the
        # prefill pool look slow, and the policy asked for prefill engines)
        compute = elapsed - queued
        entered = float(meta.get("forward_entry_time") or 0.0)
        finished = float(meta.get("prefill_finished_time") or 0.0)
        if 0.0 < entered <= finished:
            compute = min(compute, finished - entered)
        # -1: the prefill engine reported no token; the decode engine streams the first one
        return PrefillResult(request.request_id, ids[0] if ids else -1,
                             len(request.prompt_ids), None,
                             cached_tokens=int(meta.get("cached_tokens") or 0),
                             compute_s=compute, queue_s=queued)

    async def open_decode(self, request: EngineRequest, pairing: dict[str, Any]) -> DecodeStream:
        """Start this decode engine's request for the room in `pairing` and wait until the KV
        has arrived (its first output). Cancelled or failed, it aborts that room's request."""
        stream = DecodeStream(self, request, pairing)
        try:
            await stream.start()
        except BaseException:
            await stream.close()
            raise
        return stream

    async def decode(self, request: EngineRequest, first_token: int | None,
                     kv: Any) -> AsyncIterator[TokenChunk]:
        """Stream from the first token; `kv` is the stream `SGLangHandoff.receive` opened."""
        if first_token is not None or not isinstance(kv, DecodeStream):
            raise ValueError("an SGLang decode engine streams from the first token of the "
                             "request its handoff opened")
        async with aclosing(kv.chunks()) as chunks:
            async for chunk in chunks:
                yield chunk

    async def probe(self) -> bool:
        return await self.health.check()

    async def abort(self, request_id: str) -> bool:
        """Abort `request_id`'s engine request (SGLang has no public abort; this is its
        tokenizer manager's, sync and non-blocking, which also frees the request's KV)."""
        live = self.live.pop(request_id, None)
        if live is None:
            return False
        self.engine.tokenizer_manager.abort_request(rid=live[0])
        return True

    def stats(self) -> EngineStats:
        """The engine's load as its schedulers publish it (`engine_load`: requests running and
        waiting, KV tokens used of its pool), else our own view (requests in flight, the KV
        their prompts and outputs hold), and health from the latest probe (`EngineProbe`),
        which this call starts again when it is due."""
        healthy, detail = self.health.status()
        load = engine_load(self.engine)
        if load is None:
            return EngineStats(self.kind, self.role, running=len(self.live), waiting=0,
                               kv_tokens=sum(tokens for _, tokens in self.live.values()),
                               kv_capacity=self.settings.engine.kv_capacity_tokens,
                               healthy=healthy, detail=detail)
        return EngineStats(self.kind, self.role, running=load.running, waiting=load.waiting,
                           kv_tokens=load.kv_tokens,
                           kv_capacity=load.kv_capacity or self.settings.engine.kv_capacity_tokens,
                           healthy=healthy, detail=detail)


@dataclass(frozen=True)
class EngineLoad:
    """An engine's load summed over its schedulers (one per data-parallel rank)."""

    running: int
    waiting: int
    kv_tokens: int
    kv_capacity: int


def engine_load(engine: Any) -> EngineLoad | None:
    """What the engine's schedulers last published of their load (SGLang's `LoadSnapshot`s,
    the source of its `/v1/loads`, read from shared memory by its tokenizer manager: no call
    into the engine): requests running, requests waiting, KV tokens in use and the pool's
    size. None where the engine publishes none (no snapshot yet, or an SGLang without them):
    the caller falls back to its own count. The autoscaler reads `waiting` as the role's
    queue. Each role's count also holds the other role's backlog, which is left out here: on a
    decode engine its transfer queue (KV slots allocated, the prefill not done or its KV not
    sent: a prefill overload read as decode's queue asked for decode engines), on a prefill
    engine its bootstrap queue (waiting for the decode side to allocate KV room: a decode
    shortage read as prefill's). Decode's pre-allocation queue (waiting for KV room on this
    engine), where those same requests wait, stays in."""
    reader = getattr(getattr(engine, "tokenizer_manager", None), "load_snapshot_reader", None)
    if reader is None:
        return None
    try:
        loads = reader.read_all()
    except Exception:  # a torn or unmapped segment: this report falls back, the next retries
        return None
    if not loads:
        return None
    others = sum(int(getattr(d, "decode_transfer_queue_reqs", 0))
                 + int(getattr(d, "prefill_bootstrap_queue_reqs", 0))
                 for d in (getattr(x, "disaggregation", None) for x in loads) if d is not None)
    return EngineLoad(running=sum(int(x.num_running_reqs) for x in loads),
                      waiting=max(sum(int(x.num_waiting_reqs) for x in loads) - others, 0),
                      kv_tokens=sum(int(x.num_used_tokens) for x in loads),
                      kv_capacity=sum(int(x.max_total_num_tokens) for x in loads))


class SGLangHandoff:
    """The KV handoff of SGLang's PD: the decode side opens a room, the prefill replica says
    where its bootstrap server is, and the engines move the KV between themselves."""

    backend = "sglang"
    concurrent = True

    def __init__(self, engine: Any):
        self.engine = engine

    def open(self, request_id: str) -> KVTicket:
        return KVTicket(request_id, self.backend, fields={"bootstrap_room": new_room()})

    def bind(self, ticket: KVTicket) -> KVTicket:
        ticket.fields |= {"bootstrap_host": self.engine.host,
                          "bootstrap_port": self.engine.bootstrap_port}
        return ticket

    async def send(self, ticket: KVTicket, kv: Any) -> KVTicket:
        return ticket  # the prefill engine wrote it into the decode engine's memory

    async def receive(self, ticket: KVTicket, request: EngineRequest | None = None) -> PairedKV:
        """Open the decode engine's request for this room and return once the KV is there
        (its first output): a prefill that fails before then leaves this waiting, and the
        worker cancels it (aborting the room's request) and retries in a new room."""
        if request is None:
            raise ValueError("the SGLang handoff opens the decode request: pass the request")
        unbound = [f for f in BOOTSTRAP_FIELDS if f not in ticket.fields]
        if unbound:  # no prefill engine said where it serves this room's KV: none will come
            raise KVHandoffFailed(f"no prefill engine bound the room for {ticket.request_id} "
                                  f"({', '.join(unbound)} missing)",
                                  request_id=ticket.request_id)
        return PairedKV(None, await self.engine.open_decode(request, dict(ticket.fields)))

    def release(self, ticket: KVTicket) -> None:
        return None  # the engines free their side when the request ends or is aborted

    def holds(self, ticket: KVTicket) -> bool:
        return False  # the prefill engine frees its side once the decode engine has the KV


def salted(kwargs: dict[str, Any], request: EngineRequest) -> dict[str, Any]:
    """`Engine.async_generate` arguments that keep `request`'s prompt in its tenant's namespace
    of the radix cache (SGLang reads an empty salt as none: the one shared namespace)."""
    if request.cache_salt:
        kwargs["cache_salt"] = request.cache_salt
    return kwargs


class DecodeStream:
    """One decode engine request, from its pairing to its end: opened by the handoff (so the
    worker can tell when the KV arrived), then read by `SGLangEngine.decode`."""

    def __init__(self, engine: SGLangEngine, request: EngineRequest, pairing: dict[str, Any]):
        self.engine, self.request = engine, replace(request, handoff=pairing)
        self.reader = OutputReader(request.request_id)
        self.stops = StopChecker(request.sampling, engine.eos_ids, engine.detokenize,
                                 engine.marks)
        # whether SGLang itself ended the request: one that our stop check ends is still
        # running there (stop strings are ours) and must be aborted to free its KV
        self.outputs, self.head, self.finished = None, None, False

    async def start(self) -> None:
        kwargs = salted(generate_args(self.request, self.engine.eos_ids,
                                      seeded=self.engine.seeded), self.request)
        self.engine.live[self.request.request_id] = [kwargs["rid"],
                                                     len(self.request.prompt_ids)]
        try:
            self.outputs = await self.engine.engine.async_generate(**kwargs)
            self.head = await anext(self.outputs)
        except ValueError as exc:  # SGLang refusing the request (as `prefill` maps it)
            raise engine_error(self.request.request_id, "abort", str(exc), 400) from exc
        # a bootstrap or KV transfer that failed on this side arrives as an output that is an
        # abort, not as an exception: the KV never came, and the pairing is tried again
        self.reader.finish(self.head)

    async def chunks(self) -> AsyncIterator[TokenChunk]:
        try:
            out = self.head
            while out is not None:
                chunk = self._chunk(out)
                yield chunk
                if chunk.finish_reason:
                    return
                out = await anext(self.outputs, None)
        finally:
            await self.close()

    def _chunk(self, out: dict[str, Any]) -> TokenChunk:
        ids, before = self.reader.new_tokens(out), len(self.stops.generated)
        logprobs = OutputReader.logprobs(out, len(ids))
        ours = self.stops.check(ids) if ids else None
        ids = ids[:len(self.stops.generated) - before]  # none past where we stop
        logprobs = logprobs[:len(ids)] if logprobs is not None else None
        theirs = self.reader.finish(out)
        self.finished = theirs is not None
        live = self.engine.live.get(self.request.request_id)
        if live is not None:
            live[1] += len(ids)
        return TokenChunk(ids, ours or theirs, logprobs)

    async def close(self) -> None:
        """Abort the engine request unless SGLang finished it (a stop string, a stop id or
        `stop_context` ends it on our side only), then forget it (in that order: the abort
        finds the request by its entry in `live`)."""
        if not self.finished:
            await self.engine.abort(self.request.request_id)
        self.engine.live.pop(self.request.request_id, None)
        if self.outputs is not None:
            await self.outputs.aclose()


class EngineProbe:
    """Readiness from the engine itself: one token with no peer (the fake bootstrap host SGLang's
    own health check uses), bounded in time, repeated while it is due. `sglang.Engine` never
    marks itself up (only SGLang's HTTP server does, after its own warm-up), so its
    `is_healthy()` alone would say not ready for ever."""

    def __init__(self, engine: Any, timeout_s: float = PROBE_TIMEOUT_S,
                 every_s: float = PROBE_EVERY_S):
        self.engine, self.timeout_s, self.every_s = engine, timeout_s, every_s
        self.healthy, self.detail, self.checked_at = False, "not probed yet", float("-inf")
        self.running: asyncio.Task | None = None

    def status(self) -> tuple[bool, str]:
        """The latest result; starts a probe in the background when one is due."""
        due = time.monotonic() - self.checked_at >= (self.every_s if self.healthy else 0.0)
        if due and (self.running is None or self.running.done()):
            try:
                self.running = asyncio.get_running_loop().create_task(self.check())
            except RuntimeError:  # no loop here: the next call from the replica's loop starts it
                pass
        return self.healthy, self.detail

    async def check(self) -> bool:
        rid = f"small4-probe-{uuid.uuid4().hex}"
        started = time.time()  # SGLang stamps its outputs' arrival with time.time()
        try:
            async with asyncio.timeout(self.timeout_s):
                out = await self.engine.async_generate(
                    input_ids=[1], sampling_params={"max_new_tokens": 1, "temperature": 0.0},
                    bootstrap_host=FAKE_BOOTSTRAP_HOST, bootstrap_room=0, rid=rid, stream=False)
            reason = ((out or {}).get("meta_info") or {}).get("finish_reason") or {}
            kind = reason.get("type") if isinstance(reason, dict) else reason
            self.healthy = kind in ("stop", "length")
            self.detail = "" if self.healthy else f"probe ended with {reason!r}"
        except TimeoutError:
            manager = self.engine.tokenizer_manager
            manager.abort_request(rid=rid)
            # a saturated engine serves its queue before the probe (a decode engine: after
            # the KV room it waits for): outputs arriving meanwhile say its scheduler works,
            # as SGLang's own /health_generate reads them; not ready only when nothing came
            busy = getattr(manager, "last_receive_tstamp", 0.0) > started
            self.healthy = busy
            self.detail = "" if busy else f"no token within {self.timeout_s:g} s"
        except Exception as exc:  # a dead scheduler process
            self.healthy, self.detail = False, f"{type(exc).__name__}: {exc}"
        self.checked_at = time.monotonic()
        return self.healthy
