"""The reference engine: transformers on CPU, chunked prefill, continuously batched decode.

Prefill runs a prompt in chunks of `prefill_chunk_tokens` and exports the KV cache as numpy arrays
(`KVBlob`); with the prefix cache on, the prompt's leading blocks that an earlier prompt of the same
salt computed are loaded instead of computed (and embedded: only the uncached suffix is, and only
the images with a slot in it go through the vision encoder), and its new full blocks are kept for
later ones.
Decode imports such a blob and joins the running batch (`ContinuousBatcher`) at the next step:
each step groups the running sequences by KV length (`length_groups`: one long sequence must
not pad every short one to its length), left-pads each group's KV to a common length, runs one
forward pass per group with true positions and a padding mask, and appends each row's new KV
back to its sequence. All model calls run on one worker thread; the event loop stays free for
new calls and aborts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from services.engines.batching import ContinuousBatcher, PrefillGate, Sequence, engine_stats
from services.engines.prefix_cache import image_digest, image_marks, prefix_cache_for
from services.engines.protocol import (EngineRequest, EngineStats, PrefillResult, TokenChunk,
                                       TokenLogprob)
from services.engines.sampling import Sampler, sample_batch
from services.engines.stops import OutputMarks, StopChecker
from services.engines.validation import validate_request
from services.errors import EngineError, InputRejected
from services.grammar import Guidance
from services.kv.blob import KVBlob
from services.model.loader import ModelBundle
from services.settings import EngineSettings


@dataclass
class _Sequence(Sequence):
    """A decoding request with its KV (per layer, [1, h, n, d] tensors) and next input."""

    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    last_token: int = 0
    position: int = 0
    sampler: Sampler | None = None

    @property
    def kv_tokens(self) -> int:
        return self.layers[0][0].shape[-2] if self.layers else 0


PAD_RATIO = 2.0  # a decode step's rows padded to at most twice their KV (`length_groups`)
PAD_FLOOR_TOKENS = 512  # unless the pass's longest row is this short


class ReferenceEngine:
    """Prefill and decode on a transformers model; one instance may serve either role or both."""

    kind = "reference"
    probed_health = False  # health is its decode steps' (`ContinuousBatcher.health`)

    def __init__(self, bundle: ModelBundle, settings: EngineSettings, *, role: str,
                 context_length: int, eos_ids: tuple[int, ...],
                 detokenize: Callable[[list[int]], str], image_end_id: int | None = None,
                 guidance: Guidance | None = None, marks: OutputMarks | None = None,
                 vocab_size: int | None = None):
        self.bundle = bundle
        # ids the tokenizer reads: a checkpoint's padded vocabulary past them is never sampled
        # (an id nobody can decode failed the stop checks of the whole batch)
        self.vocab_size = vocab_size or bundle.vocab_size
        self.settings = settings
        self.role = role
        self.context_length = context_length
        self.eos_ids = eos_ids
        self.detokenize = detokenize
        self.marks = marks
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"engine-{role}")
        self._executor.submit(torch.set_num_threads, settings.torch_threads).result()
        self._batcher = ContinuousBatcher(settings, self._decode_step)
        self._gate = PrefillGate()
        self._layout: tuple | None = None  # of the KV this engine's model makes
        if role != "prefill":  # decode checks each KV it takes against it (its own thread)
            self._layout = self._executor.submit(self._probe_layout).result()
        self._aborted: set[str] = set()
        self.image_end_id = image_end_id
        self.prefix_cache = prefix_cache_for(settings, role)
        self.guidance = guidance

    # ---- prefill -------------------------------------------------------------------------
    async def prefill(self, request: EngineRequest) -> PrefillResult:
        validate_request(request, self.context_length, self.vocab_size)
        timing: dict[str, float] = {}
        try:
            async with self._gate.turn(request.request_id, timing):
                if request.request_id in self._aborted:  # while it waited for its turn
                    raise asyncio.CancelledError(
                        f"request {request.request_id} aborted before its prefill")
                blob, (first, logprob), cached = await self._run_prefill(request)
        finally:
            self._aborted.discard(request.request_id)
        return PrefillResult(request.request_id, first, len(request.prompt_ids), blob,
                             cached_tokens=cached, compute_s=timing["compute_s"],
                             queue_s=timing["queue_s"], first_logprob=logprob)

    async def _run_prefill(self, request: EngineRequest,
                           ) -> tuple[KVBlob, tuple[int, TokenLogprob | None], int]:
        """The prompt's KV, its first token (and logprob), and how many of its tokens came from
        the cache."""
        from transformers import DynamicCache

        loop = asyncio.get_running_loop()
        prompt = request.prompt_ids
        arrays = [np.asarray(img) for img in request.images]
        cache, prefix = DynamicCache(), self.prefix_cache
        marks = hit = None
        if prefix is not None:
            marks = image_marks(prompt, [image_digest(a) for a in arrays],
                                self.bundle.image_token_id, self.image_end_id)
            # the last prompt token is always computed: its logits give the first token
            hit = prefix.acquire(prompt, request.cache_salt, marks, limit=len(prompt) - 1)
        try:
            done = hit.tokens if hit is not None else 0
            # only the uncached suffix is embedded, and only the images with a slot in it go
            # through the vision encoder (a conversation's earlier images are in the hit)
            first_image, skip = images_to_encode(prompt, len(arrays), done,
                                                 self.bundle.image_token_id, self.image_end_id)
            images = [torch.as_tensor(a) for a in arrays[first_image:]]
            try:
                embeds = await loop.run_in_executor(self._executor, self._embed,
                                                    torch.tensor([prompt[done:]]), images, skip)
            except (RuntimeError, ValueError, IndexError) as exc:
                if not images or isinstance(exc, torch.OutOfMemoryError):
                    raise
                raise InputRejected(f"the model's vision encoder could not take these images "
                                    f"({type(exc).__name__})", param="messages",
                                    request_id=request.request_id) from None
            if done:
                await loop.run_in_executor(self._executor, _load_blocks, cache, hit.blocks)
            self._gate.running[request.request_id] = done  # its KV held from now
            chunk = self.settings.prefill_chunk_tokens
            logits = None
            for start in range(done, len(prompt), chunk):
                if request.request_id in self._aborted:
                    raise asyncio.CancelledError(
                        f"request {request.request_id} aborted in prefill")
                end = min(start + chunk, len(prompt))
                logits = await loop.run_in_executor(self._executor, self._forward_chunk,
                                                    embeds[:, start - done:end - done], cache,
                                                    start)
                if request.request_id not in self._aborted:  # (an abort let its KV go)
                    self._gate.running[request.request_id] = end
            if request.request_id in self._aborted:  # during the last chunk: no KV kept
                raise asyncio.CancelledError(f"request {request.request_id} aborted in prefill")
        finally:
            if hit is not None:
                prefix.release(hit)
        if prefix is not None:
            size = prefix.block_tokens
            prefix.insert(prompt, request.cache_salt, marks,
                          lambda i: [(layer.keys[:, :, i * size:(i + 1) * size].clone(),
                                      layer.values[:, :, i * size:(i + 1) * size].clone())
                                     for layer in cache.layers])
        first = await loop.run_in_executor(self._executor, self._sample_first, request, logits)
        if request.request_id in self._aborted:  # acknowledged while the last steps ran
            raise asyncio.CancelledError(f"request {request.request_id} aborted in prefill")
        return KVBlob.from_cache(cache), first, done

    def _sample_first(self, request: EngineRequest, logits: torch.Tensor):
        sampler = Sampler(request.sampling, self.guidance, request.sampling.stop_context)
        return sample_batch([sampler], logits[None], [len(request.prompt_ids)])[0]

    @torch.inference_mode()
    def _embed(self, ids: torch.Tensor, images: list[torch.Tensor],
               skip_rows: int = 0) -> torch.Tensor:
        return self.bundle.embed(ids, images, skip_rows)

    @torch.inference_mode()
    def _forward_chunk(self, embeds: torch.Tensor, cache, start: int) -> torch.Tensor:
        positions = torch.arange(start, start + embeds.shape[1])[None]
        out = self.bundle.forward(cache, inputs_embeds=embeds, position_ids=positions)
        return out.logits[0, -1, :self.vocab_size].float()

    # ---- decode --------------------------------------------------------------------------
    def decode(self, request: EngineRequest, first_token: int,
               kv: KVBlob) -> AsyncIterator[TokenChunk]:
        validate_request(request, self.context_length, self.vocab_size)
        if kv is None or kv.num_tokens != len(request.prompt_ids):
            raise EngineError(f"KV for {request.request_id} does not match its prompt")
        if kv.layout() != self.kv_layout():  # it would fail the whole batch's next step
            raise EngineError(f"KV for {request.request_id} has another model's layout (a "
                              "prefill replica of another model or dtype?)")
        sampling = request.sampling
        seq = _Sequence(request, StopChecker(sampling, self.eos_ids, self.detokenize, self.marks),
                        layers=kv.to_layers(), last_token=first_token,
                        position=len(request.prompt_ids),
                        sampler=Sampler(sampling, self.guidance,
                                        (*sampling.stop_context, first_token)))
        return self._batcher.stream(seq, first_token)

    async def _decode_step(self, batch: list[_Sequence]) -> list[tuple[int, Any]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._step, batch)

    def _step(self, batch: list[_Sequence]) -> list[tuple[int, TokenLogprob | None]]:
        """One forward pass for the batch, then each row's token (on the engine's thread)."""
        rows_logits: list[torch.Tensor | None] = [None] * len(batch)
        for group in length_groups([seq.kv_tokens for seq in batch], ratio=PAD_RATIO,
                                   floor=PAD_FLOOR_TOKENS):
            logits, new_kv = self._forward_batch([batch[row] for row in group])
            for at, row in enumerate(group):
                rows_logits[row] = logits[at]
                seq = batch[row]
                if seq.done:
                    continue
                seq.layers = [(torch.cat([k, nk[at:at + 1]], dim=-2),
                               torch.cat([v, nv[at:at + 1]], dim=-2))
                              for (k, v), (nk, nv) in zip(seq.layers, new_kv)]
                seq.position += 1
        live = [row for row, seq in enumerate(batch) if not seq.done]
        sampled = sample_batch([batch[row].sampler for row in live],
                               torch.stack([rows_logits[row] for row in live]) if live
                               else torch.empty(0),
                               [batch[row].position for row in live])
        out: list[tuple[int, TokenLogprob | None]] = [(-1, None)] * len(batch)
        for row, (token, logprob) in zip(live, sampled):
            batch[row].last_token = token
            out[row] = (token, logprob)
        return out  # -1: aborted while the step ran, its KV already gone

    @torch.inference_mode()
    def _forward_batch(self, batch: list[_Sequence]):
        from transformers import DynamicCache

        longest = max(s.kv_tokens for s in batch)
        mask = torch.zeros(len(batch), longest + 1, dtype=torch.long)
        cache = DynamicCache()
        for layer in range(len(batch[0].layers)):
            keys = _left_pad([s.layers[layer][0] for s in batch], longest)
            values = _left_pad([s.layers[layer][1] for s in batch], longest)
            cache.update(keys, values, layer)
        for row, seq in enumerate(batch):
            mask[row, longest - seq.kv_tokens:] = 1
        ids = torch.tensor([[s.last_token] for s in batch])
        positions = torch.tensor([[s.position] for s in batch])
        out = self.bundle.forward(cache, input_ids=ids, attention_mask=mask,
                                  position_ids=positions)
        new_kv = [(layer.keys[:, :, -1:], layer.values[:, :, -1:]) for layer in cache.layers]
        return out.logits[:, -1, :self.vocab_size].float(), new_kv

    def kv_layout(self) -> tuple:
        """The layout of the KV this engine's model makes (`KVBlob.layout`)."""
        if self._layout is None:
            self._layout = self._executor.submit(self._probe_layout).result()
        return self._layout

    @torch.inference_mode()
    def _probe_layout(self) -> tuple:
        """A one-token forward's KV layout (on the engine's thread, at start)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        embeds = self.bundle.embed(torch.tensor([[0]]), [])
        self.bundle.forward(cache, inputs_embeds=embeds, position_ids=torch.tensor([[0]]))
        return KVBlob.from_cache(cache).layout()

    # ---- control -------------------------------------------------------------------------
    async def abort(self, request_id: str) -> bool:
        """Wherever the request is: waiting for its prefill, in it, or decoding."""
        if request_id in self._gate.queued:
            self._aborted.add(request_id)
            return True
        if request_id in self._gate.running:
            self._aborted.add(request_id)
            self._gate.running[request_id] = 0
            return True
        return self._batcher.drop(request_id)

    def handoff(self) -> None:
        """None: the stack moves this engine's KV (`services.kv.backends`)."""
        return None

    def stats(self) -> EngineStats:
        return engine_stats(self.kind, self.role, self._batcher, self._gate,
                            self.settings.kv_capacity_tokens, self.prefix_cache)


def images_to_encode(token_ids: list[int], n_images: int, done: int, img: int | None,
                     end: int | None) -> tuple[int, int]:
    """For a prefill that computes `token_ids[done:]`: the first image it must run the vision
    encoder on (the ones before have every slot before `done`), and how many leading rows of
    that image's features belong to slots before `done`. Images are told apart in the ids by
    their `[IMG_END]`; without its id every image is encoded (the rows before `done` skipped)."""
    covered = sum(1 for t in token_ids[:done] if t == img) if n_images and img is not None else 0
    if not covered:
        return 0, 0
    counts, inside = [], False
    for t in token_ids if end is not None else ():
        if t == end:
            inside = False
        elif t == img:
            if not inside:
                counts.append(0)
                inside = True
            counts[-1] += 1
    if len(counts) != n_images:  # unknown end, or ids that the images do not fill
        return 0, covered
    first = 0
    while first < n_images and covered >= counts[first]:
        covered -= counts[first]
        first += 1
    return first, covered


@torch.inference_mode()
def _load_blocks(cache, blocks) -> None:
    """Fill an empty transformers cache with cached blocks' KV, in order."""
    for layer in range(len(blocks[0].kv)):
        keys = torch.cat([b.kv[layer][0] for b in blocks], dim=-2)
        values = torch.cat([b.kv[layer][1] for b in blocks], dim=-2)
        cache.update(keys, values, layer)


def length_groups(lengths: list[int], *, ratio: float, floor: int) -> list[list[int]]:
    """The rows of a decode step cut into forward passes whose padding stays bounded: each
    group's rows hold at least 1/`ratio` of its longest row's KV, or the group's longest is at
    most `floor` tokens (padding that short costs less than another pass). One long sequence
    then costs its own pass, not its length times every short row's."""
    groups: list[list[int]] = []
    longest = 0
    for row in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        if groups and (lengths[row] * ratio >= longest or longest <= floor):
            groups[-1].append(row)
        else:
            groups.append([row])
            longest = lengths[row]
    return groups


def _left_pad(tensors: list[torch.Tensor], length: int) -> torch.Tensor:
    """Stack [1, h, n_i, d] tensors into [B, h, length, d], right-aligned (padding on the left)."""
    first = tensors[0]
    out = first.new_zeros(len(tensors), first.shape[1], length, first.shape[-1])
    for row, t in enumerate(tensors):
        out[row, :, length - t.shape[-2]:] = t[0]
    return out
