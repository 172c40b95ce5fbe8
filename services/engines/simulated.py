"""The simulated engine: no model, tokens on a timing model (like Dynamo's mocker or llm-d's
inference simulator), so the whole stack runs at production-like timings on a CPU.

Timing: a prefill takes `prefill_base_ms + prefill_ms_per_token × uncached prompt tokens` (one at
a time, FIFO; the prefix cache is the reference engine's, block for block, holding no KV); a decode step for the running batch takes `decode_step_ms + decode_ms_per_seq × batch`, one
token per sequence. With every timing at 0 each step still yields to the event loop once, so this
mode measures the serving stack's own overhead. KV is accounted like a real engine (admission by
`max_running_requests` and `kv_capacity_tokens`), and its export (`SimulatedKV`) travels through
the real KV handoff.

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
from typing import Any

from services.engines.batching import ContinuousBatcher, PrefillGate, Sequence, engine_stats
from services.engines.prefix_cache import image_digest, image_marks, prefix_cache_for
from services.engines.protocol import EngineRequest, EngineStats, PrefillResult, TokenChunk
from services.engines.stops import OutputMarks, StopChecker
from services.engines.validation import validate_request
from services.errors import EngineError
from services.settings import EngineSettings
from services.tokenizer import PromptTokenizer

MLA_BYTES_PER_TOKEN = 23040  # Mistral Small 4: BF16 latent + rope key, 36 layers
EMPTY_TURN_REPLY = "ok"
COUNTER_WORDS = " tick tock"
_CONTROL_NAMES = ("[INST]", "[/INST]", "[THINK]", "[/THINK]", "[TOOL_CALLS]", "[ARGS]", "[IMG]",
                  "[IMG_BREAK]", "[IMG_END]", "[MODEL_SETTINGS]", "[/MODEL_SETTINGS]",
                  "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]")


@dataclass(frozen=True)
class SimulatedKV:
    """Stands in for a prompt's KV: its token count, and its size as the real model's would be."""

    num_tokens: int

    @property
    def nbytes(self) -> int:
        return self.num_tokens * MLA_BYTES_PER_TOKEN


@dataclass
class _Sequence(Sequence):
    """A decoding request with its output plan; `produced` counts tokens sampled so far."""

    plan: list[int] = field(default_factory=list)
    produced: int = 1

    @property
    def kv_tokens(self) -> int:
        # the last token sampled has no KV until the step that reads it (as the reference
        # engine and SGLang count it)
        return len(self.request.prompt_ids) + self.produced - 1

    def next_token(self) -> int:
        """The plan's next token; a plan that has run out starts over (counter, ignore_eos)."""
        token = self.plan[self.produced % len(self.plan)]
        self.produced += 1
        return token


class OutputPlanner:
    """The deterministic token plan of a prompt (see the module docstring)."""

    def __init__(self, tokenizer: PromptTokenizer, mode: str):
        self.tokenizer, self.mode = tokenizer, mode
        self.ids = {name: tokenizer.special(name) for name in _CONTROL_NAMES}
        self.image_ids = {self.ids["[IMG]"], self.ids["[IMG_BREAK]"], self.ids["[IMG_END]"]}
        self.counter = self.encode(COUNTER_WORDS)

    def encode(self, text: str) -> list[int]:
        """Plain text to Tekken ids, no BOS/EOS."""
        return list(self.tokenizer._raw.encode(text, bos=False, eos=False))

    def plan(self, prompt: list[int]) -> list[int]:
        """Every token the engine will emit for `prompt`, the first one included. A prompt
        that ends with the start of this plan (a stream resumed elsewhere) gets the rest of
        it, as a model continues its own output."""
        if self.mode == "counter":  # keyed by position, so a resumed request continues it
            k = len(prompt) % len(self.counter)
            return self.counter[k:] + self.counter[:k]
        end = self.ids["[/INST]"]
        turn_end = next((k for k in range(len(prompt) - 1, -1, -1) if prompt[k] == end), None)
        if turn_end is not None and turn_end < len(prompt) - 1:
            sent, full = prompt[turn_end + 1:], self._fresh_plan(prompt[:turn_end + 1])
            if full[:len(sent)] == sent:
                return full[len(sent):] or [self.tokenizer.eos_id]
        return self._fresh_plan(prompt)

    def _fresh_plan(self, prompt: list[int]) -> list[int]:
        echo = self._last_user_text(prompt) or self.encode(EMPTY_TURN_REPLY)
        eos = self.tokenizer.eos_id
        tool = self._first_tool_name(prompt)
        if tool and prompt[-1] == self.ids["[/INST]"]:
            args = json.dumps({"input": self.tokenizer.decode(echo)})
            return ([self.ids["[TOOL_CALLS]"]] + self.encode(tool) + [self.ids["[ARGS]"]]
                    + self.encode(args) + [eos])
        if self._effort(prompt) == "high":
            return [self.ids["[THINK]"]] + echo + [self.ids["[/THINK]"]] + echo + [eos]
        return echo + [eos]

    def _block(self, prompt: list[int], start: str, end: str) -> list[int]:
        """The ids between the first `start` control token and the `end` after it."""
        begin, finish = self.ids[start], self.ids[end]
        if begin not in prompt:
            return []
        i = prompt.index(begin)
        j = next((k for k in range(i + 1, len(prompt)) if prompt[k] == finish), i + 1)
        return prompt[i + 1:j]

    def _decoded_json(self, ids: list[int]) -> Any:
        """The JSON a block of ids spells, or None where it is absent or malformed."""
        try:
            return json.loads(self.tokenizer.decode(ids)) if ids else None
        except ValueError:
            return None

    def _effort(self, prompt: list[int]) -> str | None:
        """The `reasoning_effort` in the prompt's model settings, if any."""
        settings = self._decoded_json(self._block(prompt, "[MODEL_SETTINGS]", "[/MODEL_SETTINGS]"))
        return settings.get("reasoning_effort") if isinstance(settings, dict) else None

    def _first_tool_name(self, prompt: list[int]) -> str | None:
        """The name of the first tool the prompt offers, if any."""
        tools = self._decoded_json(self._block(prompt, "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]"))
        try:
            return str(tools[0]["function"]["name"])
        except (TypeError, KeyError, IndexError):
            return None

    def _last_user_text(self, prompt: list[int]) -> list[int]:
        """The ids of the last `[INST]…[/INST]` turn, image tokens left out."""
        start, end = self.ids["[INST]"], self.ids["[/INST]"]
        i = next((k for k in range(len(prompt) - 1, -1, -1) if prompt[k] == start), None)
        if i is None:
            return []
        j = next((k for k in range(i + 1, len(prompt)) if prompt[k] == end), len(prompt))
        return [t for t in prompt[i + 1:j] if t not in self.image_ids]


class SimulatedEngine:
    """An engine with the reference engine's semantics and a timing model instead of a model."""

    kind = "simulated"
    probed_health = False  # health is its decode steps' (`ContinuousBatcher.health`)

    def __init__(self, settings: EngineSettings, *, role: str, context_length: int,
                 tokenizer: PromptTokenizer):
        self.settings, self.timing = settings, settings.simulated
        self.role, self.context_length, self.tokenizer = role, context_length, tokenizer
        self.planner = OutputPlanner(tokenizer, self.timing.output)
        self.marks = OutputMarks.of(tokenizer)
        self._batcher = ContinuousBatcher(settings, self._decode_step)
        self._gate = PrefillGate()
        self._prefills: dict[str, asyncio.Task] = {}
        self.prefix_cache = prefix_cache_for(settings, role)

    async def prefill(self, request: EngineRequest) -> PrefillResult:
        """Wait for the prefill turn, spend the prompt's prefill time, answer the first token.

        The work runs as its own task so `abort` can cancel it wherever it is (queued or running);
        the caller then sees `asyncio.CancelledError`, as with the reference engine.
        """
        validate_request(request, self.context_length, self.tokenizer.vocab_size,
                         logits=False)
        task = asyncio.ensure_future(self._prefill_in_turn(request))
        self._prefills[request.request_id] = task
        try:
            return await task
        finally:
            if self._prefills.get(request.request_id) is task:
                del self._prefills[request.request_id]

    async def _prefill_in_turn(self, request: EngineRequest) -> PrefillResult:
        n, timing, cached = len(request.prompt_ids), {}, 0
        async with self._gate.turn(request.request_id, timing):
            self._gate.running[request.request_id] = n
            prefix, marks = self.prefix_cache, None
            if prefix is not None:
                digests = [repr(i).encode() if _is_ref(i) else image_digest(i)
                           for i in request.images]
                marks = image_marks(request.prompt_ids, digests, self.planner.ids["[IMG]"],
                                    self.planner.ids["[IMG_END]"])
                hit = prefix.acquire(request.prompt_ids, request.cache_salt, marks, limit=n - 1)
                prefix.release(hit)  # nothing to read: the simulated KV is a count
                cached = hit.tokens
            await asyncio.sleep((self.timing.prefill_base_ms
                                 + self.timing.prefill_ms_per_token * (n - cached)) / 1000.0)
            if prefix is not None:
                prefix.insert(request.prompt_ids, request.cache_salt, marks, lambda i: None)
            first = self.planner.plan(request.prompt_ids)[0]
        return PrefillResult(request.request_id, first, n, SimulatedKV(n), cached_tokens=cached,
                             compute_s=timing["compute_s"], queue_s=timing["queue_s"])

    def decode(self, request: EngineRequest, first_token: int,
               kv: SimulatedKV) -> AsyncIterator[TokenChunk]:
        """Join the running batch; stream the plan after `first_token` until a stop."""
        validate_request(request, self.context_length, self.tokenizer.vocab_size,
                         logits=False)
        if kv is None or getattr(kv, "num_tokens", None) != len(request.prompt_ids):
            raise EngineError(f"KV for {request.request_id} does not match its prompt")
        stops = StopChecker(request.sampling, (self.tokenizer.eos_id,), self.tokenizer.decode,
                            self.marks)
        seq = _Sequence(request, stops, plan=self.planner.plan(request.prompt_ids))
        return self._batcher.stream(seq, first_token)

    async def _decode_step(self, batch: list[_Sequence]) -> list[tuple[int, None]]:
        await asyncio.sleep((self.timing.decode_step_ms
                             + self.timing.decode_ms_per_seq * len(batch)) / 1000.0)
        return [(seq.next_token(), None) for seq in batch]

    async def abort(self, request_id: str) -> bool:
        """Free the request now, wherever it is; False when this engine does not hold it."""
        task = self._prefills.pop(request_id, None)
        if task is None or task.done():
            return self._batcher.drop(request_id)
        task.cancel()
        await asyncio.sleep(0)  # let the cancelled prefill leave the gate before we answer
        return True

    def handoff(self) -> None:
        """None: the stack moves this engine's KV (`services.kv.backends`)."""
        return None

    def stats(self) -> EngineStats:
        """Running/waiting requests and KV held, prefill and decode together."""
        return engine_stats(self.kind, self.role, self._batcher, self._gate,
                            self.settings.kv_capacity_tokens, self.prefix_cache)


def _is_ref(image: Any) -> bool:
    """An object-store reference (the simulated engine never fetches pixels)."""
    return type(image).__name__ == "ObjectRef"
