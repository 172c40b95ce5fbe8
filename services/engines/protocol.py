"""The engine seam: what every engine (reference, simulated, SGLang) offers the workers.

Calling convention:
- `prefill(request)` runs the whole prompt and returns a `PrefillResult`: the first sampled token
  and the engine's KV export (`kv`; None where the engine hands KV over by itself, as SGLang does
  through its bootstrap server).
- `decode(request, first_token, kv)` is an async iterator of `TokenChunk`s: the tokens sampled
  *after* `first_token`, in order, several per chunk when the engine is ahead of its consumer. The
  last chunk has `finish_reason` set. Closing the iterator early aborts the request.
- `abort(request_id)` frees the request's KV at once, wherever it is (waiting, prefilling,
  decoding); it returns whether the engine held the request.
- `stats()` is cheap and synchronous: running/waiting requests, KV tokens held and capacity, health.
Errors are `services.errors.StackError`s: `InvalidRequest` for the client's mistakes (named field),
`EngineError` for the engine's own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling for one request; `temperature == 0` is greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Tokens generated before this leg (a stream resumed on another replica): a stop string may
    # begin in them and end in this leg's output, and penalties and the grammar replay them.
    stop_context: tuple[int, ...] = ()
    # Structured output: a Lark grammar (mistral-common's, checked by the ingress) the tokens
    # must follow; None is free text.
    grammar: str | None = None
    grammar_field: str = "response_format"  # the request field it comes from (errors name it)
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Ids never sampled: the call marker where no tools are offered, whose call nobody would
    # parse (an engine whose output is planned, not sampled, never plans them)
    banned_ids: tuple[int, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # None: no logprobs; k >= 0: each token's logprob and the k most likely alternatives
    logprobs: int | None = None


@dataclass
class EngineRequest:
    """What an engine sees: token ids, sampling, images as CHW float32 arrays (or refs to them)."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    images: list[Any] = field(default_factory=list)
    trace_headers: dict[str, str] = field(default_factory=dict)
    # Engine-specific routing fields (SGLang bootstrap host/port/room); empty for the reference.
    handoff: dict[str, Any] = field(default_factory=dict)
    # Prefix caching: only prompts of the same salt share cached KV (one per tenant by default).
    cache_salt: str = ""

    @property
    def prompt(self) -> str:
        """The prompt as one character per token id: what a text-reading router (Ray's
        PrefixCacheAffinityRouter) matches prefixes on, exactly as the ids do."""
        return "".join(map(chr, self.prompt_ids))


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's logprob and the most likely alternatives (id, logprob), best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class PrefillResult:
    """The first sampled token and the KV export of a prompt."""

    request_id: str
    first_token: int
    prompt_tokens: int
    kv: Any = None
    cached_tokens: int = 0
    compute_s: float = 0.0
    queue_s: float = 0.0
    first_logprob: TokenLogprob | None = None


@dataclass
class TokenChunk:
    """Tokens produced since the last chunk; `finish_reason` set on the last one."""

    token_ids: list[int]
    finish_reason: FinishReason | None = None
    # one per token when the request asked for logprobs
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class EngineStats:
    """A point-in-time view of an engine's load and health."""

    kind: str
    role: str
    running: int
    waiting: int
    kv_tokens: int
    kv_capacity: int
    healthy: bool = True
    detail: str = ""
    # prefix cache: prompt tokens looked up and served from it since start, tokens held now
    cache_lookup_tokens: int = 0
    cache_hit_tokens: int = 0
    cache_tokens: int = 0


@runtime_checkable
class Engine(Protocol):
    """Prefill, decode, abort, stats: the four calls a worker makes on its engine. An abort
    frees the request's KV at once; a decode stream it ends raises `EngineUnavailable` to a
    reader still there (retryable: the engine let go, the request did not fail).
    `probed_health`: `stats().healthy` comes from a probe through the engine itself (a failed
    one means it cannot produce a token, idle or not), not from its last step's outcome."""

    probed_health: bool

    async def prefill(self, request: EngineRequest) -> PrefillResult: ...

    def decode(self, request: EngineRequest, first_token: int, kv: Any) -> AsyncIterator[TokenChunk]: ...

    async def abort(self, request_id: str) -> bool: ...

    def stats(self) -> EngineStats: ...

    def handoff(self) -> Any:
        """The KV handoff this engine runs itself (SGLang's: its engines move the KV between
        them), or None where the stack moves the KV (`services.kv.backends`)."""
