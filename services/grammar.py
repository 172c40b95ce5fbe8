"""Constrained decoding: Mistral's own grammar for a request's structured-output fields, and the
token masks that enforce it.

The grammar comes from mistral-common's factory (`mistral_common.guidance`), which knows where the
Mistral format puts `[THINK]…[/THINK]` and `[TOOL_CALLS]name[ARGS]{…}`; llguidance compiles it
against the tokenizer and answers, token by token, which ids may come next. The ingress builds and
checks the grammar (a schema the compiler cannot take is a 400 before any engine sees it); each
engine keeps one `Constraint` per running sequence and masks that sequence's logits with it.

Decisions where the spec leaves room:
- With reasoning off (effort `none`) the grammar has no reasoning section; with reasoning on,
  reasoning stays free text and the constraint applies after `[/THINK]`, but reasoning may use
  at most `reasoning_budget` tokens, so the constrained answer always has room in `max_tokens`;
  a forced tool call follows the reasoning at once (no free text before it, as without reasoning).
- A forced tool call (`tool_choice` `required` or named) follows the tool's `parameters` schema
  whether or not the tool says `strict`: a call the caller forced must be usable. A
  `json_schema` format is enforced whether or not it says `strict`; `json_object` is any object.
- JSON is compact (no free whitespace between tokens), so a bounded schema has a bounded answer.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from functools import cache, cached_property
from typing import Any

import numpy as np
import torch

from services.errors import InvalidRequest, clip
from services.tokenizer import PromptTokenizer, reason

# mistral-common's think template, as shipped: its reasoning rule, which we give a token budget
_THINK_RULE = "think: {{ begin_think_token }} content {{ end_think_token }}"
_TEXT_BEFORE_CALLS = "fcalls: content? {{ fcall }}"
_BUDGETED_THINK_RULE = ("think: {{ begin_think_token }} reasoning {{ end_think_token }}\n"
                        "reasoning[max_tokens=%d]: /(.|\\n)+/")
MATCHERS_KEPT = 64  # built matchers kept per process, by grammar (`Guidance._matcher`)
GRAMMARS_KEPT = 256  # requests' grammars kept per process, by their fields (`Guidance.grammar`)


def calls_constrained(tool_choice: Any, parallel_tool_calls: bool, strict: bool) -> bool:
    """Whether offered tools' calls need a grammar: a call forced (`required`, named), one call
    at most (`parallel_tool_calls` false), or a strict tool's arguments."""
    return tool_choice not in (None, "auto") or not parallel_tool_calls or strict


@dataclass(frozen=True)
class StructuredRequest:
    """The fields of a chat request that decide its grammar, as plain JSON values."""

    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    reasoning: bool = False
    reasoning_budget: int = 0

    @property
    def constrained(self) -> bool:
        """Whether the answer needs a grammar at all: a JSON format, a forced or single call,
        or a strict tool. Plain text with optional, loose tool calls stays unconstrained."""
        fmt = (self.response_format or {}).get("type", "text")
        if fmt != "text":
            return True
        if not self.tools or self.tool_choice == "none":
            return False
        return calls_constrained(self.tool_choice, self.parallel_tool_calls,
                                 any(t.get("function", {}).get("strict") for t in self.tools))

    def schemas(self) -> list[tuple[str, Any]]:
        """(field, JSON schema) of what the grammar is compiled from: response_format's schema,
        and the parameters of every tool a call is constrained to (all with `required`, the
        named one with a named choice, else the strict ones). Descriptions are not compiled."""
        out: list[tuple[str, Any]] = []
        fmt = self.response_format or {}
        if fmt.get("type", "text") != "text":
            out.append(("response_format.json_schema",
                        (fmt.get("json_schema") or {}).get("schema") or {}))
        if not self.tools or self.tool_choice == "none":
            return out
        named = self.tool_choice.get("function", {}).get("name") \
            if isinstance(self.tool_choice, dict) else None
        for i, tool in enumerate(self.tools):
            function = tool.get("function", {})
            if (named == function.get("name") if named is not None
                    else self.tool_choice == "required" or function.get("strict")):
                out.append((f"tools.{i}.function.parameters", function.get("parameters") or {}))
        return out

    @property
    def cause(self) -> str:
        """The request field that makes the answer constrained (what a refusal names)."""
        if (self.response_format or {}).get("type", "text") != "text":
            return "response_format"
        if self.tool_choice not in (None, "auto", "none"):
            return "tool_choice"
        strict = [i for i, t in enumerate(self.tools or ())
                  if t.get("function", {}).get("strict")]
        return f"tools.{strict[0]}.function.strict" if strict else "parallel_tool_calls"


class Guidance:
    """Grammars and matchers for one tokenizer (building its llguidance view takes ~1–2 s, once)."""

    def __init__(self, tokenizer: PromptTokenizer):
        self.tokenizer = tokenizer
        # a matcher per grammar, built once (a large schema's takes a tenth of a second and
        # more) and copied for each sequence; the engine threads and the ingress's compile
        # threads share it
        self._matchers = _Kept(MATCHERS_KEPT)
        # each request's grammar (or why there is none) by its structured fields: an app sends
        # the same schema with every request, compiled once
        self._grammars = _Kept(GRAMMARS_KEPT)

    @cached_property
    def factory(self):
        from mistral_common.guidance.grammar_factory import GrammarFactory

        return GrammarFactory(self.tokenizer.mistral)

    @property
    def llg_tokenizer(self):
        return self.factory.llg_tokenizer

    @cached_property
    def vocab_size(self) -> int:
        return self.llg_tokenizer.vocab_size

    def grammar(self, spec: StructuredRequest) -> str | None:
        """`_grammar(spec)`, the last `GRAMMARS_KEPT` answers kept (a refusal as well)."""
        if not spec.constrained:
            return None
        # (keys in the order given: a schema's property order is the order its answer keeps)
        key = hashlib.sha256(json.dumps(asdict(spec), ensure_ascii=True,
                                        default=str).encode()).hexdigest()
        known = self._grammars.get(key, _MISSING)
        if known is _MISSING:
            try:
                known = self._grammar(spec)
            except InvalidRequest as exc:
                known = exc
            self._grammars.put(key, known)
        if isinstance(known, InvalidRequest):
            raise InvalidRequest(known.message, param=known.param)
        return known

    def _grammar(self, spec: StructuredRequest) -> str | None:
        """The Lark grammar for a request, checked by the compiler against this tokenizer; None
        when unconstrained. Raises `InvalidRequest` naming the field it could not be built
        from: what the compiler's check refuses, and what it passes but cannot build a matcher
        of (llguidance's check does not build one: a schema of a few KB of nested `anyOf`s
        passes it, and its matcher is born stopped, allowing only the end of the answer, an
        empty 200 where a schema was promised). The engines copy that matcher per sequence
        (`constraint`)."""
        from mistral_common.exceptions import MistralCommonException

        import llguidance

        try:
            request = _mistral_request(spec)
            lark = self.factory.get_grammar_for_chat_request(request, self._template(spec))
            if lark is None:
                return None
            # (a lone surrogate in a schema, valid in the caller's JSON, is no UTF-8 for the
            # compiler: a UnicodeEncodeError, one of the ValueErrors)
            error = llguidance.LLMatcher.validate_grammar(
                llguidance.LLMatcher.grammar_from_lark(lark), self.llg_tokenizer)
        except (MistralCommonException, ValueError, TypeError) as exc:
            raise InvalidRequest(f"{field_of(spec)}: {clip(reason(exc))}",
                                 param=field_of(spec)) from None
        if not error and (matcher := self._matcher(lark)).is_error():
            error = matcher.get_error()
        if error:
            raise InvalidRequest(f"{field_of(spec)}: the grammar compiler cannot take this "
                                 f"schema: {clip(error.splitlines()[0])}", param=field_of(spec))
        return lark

    def constraint(self, grammar: str, history: tuple[int, ...] = ()) -> Constraint:
        """A fresh matcher for `grammar`, advanced over tokens already generated (`history`:
        a stream resumed on another replica, or decode after the first token)."""
        built = self._matcher(grammar)
        if built.is_error():  # refused at the ingress (`grammar`); never sampled unconstrained
            raise InvalidRequest("the request's grammar (from response_format or tools) cannot "
                                 f"be built: {clip(built.get_error().splitlines()[0])}",
                                 param="response_format")
        constraint = Constraint(built.deep_copy(), self.vocab_size)
        for token in history:
            constraint.advance(token)
        return constraint

    def _matcher(self, grammar: str):
        """The matcher built for `grammar` in its initial state (never advanced: callers copy
        it), the last `MATCHERS_KEPT` grammars kept."""
        matcher = self._matchers.get(grammar, None)
        if matcher is None:
            import llguidance

            matcher = llguidance.LLMatcher(self.llg_tokenizer,
                                           llguidance.LLMatcher.grammar_from_lark(grammar),
                                           log_level=0)
            self._matchers.put(grammar, matcher)
        return matcher

    def _template(self, spec: StructuredRequest) -> str:
        from mistral_common.guidance import grammar_factory as gf

        if not spec.reasoning:  # no reasoning section at all: the base template
            return gf.JINJA_PATHS[gf._GrammarVariant.base].read_text(encoding="utf-8")
        template = self.factory.select_jinja_template()
        if _THINK_RULE not in template:
            raise RuntimeError("mistral-common's think template changed; update services/grammar")
        budget = max(1, spec.reasoning_budget)
        # the answer starts with its reasoning, as the model does with reasoning on
        template = (template.replace(_THINK_RULE, _BUDGETED_THINK_RULE % budget)
                    .replace("think?", "think"))
        if spec.tool_choice not in (None, "auto", "none"):
            # a forced call follows the reasoning at once, as without reasoning (base template)
            if _TEXT_BEFORE_CALLS not in template:
                raise RuntimeError("mistral-common's think template changed; update "
                                   "services/grammar")
            template = template.replace(_TEXT_BEFORE_CALLS, "fcalls: {{ fcall }}")
        return template


_MISSING = object()


class _Kept:
    """The last `size` values put, by key, least recently used dropped first; shared by
    threads (the engines' and the ingress's compile threads)."""

    def __init__(self, size: int):
        self.size, self.values, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key: str, default: Any) -> Any:
        with self.lock:
            if key not in self.values:
                return default
            self.values.move_to_end(key)
            return self.values[key]

    def put(self, key: str, value: Any) -> None:
        with self.lock:
            self.values[key] = value
            while len(self.values) > self.size:
                self.values.popitem(last=False)


@cache
def warmed(tokenizer: PromptTokenizer) -> Guidance:
    """The process's one `Guidance` for `tokenizer`, its llguidance view (~40 MB, ~1–2 s)
    built on a background thread now so the first constrained request does not wait for it on
    the engine's thread; the ingress and the engines of an in-process stack share it."""
    guidance = Guidance(tokenizer)
    threading.Thread(target=lambda: guidance.factory, name="guidance-warm", daemon=True).start()
    return guidance


class Constraint:
    """One sequence's grammar state: which tokens may come next, and each token taken."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.bitmask = torch.full(((vocab_size + 31) // 32,), -1, dtype=torch.int32)

    def advance(self, token: int) -> None:
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token)

    def fill(self) -> torch.Tensor:
        """Compute the next-token bitmask into `self.bitmask` (one bit per token id)."""
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.data_ptr(),
                                             self.bitmask.numel() * 4)
        return self.bitmask

    @property
    def error(self) -> str:
        return self.matcher.get_error()


def allowed(bitmasks: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, V/32] int32 bitmasks → [B, vocab] bool, ids past the tokenizer's vocabulary False."""
    bits = np.unpackbits(bitmasks.numpy().view(np.uint8), axis=-1, bitorder="little")
    out = torch.zeros(bits.shape[0], vocab, dtype=torch.bool)
    width = min(vocab, bits.shape[1])
    out[:, :width] = torch.from_numpy(bits[:, :width].astype(bool))
    return out


def field_of(spec: StructuredRequest) -> str:
    """The request field a grammar problem is reported against."""
    fmt = (spec.response_format or {}).get("type", "text")
    if fmt == "json_schema":
        return "response_format.json_schema"
    if fmt != "text":
        return "response_format"
    return "tool_choice" if spec.tool_choice not in (None, "auto") else "tools"


def _mistral_request(spec: StructuredRequest):
    """mistral-common's request for the grammar factory: only the grammar's fields matter."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    tools = None
    if spec.tools:
        forced = spec.tool_choice not in (None, "auto", "none")
        tools = []
        for tool in spec.tools:
            function = dict(tool["function"])
            function["strict"] = bool(function.get("strict") or forced)
            if function.get("parameters"):
                function["parameters"] = _compact(function["parameters"])
            tools.append({**tool, "function": function})
    fields: dict[str, Any] = {"parallel_tool_calls": spec.parallel_tool_calls}
    if spec.tool_choice is not None:
        fields["tool_choice"] = spec.tool_choice
    fmt = spec.response_format
    if fmt is not None and fmt.get("type") != "text":
        # json_object is "some JSON object", as OpenAI's SDKs read it
        named = fmt.get("json_schema") or {"name": "json_object", "schema": {"type": "object"}}
        # the schema is enforced whether or not it says `strict` (mistral-common would only
        # keep "some JSON" of a loose one): constrained decoding can always honour it
        fields["response_format"] = {"type": "json_schema", "json_schema": {
            **named, "schema": _compact(named.get("schema") or {}), "strict": True}}
    return ChatCompletionRequest.from_openai([{"role": "user", "content": "-"}], tools=tools,
                                             **fields)


def _compact(schema: dict[str, Any]) -> dict[str, Any]:
    """JSON without free whitespace between tokens (llguidance's `x-guidance` option): what the
    model may write between values is then fixed, so a schema's answer has a bounded length."""
    return {**schema, "x-guidance": {**schema.get("x-guidance", {}), "whitespace_flexible": False}}
