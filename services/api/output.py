"""Generated token ids → OpenAI output: content, `reasoning_content`, `tool_calls`, incrementally.

Parsing is by token id, never by text, so user text that merely looks like `[THINK]` is never
mistaken for the control token. States of `OutputParser`:

    CONTENT ──[THINK]──▶ REASONING ──[/THINK]──▶ CONTENT
    CONTENT ──[TOOL_CALLS]──▶ TOOL_NAME ──[ARGS]──▶ TOOL_ARGS ──[TOOL_CALLS]──▶ TOOL_NAME …
    any ──</s>──▶ DONE

Decisions: with tools disabled (`tool_choice: none` or no tools), `[TOOL_CALLS]` and what follows
is plain content. A tool call's arguments are returned as generated even when they are not valid
JSON (clients validate, as with OpenAI). An unclosed `[THINK]` keeps its text as reasoning. Stop
strings apply to content: text that could begin a stop string is held back while streaming, and
content is cut at the first stop string.
"""

from __future__ import annotations

import enum
import secrets
import string
from dataclasses import dataclass, field

from services.tokenizer import PromptTokenizer

_ALNUM = string.ascii_letters + string.digits


class State(enum.Enum):
    CONTENT = "content"
    REASONING = "reasoning"
    TOOL_NAME = "tool_name"
    TOOL_ARGS = "tool_args"
    DONE = "done"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass
class OutputDelta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


def new_call_id() -> str:
    """A tool call id in Mistral's format: 9 alphanumeric characters."""
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


class IncrementalDetokenizer:
    """Text of a growing id sequence, emitted piecewise, never splitting a UTF-8 character.

    Decodes only a window: ids since the last emitted boundary (`prefix`) and the new ones;
    text ending in U+FFFD (an incomplete byte sequence) is held until it completes.
    """

    def __init__(self, tokenizer: PromptTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def feed(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if not final and after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]


class _StopHold:
    """Holds back content that could be the start of a stop string; cuts at a stop string."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if not self.stops or self.stopped:
            return "" if self.stopped else text
        self.pending += text
        cut = min((i for s in self.stops if (i := self.pending.find(s)) >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        keep = max((k for s in self.stops for k in range(1, len(s))
                    if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class OutputParser:
    """Feed generated ids; get content/reasoning/tool-call deltas; `finish` for the last one."""

    def __init__(self, tokenizer: PromptTokenizer, *, tools_enabled: bool,
                 stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.tools_enabled = tools_enabled
        self.marks = {name: tokenizer.special(name)
                      for name in ("[THINK]", "[/THINK]", "[TOOL_CALLS]", "[ARGS]")}
        self.eos = tokenizer.eos_id
        self.state = State.CONTENT
        self.text = IncrementalDetokenizer(tokenizer)
        self.hold = _StopHold(stop)
        self.calls: list[ToolCall] = []
        self._name: list[int] = []
        self._args: list[int] = []
        self.completion_tokens = 0
        self.reasoning_tokens = 0

    def feed(self, ids: list[int]) -> OutputDelta:
        delta = OutputDelta()
        for token in ids:
            self.completion_tokens += 1
            if self.state is State.DONE:
                continue
            self._step(token, delta)
        self._drain_text(delta)
        return delta

    def _step(self, token: int, delta: OutputDelta) -> None:
        m, state = self.marks, self.state
        if state is State.REASONING and token != self.eos:
            self.reasoning_tokens += 1
        if token == self.eos:
            self._end_segment(delta)
            self.state = State.DONE
        elif state is State.CONTENT and token == m["[THINK]"]:
            self._switch(State.REASONING, delta)
            self.reasoning_tokens += 1
        elif state is State.REASONING and token == m["[/THINK]"]:
            self._switch(State.CONTENT, delta)
        elif token == m["[TOOL_CALLS]"] and self.tools_enabled and state is not State.REASONING:
            self._end_segment(delta)
            self.state = State.TOOL_NAME
        elif state is State.TOOL_NAME and token == m["[ARGS]"]:
            self.state = State.TOOL_ARGS
        elif state is State.TOOL_NAME:
            self._name.append(token)
        elif state is State.TOOL_ARGS:
            self._args.append(token)
        else:
            self._drain_text(delta, self.text.feed([token]))

    def _switch(self, state: State, delta: OutputDelta) -> None:
        self._drain_text(delta, self.text.flush())
        self.text = IncrementalDetokenizer(self.tokenizer)
        self.state = state

    def _drain_text(self, delta: OutputDelta, text: str = "") -> None:
        if not text:
            return
        if self.state is State.REASONING:
            delta.reasoning += text
        else:
            delta.content += self.hold.push(text)

    def _end_segment(self, delta: OutputDelta) -> None:
        """Close whatever is open: flush text, or complete a pending tool call."""
        if self.state in (State.TOOL_NAME, State.TOOL_ARGS):
            call = ToolCall(new_call_id(), self.tokenizer.decode(self._name).strip(),
                            self.tokenizer.decode(self._args).strip())
            self._name, self._args = [], []
            self.calls.append(call)
            delta.tool_calls.append(call)
        else:
            self._drain_text(delta, self.text.flush())

    def finish(self, finish_reason: str | None) -> tuple[OutputDelta, str]:
        """Flush what is pending; the OpenAI finish reason (tool_calls when calls were made)."""
        delta = OutputDelta()
        if self.state is not State.DONE:
            self._end_segment(delta)
            self.state = State.DONE
        delta.content += self.hold.flush()
        reason = finish_reason or "stop"
        if self.calls and reason == "stop":
            reason = "tool_calls"
        return delta, reason


def parse_completion(tokenizer: PromptTokenizer, ids: list[int], finish_reason: str, *,
                     tools_enabled: bool, stop: tuple[str, ...] = ()):
    """Non-streaming parse: (content, reasoning, tool_calls, finish_reason)."""
    parser = OutputParser(tokenizer, tools_enabled=tools_enabled, stop=stop)
    first = parser.feed(ids)
    last, reason = parser.finish(finish_reason)
    return (first.content + last.content, first.reasoning + last.reasoning,
            first.tool_calls + last.tool_calls, reason)
