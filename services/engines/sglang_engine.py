"""The SGLang engine (GPU hosts, the `sglang` extra) behind our engine and KV-handoff seams.

One `sglang.Engine` per prefill or decode replica, in PD mode, fed token ids (see
`sglang_args`). A prefill engine serves its KV from a bootstrap server on the node's routable
address and a free port of `topology.bootstrap_ports`; the decode side learns them from the
prefill replica (`SGLangHandoff.bind`) and its engine pulls the KV for the request's room while
the prefill runs. Stop strings and `stop_context` are ours (`StopChecker`); an engine request
we stop early, or whose client left, is aborted by `rid`.

Not run here (no GPU in CI): everything that starts `sglang.Engine`. The translation, the
handoff and the port choice are tested on the CPU.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from services.engines.protocol import (EngineRequest, EngineStats, PrefillResult, TokenChunk)
from services.engines.sglang_args import (OutputReader, engine_error, generate_args,
                                          image_data, server_args)
from services.engines.stops import StopChecker
from services.kv.backends import new_room
from services.kv.protocol import KVTicket, PairedKV
from services.tokenizer import PromptTokenizer
from services.workers.settings import WorkerSettings

# SGLang's PD timeouts default to 300 s; ours are far shorter (kv_handoff.timeout_s), so an
# engine never waits on a pairing the stack has given up on.
TIMEOUT_ENV = ("SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT", "SGLANG_DISAGGREGATION_WAITING_TIMEOUT")


def routable_host() -> str:
    """This node's address as Ray knows it (what other nodes reach), else loopback."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


def free_port(host: str, candidates: list[int]) -> int:
    """The first of `candidates` nobody on this node listens on (one per prefill engine)."""
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"every KV bootstrap port {candidates[0]}-{candidates[-1]} on {host} is "
                       "taken: more prefill engines on this node than topology allows")


def engine_env(timeout_s: float) -> dict[str, str]:
    """Environment for the engine's processes: PD timeouts bounded by ours."""
    return {name: str(max(1, int(timeout_s))) for name in TIMEOUT_ENV}


class SGLangEngine:
    """An `Engine` running one SGLang prefill or decode engine in this process's children."""

    kind = "sglang"

    def __init__(self, worker: WorkerSettings, *, role: str, tokenizer: PromptTokenizer):
        try:
            import sglang
        except ImportError as exc:
            raise RuntimeError("engine.kind sglang needs the 'sglang' extra on a GPU host "
                               "(pip install '.[sglang]')") from exc
        self.role, self.settings = role, worker
        self.eos_ids = (tokenizer.eos_id,)
        self.detokenize = tokenizer.decode
        self.host = routable_host()
        self.bootstrap_port = (free_port(self.host, worker.bootstrap_ports)
                               if role == "prefill" else None)
        os.environ.update(engine_env(worker.kv_handoff.timeout_s))
        tracing = worker.telemetry.tracing
        self.args = server_args(worker.model, worker.engine.sglang, role=role,
                                tp_size=worker.tensor_parallel,
                                max_running_requests=worker.engine.max_running_requests,
                                host=self.host, bootstrap_port=self.bootstrap_port,
                                otlp_endpoint=tracing.endpoint if tracing.enabled else None)
        self.engine = sglang.Engine(**self.args)
        self.seeded = worker.engine.sglang.deterministic
        self.live: dict[str, list] = {}  # request id -> [engine rid, KV tokens it holds]

    def handoff(self) -> SGLangHandoff:
        return SGLangHandoff(self)

    async def prefill(self, request: EngineRequest) -> PrefillResult:
        """Run the prompt; the engine pushes the KV to the decode engine of the same room."""
        kwargs = generate_args(request, self.eos_ids, images=image_data(request.images),
                               seeded=self.seeded)
        kwargs["stream"] = False
        started = time.perf_counter()
        self.live[request.request_id] = [kwargs["rid"], len(request.prompt_ids)]
        try:
            out = await self.engine.async_generate(**kwargs)
        except ValueError as exc:  # SGLang's answer to a request it refuses (400)
            raise engine_error(request.request_id, "abort", str(exc), 400) from exc
        except Exception as exc:  # e.g. a failed KV transfer (500): retried in a new room
            raise engine_error(request.request_id, "abort", f"{type(exc).__name__}: {exc}") \
                from exc
        finally:
            self.live.pop(request.request_id, None)
        OutputReader(request.request_id).finish(out)  # raises if SGLang aborted it
        meta = out.get("meta_info") or {}
        ids = out.get("output_ids") or []
        # -1: the prefill engine reported no token; the decode engine streams the first one
        return PrefillResult(request.request_id, ids[0] if ids else -1,
                             len(request.prompt_ids), None,
                             cached_tokens=int(meta.get("cached_tokens") or 0),
                             compute_s=time.perf_counter() - started)

    async def decode(self, request: EngineRequest, first_token: int | None,
                     kv: Any) -> AsyncIterator[TokenChunk]:
        """Stream from the first token; `kv` is the pairing (`SGLangHandoff.receive`)."""
        if first_token is not None:
            raise ValueError("an SGLang decode engine pulls the KV and the first token itself")
        paired = replace(request, handoff=dict(kv or {}))
        reader, stops = OutputReader(request.request_id), StopChecker(
            request.sampling, self.eos_ids, self.detokenize)
        kwargs = generate_args(paired, self.eos_ids, seeded=self.seeded)
        self.live[request.request_id] = [kwargs["rid"], len(request.prompt_ids)]
        outputs = await self.engine.async_generate(**kwargs)
        finished = False
        try:
            async for out in outputs:
                ids, before = reader.new_tokens(out), len(stops.generated)
                ours = stops.check(ids) if ids else None
                ids = ids[:len(stops.generated) - before]  # none past where we stop
                theirs = reader.finish(out)
                self.live[request.request_id][1] += len(ids)
                finished = bool(ours or theirs)
                yield TokenChunk(ids, ours or theirs)
                if finished:
                    return
        finally:
            self.live.pop(request.request_id, None)
            if not finished:
                await self.abort(request.request_id)
            await outputs.aclose()

    async def abort(self, request_id: str) -> bool:
        """Abort `request_id`'s engine request (SGLang has no public abort; this is its
        tokenizer manager's, sync and non-blocking, which also frees the request's KV)."""
        live = self.live.pop(request_id, None)
        if live is None:
            return False
        self.engine.tokenizer_manager.abort_request(rid=live[0])
        return True

    def stats(self) -> EngineStats:
        """Our own view of the engine: requests in flight and the KV they hold."""
        try:
            healthy, detail = bool(self.engine.tokenizer_manager.is_healthy()), ""
        except Exception as exc:  # a dead scheduler process
            healthy, detail = False, f"{type(exc).__name__}: {exc}"
        return EngineStats(self.kind, self.role, running=len(self.live), waiting=0,
                           kv_tokens=sum(tokens for _, tokens in self.live.values()),
                           kv_capacity=self.settings.engine.kv_capacity_tokens,
                           healthy=healthy, detail=detail)


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
        return ticket  # the prefill engine pushed it

    async def receive(self, ticket: KVTicket) -> PairedKV:
        return PairedKV(None, dict(ticket.fields))  # the decode engine pulls it

    def release(self, ticket: KVTicket) -> None:
        return None  # the engines free their side when the request ends or is aborted
