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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from services.engines.batching import ContinuousBatcher, PrefillGate, Sequence, engine_stats
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
class _Sequence(Sequence):
    plan: list[int] = field(default_factory=list)
    produced: int = 1

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
        self._batcher = ContinuousBatcher(settings, self._decode_step)
        self._gate = PrefillGate()

    async def prefill(self, request: EngineRequest) -> PrefillResult:
        validate_request(request, self.context_length, self.tokenizer.vocab_size)
        n, timing = len(request.prompt_ids), {}
        async with self._gate.turn(request.request_id, timing):
            self._gate.running[request.request_id] = n
            await asyncio.sleep((self.timing.prefill_base_ms
                                 + self.timing.prefill_ms_per_token * n) / 1000.0)
            first = self.planner.plan(request.prompt_ids, 1)[0]
        return PrefillResult(request.request_id, first, n, SimulatedKV(n),
                             compute_s=timing["compute_s"], queue_s=timing["queue_s"])

    def decode(self, request: EngineRequest, first_token: int,
               kv: SimulatedKV) -> AsyncIterator[TokenChunk]:
        validate_request(request, self.context_length, self.tokenizer.vocab_size)
        if kv is None or kv.num_tokens != len(request.prompt_ids):
            raise EngineError(f"KV for {request.request_id} does not match its prompt")
        stops = StopChecker(request.sampling, (self.tokenizer.eos_id,), self.tokenizer.decode)
        seq = _Sequence(request, stops,
                        plan=self.planner.plan(request.prompt_ids, request.sampling.max_tokens))
        return self._batcher.stream(seq, first_token)

    async def _decode_step(self, batch: list[_Sequence]) -> list[int]:
        await asyncio.sleep((self.timing.decode_step_ms
                             + self.timing.decode_ms_per_seq * len(batch)) / 1000.0)
        tokens = []
        for seq in batch:
            tokens.append(seq.plan[seq.produced % len(seq.plan)])
            seq.produced += 1
        return tokens

    async def abort(self, request_id: str) -> bool:
        return self._batcher.drop(request_id)

    def stats(self) -> EngineStats:
        return engine_stats(self.kind, self.role, self._batcher, self._gate,
                            self.settings.kv_capacity_tokens)
