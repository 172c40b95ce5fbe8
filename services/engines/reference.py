"""The reference engine: transformers on CPU, chunked prefill, continuously batched decode.

Prefill runs a prompt in chunks of `prefill_chunk_tokens` and exports the KV cache as numpy arrays
(`KVBlob`). Decode imports such a blob and joins the running batch at the next step: each step
left-pads every running sequence's KV to a common length, runs one forward pass for the whole batch
and appends each row's new KV back to its sequence, so requests join and leave between steps. All
model calls run on one worker thread; the event loop stays free for new calls and aborts.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from services.engines.protocol import EngineRequest, EngineStats, PrefillResult, TokenChunk
from services.engines.sampling import sample_token
from services.engines.stops import StopChecker
from services.engines.validation import validate_request
from services.errors import EngineError
from services.kv.blob import KVBlob
from services.model.loader import ModelBundle
from services.settings import EngineSettings


@dataclass
class _Sequence:
    """One decoding request: its KV (per layer, [1, h, n, d] tensors) and its output queue."""

    request: EngineRequest
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    last_token: int
    position: int
    stops: StopChecker
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    done: bool = False

    @property
    def kv_tokens(self) -> int:
        return self.layers[0][0].shape[-2]

    @property
    def reserved(self) -> int:
        return len(self.request.prompt_ids) + self.request.sampling.max_tokens


class ReferenceEngine:
    """Prefill and decode on a transformers model; one instance may serve either role or both."""

    kind = "reference"

    def __init__(self, bundle: ModelBundle, settings: EngineSettings, *, role: str,
                 context_length: int, eos_ids: tuple[int, ...],
                 detokenize: Callable[[list[int]], str]):
        self.bundle = bundle
        self.settings = settings
        self.role = role
        self.context_length = context_length
        self.eos_ids = eos_ids
        self.detokenize = detokenize
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"engine-{role}")
        self._executor.submit(torch.set_num_threads, settings.torch_threads).result()
        self._running: dict[str, _Sequence] = {}
        self._waiting: deque[_Sequence] = deque()
        self._prefilling: dict[str, int] = {}
        self._prefill_waiting = 0
        self._prefill_lock: asyncio.Lock | None = None
        self._aborted: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._failure: str = ""

    # ---- prefill -------------------------------------------------------------------------
    async def prefill(self, request: EngineRequest) -> PrefillResult:
        validate_request(request, self.context_length, self.bundle.vocab_size)
        queued = time.perf_counter()
        if self._prefill_lock is None:
            self._prefill_lock = asyncio.Lock()
        self._prefill_waiting += 1
        try:
            await self._prefill_lock.acquire()
        finally:
            self._prefill_waiting -= 1
        started = time.perf_counter()
        self._prefilling[request.request_id] = 0
        try:
            blob, first = await self._run_prefill(request)
        finally:
            self._prefilling.pop(request.request_id, None)
            self._aborted.discard(request.request_id)
            self._prefill_lock.release()
        done = time.perf_counter()
        return PrefillResult(request.request_id, first, len(request.prompt_ids), blob,
                             compute_s=done - started, queue_s=started - queued)

    async def _run_prefill(self, request: EngineRequest) -> tuple[KVBlob, int]:
        from transformers import DynamicCache

        loop = asyncio.get_running_loop()
        ids = torch.tensor([request.prompt_ids])
        images = [torch.as_tensor(np.asarray(img)) for img in request.images]
        embeds = await loop.run_in_executor(self._executor, self._embed, ids, images)
        cache = DynamicCache()
        chunk = self.settings.prefill_chunk_tokens
        logits = None
        for start in range(0, ids.shape[1], chunk):
            if request.request_id in self._aborted:
                raise asyncio.CancelledError(f"request {request.request_id} aborted in prefill")
            end = min(start + chunk, ids.shape[1])
            logits = await loop.run_in_executor(self._executor, self._forward_chunk,
                                                embeds[:, start:end], cache, start)
            self._prefilling[request.request_id] = end
        first = sample_token(logits, request.sampling, len(request.prompt_ids))
        return KVBlob.from_cache(cache), first

    @torch.inference_mode()
    def _embed(self, ids: torch.Tensor, images: list[torch.Tensor]) -> torch.Tensor:
        return self.bundle.embed(ids, images)

    @torch.inference_mode()
    def _forward_chunk(self, embeds: torch.Tensor, cache, start: int) -> torch.Tensor:
        positions = torch.arange(start, start + embeds.shape[1])[None]
        out = self.bundle.model(inputs_embeds=embeds, past_key_values=cache, use_cache=True,
                                position_ids=positions, logits_to_keep=1)
        return out.logits[0, -1].float()

    # ---- decode --------------------------------------------------------------------------
    async def decode(self, request: EngineRequest, first_token: int,
                     kv: KVBlob) -> AsyncIterator[TokenChunk]:
        validate_request(request, self.context_length, self.bundle.vocab_size)
        if kv is None or kv.num_tokens != len(request.prompt_ids):
            raise EngineError(f"KV for {request.request_id} does not match its prompt")
        seq = _Sequence(request, kv.to_layers(), first_token, len(request.prompt_ids),
                        StopChecker(request.sampling, self.eos_ids, self.detokenize))
        finish = seq.stops.check([first_token])
        if finish:
            yield TokenChunk([], finish)
            return
        self._waiting.append(seq)
        self._ensure_loop()
        try:
            while True:
                tokens, finish = [], None
                item = await seq.queue.get()
                while True:
                    if isinstance(item, BaseException):
                        raise item
                    token, finish = item
                    if token is not None:
                        tokens.append(token)
                    if finish or seq.queue.empty():
                        break
                    item = seq.queue.get_nowait()
                yield TokenChunk(tokens, finish)
                if finish:
                    return
        finally:
            if not seq.done:
                self._drop(request.request_id)

    def _ensure_loop(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._decode_loop())

    def _admit(self) -> None:
        reserved = sum(s.reserved for s in self._running.values())
        while self._waiting and len(self._running) < self.settings.max_running_requests:
            seq = self._waiting[0]
            if self._running and reserved + seq.reserved > self.settings.kv_capacity_tokens:
                break
            self._waiting.popleft()
            self._running[seq.request.request_id] = seq
            reserved += seq.reserved

    async def _decode_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._admit()
            if not self._running:
                self._wake.clear()
                if not self._waiting:
                    return
                await self._wake.wait()
                continue
            batch = list(self._running.values())
            try:
                logits, new_kv = await loop.run_in_executor(self._executor, self._step, batch)
            except Exception as exc:  # an engine fault fails the batch, not the process
                self._failure = f"{type(exc).__name__}: {exc}"
                for seq in batch:
                    self._finish(seq, None, EngineError(f"decode step failed: {exc}"))
                continue
            for row, seq in enumerate(batch):
                if seq.done:
                    continue
                seq.layers = [(torch.cat([k, nk[row:row + 1]], dim=-2),
                               torch.cat([v, nv[row:row + 1]], dim=-2))
                              for (k, v), (nk, nv) in zip(seq.layers, new_kv)]
                seq.position += 1
                token = sample_token(logits[row], seq.request.sampling, seq.position)
                seq.last_token = token
                finish = seq.stops.check([token])
                self._finish(seq, (token, finish)) if finish else seq.queue.put_nowait((token, None))

    @torch.inference_mode()
    def _step(self, batch: list[_Sequence]):
        from transformers import DynamicCache

        longest = max(s.kv_tokens for s in batch)
        mask = torch.zeros(len(batch), longest + 1, dtype=torch.long)
        cache = DynamicCache()
        n_layers = len(batch[0].layers)
        for layer in range(n_layers):
            keys = _left_pad([s.layers[layer][0] for s in batch], longest)
            values = _left_pad([s.layers[layer][1] for s in batch], longest)
            cache.update(keys, values, layer)
        for row, seq in enumerate(batch):
            mask[row, longest - seq.kv_tokens:] = 1
        ids = torch.tensor([[s.last_token] for s in batch])
        positions = torch.tensor([[s.position] for s in batch])
        out = self.bundle.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                past_key_values=cache, use_cache=True, logits_to_keep=1)
        new_kv = [(layer.keys[:, :, -1:], layer.values[:, :, -1:]) for layer in cache.layers]
        return out.logits[:, -1].float(), new_kv

    def _finish(self, seq: _Sequence, item, error: BaseException | None = None) -> None:
        seq.done = True
        self._running.pop(seq.request.request_id, None)
        seq.queue.put_nowait(error if error is not None else item)

    def _drop(self, request_id: str) -> bool:
        seq = self._running.pop(request_id, None)
        if seq is None:
            seq = next((s for s in self._waiting if s.request.request_id == request_id), None)
            if seq is not None:
                self._waiting.remove(seq)
        if seq is None:
            return False
        seq.done = True
        seq.layers = []
        seq.queue.put_nowait(asyncio.CancelledError(f"request {request_id} aborted"))
        return True

    # ---- control -------------------------------------------------------------------------
    async def abort(self, request_id: str) -> bool:
        if request_id in self._prefilling:
            self._aborted.add(request_id)
            self._prefilling[request_id] = 0
            return True
        return self._drop(request_id)

    def stats(self) -> EngineStats:
        decoding = sum(s.kv_tokens for s in self._running.values() if not s.done)
        decoding += sum(s.kv_tokens for s in self._waiting)
        return EngineStats(self.kind, self.role, running=len(self._running) + len(self._prefilling),
                           waiting=len(self._waiting) + self._prefill_waiting,
                           kv_tokens=decoding + sum(self._prefilling.values()),
                           kv_capacity=self.settings.kv_capacity_tokens,
                           healthy=not self._failure, detail=self._failure)


def _left_pad(tensors: list[torch.Tensor], length: int) -> torch.Tensor:
    """Stack [1, h, n_i, d] tensors into [B, h, length, d], right-aligned (padding on the left)."""
    first = tensors[0]
    out = first.new_zeros(len(tensors), first.shape[1], length, first.shape[-1])
    for row, t in enumerate(tensors):
        out[row, :, length - t.shape[-2]:] = t[0]
    return out
