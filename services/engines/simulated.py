"""The simulated engine: no model, tokens on a timing model (like Dynamo's mocker or llm-d's
inference simulator), so the whole stack runs at production-like timings on a CPU.

Timing: a prefill takes `prefill_base_ms + prefill_ms_per_token × prompt tokens` (one at a time);
a decode step for the running batch takes `decode_step_ms + decode_ms_per_seq × batch`, one token
per sequence. KV is accounted like a real engine (admission by `max_running_requests` and
`kv_capacity_tokens`), and its export (`SimulatedKV`) travels through the real KV handoff.

Output is deterministic. `echo`: the last user turn's text, wrapped in `[THINK]…[/THINK]` and
repeated when the prompt's model settings ask for effort `high`, or, when tools are offered and
the last turn is the user's, one call of the first tool with `{"input": <text>}`; then `</s>`.
`counter`: ordinary words forever, so a request runs to `max_tokens` (throughput runs).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from services.engines.protocol import EngineRequest, EngineStats, PrefillResult, TokenChunk
from services.engines.stops import StopChecker
from services.engines.validation import validate_request
from services.errors import EngineError
from services.settings import EngineSettings
from services.tokenizer import PromptTokenizer

MLA_BYTES_PER_TOKEN = 23040  # Mistral Small 4, BF16 latent + rope key, 36 layers


@dataclass
class SimulatedKV:
    """Stands in for a prompt's KV: its size, as the real model's would be."""

    num_tokens: int

    @property
    def nbytes(self) -> int:
        return self.num_tokens * MLA_BYTES_PER_TOKEN


@dataclass
class _Sequence:
    request: EngineRequest
    plan: list[int]
    stops: StopChecker
    produced: int = 1
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    done: bool = False

    @property
    def reserved(self) -> int:
        return len(self.request.prompt_ids) + self.request.sampling.max_tokens

    @property
    def kv_tokens(self) -> int:
        return len(self.request.prompt_ids) + self.produced


class OutputPlanner:
    """The deterministic token plan of a prompt (see module docstring)."""

    def __init__(self, tokenizer: PromptTokenizer, mode: str):
        self.tok, self.mode = tokenizer, mode
        self.ids = {n: tokenizer.special(n) for n in (
            "[INST]", "[/INST]", "[THINK]", "[/THINK]", "[TOOL_CALLS]", "[ARGS]", "[IMG]",
            "[IMG_BREAK]", "[IMG_END]", "[MODEL_SETTINGS]", "[/MODEL_SETTINGS]",
            "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]")}
        self.words = self._text(" tick tock")

    def _text(self, text: str) -> list[int]:
        return list(self.tok._raw.encode(text, bos=False, eos=False))

    def plan(self, prompt: list[int], budget: int) -> list[int]:
        if self.mode == "counter":
            return (self.words * (budget // len(self.words) + 1))[:budget]
        echo = self._last_user(prompt) or self._text("ok")
        tools = self._block(prompt, "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]")
        if tools and prompt[-1] == self.ids["[/INST]"]:
            name = json.loads(self.tok.decode(tools))[0]["function"]["name"]
            args = json.dumps({"input": self.tok.decode(echo)})
            return ([self.ids["[TOOL_CALLS]"]] + self._text(name) + [self.ids["[ARGS]"]]
                    + self._text(args) + [self.tok.eos_id])
        settings = self.tok.decode(self._block(prompt, "[MODEL_SETTINGS]", "[/MODEL_SETTINGS]"))
        if settings and json.loads(settings).get("reasoning_effort") == "high":
            return [self.ids["[THINK]"]] + echo + [self.ids["[/THINK]"]] + echo + [self.tok.eos_id]
        return echo + [self.tok.eos_id]

    def _block(self, prompt: list[int], start: str, end: str) -> list[int]:
        a, b = self.ids[start], self.ids[end]
        if a not in prompt or b not in prompt:
            return []
        i = prompt.index(a)
        return prompt[i + 1:prompt.index(b, i)]

    def _last_user(self, prompt: list[int]) -> list[int]:
        start, end = self.ids["[INST]"], self.ids["[/INST]"]
        if start not in prompt:
            return []
        i = len(prompt) - 1 - prompt[::-1].index(start)
        j = prompt.index(end, i) if end in prompt[i:] else len(prompt)
        images = {self.ids["[IMG]"], self.ids["[IMG_BREAK]"], self.ids["[IMG_END]"]}
        return [t for t in prompt[i + 1:j] if t not in images]


class SimulatedEngine:
    """An engine with the reference engine's semantics and a timing model instead of a model."""

    kind = "simulated"

    def __init__(self, settings: EngineSettings, *, role: str, context_length: int,
                 tokenizer: PromptTokenizer):
        self.settings, self.timing = settings, settings.simulated
        self.role, self.context_length, self.tokenizer = role, context_length, tokenizer
        self.planner = OutputPlanner(tokenizer, self.timing.output)
        self._running: dict[str, _Sequence] = {}
        self._waiting: deque[_Sequence] = deque()
        self._prefilling: dict[str, int] = {}
        self._prefill_waiting = 0
        self._prefill_lock: asyncio.Lock | None = None
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None

    async def prefill(self, request: EngineRequest) -> PrefillResult:
        validate_request(request, self.context_length, self.tokenizer.vocab_size)
        self._prefill_lock = self._prefill_lock or asyncio.Lock()
        queued = time.perf_counter()
        self._prefill_waiting += 1
        try:
            await self._prefill_lock.acquire()
        finally:
            self._prefill_waiting -= 1
        started = time.perf_counter()
        n = len(request.prompt_ids)
        self._prefilling[request.request_id] = n
        try:
            await asyncio.sleep((self.timing.prefill_base_ms
                                 + self.timing.prefill_ms_per_token * n) / 1000.0)
            first = self.planner.plan(request.prompt_ids, 1)[0]
        finally:
            self._prefilling.pop(request.request_id, None)
            self._prefill_lock.release()
        done = time.perf_counter()
        return PrefillResult(request.request_id, first, n, SimulatedKV(n),
                             compute_s=done - started, queue_s=started - queued)

    async def decode(self, request: EngineRequest, first_token: int,
                     kv: SimulatedKV) -> AsyncIterator[TokenChunk]:
        validate_request(request, self.context_length, self.tokenizer.vocab_size)
        if kv is None or kv.num_tokens != len(request.prompt_ids):
            raise EngineError(f"KV for {request.request_id} does not match its prompt")
        plan = self.planner.plan(request.prompt_ids, request.sampling.max_tokens)
        seq = _Sequence(request, plan, StopChecker(request.sampling, (self.tokenizer.eos_id,),
                                                   self.tokenizer.decode))
        finish = seq.stops.check([first_token])
        if finish:
            yield TokenChunk([], finish)
            return
        self._waiting.append(seq)
        self._ensure_loop()
        try:
            while True:
                tokens, finish = await self._next_chunk(seq)
                yield TokenChunk(tokens, finish)
                if finish:
                    return
        finally:
            if not seq.done:
                self._drop(request.request_id)

    async def _next_chunk(self, seq: _Sequence) -> tuple[list[int], str | None]:
        tokens, finish = [], None
        item = await seq.queue.get()
        while True:
            if isinstance(item, BaseException):
                raise item
            token, finish = item
            tokens.append(token)
            if finish or seq.queue.empty():
                return tokens, finish
            item = seq.queue.get_nowait()

    def _ensure_loop(self) -> None:
        self._wake = self._wake or asyncio.Event()
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
        while True:
            self._admit()
            if not self._running:
                self._wake.clear()
                if not self._waiting:
                    return
                await self._wake.wait()
                continue
            batch = list(self._running.values())
            await asyncio.sleep((self.timing.decode_step_ms
                                 + self.timing.decode_ms_per_seq * len(batch)) / 1000.0)
            for seq in batch:
                if seq.done:
                    continue
                token = seq.plan[seq.produced % len(seq.plan)]
                seq.produced += 1
                finish = seq.stops.check([token])
                if finish:
                    seq.done = True
                    self._running.pop(seq.request.request_id, None)
                seq.queue.put_nowait((token, finish))

    def _drop(self, request_id: str) -> bool:
        seq = self._running.pop(request_id, None)
        if seq is None:
            seq = next((s for s in self._waiting if s.request.request_id == request_id), None)
            if seq is not None:
                self._waiting.remove(seq)
        if seq is None:
            return False
        seq.done = True
        seq.queue.put_nowait(asyncio.CancelledError(f"request {request_id} aborted"))
        return True

    async def abort(self, request_id: str) -> bool:
        return self._drop(request_id)

    def stats(self) -> EngineStats:
        live = [s for s in self._running.values() if not s.done] + list(self._waiting)
        return EngineStats(self.kind, self.role,
                           running=len(self._running) + len(self._prefilling),
                           waiting=len(self._waiting) + self._prefill_waiting,
                           kv_tokens=sum(s.kv_tokens for s in live) + sum(self._prefilling.values()),
                           kv_capacity=self.settings.kv_capacity_tokens)
