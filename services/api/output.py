"""Generated token ids → OpenAI output: content, `reasoning_content`, `tool_calls`, incrementally.

Mistral Small 4 writes `[THINK]reasoning[/THINK]answer</s>`, and tool calls as
`[TOOL_CALLS]name[ARGS]{json}` repeated for parallel calls. Every marker is a single control
token, so parsing is by token id, never by text: user text that merely reads `[THINK]` is content.
`OutputParser` is a state machine over those ids:

    CONTENT   ──[THINK]──────▶ REASONING ──[/THINK]──▶ CONTENT
    CONTENT   ──[TOOL_CALLS]─▶ TOOL_NAME ──[ARGS]────▶ TOOL_ARGS ──[TOOL_CALLS]──▶ TOOL_NAME …
    REASONING ──[TOOL_CALLS]─▶ TOOL_NAME   (a tool call ends an unclosed thought)
    any       ──</s> or a stop string in content──▶ DONE   (later ids are counted, never shown)

Decisions:
- Markers are never shown: a stray `[/THINK]` in content or a nested `[THINK]` is dropped.
- With tools disabled (no tools, or `tool_choice: none`) the model was not offered tools; a call
  it emits anyway is parsed the same way and then dropped: never returned as a call, never shown
  as `[TOOL_CALLS]…` text in content, and the finish reason stays the engine's.
- A call is complete at the next `[TOOL_CALLS]`, at `</s>` or at `finish`; its arguments are
  returned as generated (stripped of surrounding whitespace) even when they are not valid JSON,
  as OpenAI does: clients validate. Inside a call, every id but `[TOOL_CALLS]`, `[ARGS]` and
  `</s>` is call text.
- An unclosed `[THINK]` keeps its text as reasoning.
- Stop strings apply to content only. While streaming, the tail of content that could begin a
  stop string is held back until it cannot; content ends before the first stop string.
"""

from __future__ import annotations

import enum
import secrets
import string
from dataclasses import dataclass, field

from services.tokenizer import PromptTokenizer

_ALPHANUMERIC = string.ascii_letters + string.digits
_REPLACEMENT = "\ufffd"
# Window length (ids) past which settled leading ids are dropped. Real text ends a character
# within a few ids, so only runs of invalid bytes get here; this keeps each feed O(window).
_MAX_WINDOW = 16


class State(enum.Enum):
    """Where `OutputParser` is in the generated sequence."""

    CONTENT = "content"
    REASONING = "reasoning"
    TOOL_NAME = "tool_name"
    TOOL_ARGS = "tool_args"
    DONE = "done"


@dataclass(frozen=True)
class ToolCall:
    """One parsed tool call; `arguments` is the JSON text as generated, possibly invalid."""

    id: str
    name: str
    arguments: str


@dataclass
class OutputDelta:
    """What one `feed` or `finish` adds: text and the tool calls completed by it."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


def new_call_id() -> str:
    """A tool call id in Mistral's format: 9 random alphanumeric characters."""
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))


class IncrementalDetokenizer:
    """Text of a growing id sequence, returned piecewise, never splitting a UTF-8 character.

    Tekken is byte-level BPE: an id may carry part of a character, which decodes to U+FFFD. Only
    the window of ids since the last character boundary is decoded; its text up to a trailing
    U+FFFD is returned and the rest held until later ids complete it (or `flush`). Concatenating
    every return value gives `tokenizer.decode` of all ids, invalid bytes included.
    """

    def __init__(self, tokenizer: PromptTokenizer):
        self._decode = tokenizer.decode
        self._window: list[int] = []
        self._sent = 0

    def feed(self, ids: list[int]) -> str:
        """The new text that `ids` complete."""
        if not ids:
            return ""
        self._window.extend(ids)
        text = self._decode(self._window)
        if not text.endswith(_REPLACEMENT):
            new = text[self._sent:]
            self._window, self._sent = [], 0
            return new
        ready = len(text.rstrip(_REPLACEMENT))
        new = text[self._sent:ready]
        self._sent = max(self._sent, ready)
        if len(self._window) > _MAX_WINDOW:
            new += self._drop_settled_head(text)
        return new

    def _drop_settled_head(self, text: str) -> str:
        """Drop leading ids whose text no later id can change; return its part not yet sent.

        A split is settled when decoding both sides apart gives the window's text: the id after
        it does not continue a character, so no later id can. A character is at most four bytes,
        so of four boundaries between single-byte ids, one is settled.
        """
        for split in range(len(self._window) - 1, len(self._window) - 5, -1):
            head = self._decode(self._window[:split])
            if head + self._decode(self._window[split:]) == text:
                new = head[self._sent:]
                self._window = self._window[split:]
                self._sent = max(self._sent - len(head), 0)
                return new
        return ""

    def flush(self) -> str:
        """Whatever is held, incomplete characters as U+FFFD; the sequence may go on afresh."""
        new = self._decode(self._window)[self._sent:] if self._window else ""
        self._window, self._sent = [], 0
        return new


class StopStringHold:
    """Content up to the first stop string, holding back a tail that could begin one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The part of `text` (after what was held) that is safe to show now."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        self.held += text
        cut = min((i for s in self.stops if (i := self.held.find(s)) >= 0), default=-1)
        if cut >= 0:
            shown, self.held, self.stopped = self.held[:cut], "", True
            return shown
        keep = max(self._longest_stop_prefix_at_end(s) for s in self.stops)
        shown, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return shown

    def _longest_stop_prefix_at_end(self, stop: str) -> int:
        for k in range(min(len(stop) - 1, len(self.held)), 0, -1):
            if self.held.endswith(stop[:k]):
                return k
        return 0

    def flush(self) -> str:
        """The held tail: the output ended, so it can no longer become a stop string."""
        shown, self.held = self.held, ""
        return shown


class OutputParser:
    """Feed generated ids; get content, reasoning and completed tool calls; `finish` at the end.

    `completion_tokens` counts every id fed (eos and markers too); `reasoning_tokens` counts the
    ids from `[THINK]` through `[/THINK]` inclusive. `content_ids` says, for each id of the last
    `feed`, whether it is content text (what `logprobs.content` covers): not reasoning, not a
    call, not a marker, not after the output ended (the engines end it at the id that completes
    a stop string, so that id is the last content id).
    """

    def __init__(self, tokenizer: PromptTokenizer, *, tools_enabled: bool,
                 stop: tuple[str, ...] = (), ignore_eos: bool = False):
        self.tokenizer = tokenizer
        # generation went on past end-of-sequence (`ignore_eos`): an eos is then a control
        # token like any other, and the text after it is shown (it is generated and billed)
        self.ignore_eos = ignore_eos
        self.tools_enabled = tools_enabled
        self.think, self.end_think, self.tool_calls_mark, self.args_mark = (
            tokenizer.special(name) for name in ("[THINK]", "[/THINK]", "[TOOL_CALLS]", "[ARGS]"))
        self.eos = tokenizer.eos_id
        self.state = State.CONTENT
        self.calls: list[ToolCall] = []
        self.completion_tokens = 0
        self.reasoning_tokens = 0
        self._text = IncrementalDetokenizer(tokenizer)
        self._text_ids: list[int] = []
        self._hold = StopStringHold(stop)
        self._name_ids: list[int] = []
        self._args_ids: list[int] = []
        self.content_ids: list[bool] = []

    def feed(self, ids: list[int]) -> OutputDelta:
        """What `ids` add to the output."""
        delta = OutputDelta()
        self.content_ids = []
        for token in ids:
            self.completion_tokens += 1
            self.content_ids.append(self.state is State.CONTENT
                                    and not self.tokenizer.is_control(token))
            if self.state is State.DONE:
                continue
            self._step(token, delta)
        self._emit_text(delta)
        return delta

    def finish(self, finish_reason: str) -> tuple[OutputDelta, str]:
        """The last delta and the OpenAI finish reason (`tool_calls` for calls, then stop)."""
        delta = OutputDelta()
        if self.state is not State.DONE:
            self._close_segment(delta, ended=finish_reason == "stop")
            self.state = State.DONE
        delta.content += self._hold.flush()
        if self.calls and finish_reason == "stop":
            return delta, "tool_calls"
        return delta, finish_reason

    def _step(self, token: int, delta: OutputDelta) -> None:
        """Move the state machine by one id; control tokens (markers, eos, the rest of the
        reserved ids a model may still sample) are never text."""
        state = self.state
        if token == self.eos:
            if not self.ignore_eos:
                self._switch(State.DONE, delta)
            elif state in (State.TOOL_NAME, State.TOOL_ARGS):  # the call it ended is closed
                self._switch(State.CONTENT, delta)
        elif token == self.tool_calls_mark:
            self._switch(State.TOOL_NAME, delta)
        elif state is State.TOOL_NAME and token == self.args_mark:
            self.state = State.TOOL_ARGS
        elif state in (State.TOOL_NAME, State.TOOL_ARGS):
            if not self.tokenizer.is_control(token):  # a stray marker is no part of a call
                (self._name_ids if state is State.TOOL_NAME else self._args_ids).append(token)
        elif state is State.REASONING:
            self.reasoning_tokens += 1
            if token == self.end_think:
                self._switch(State.CONTENT, delta)
            elif not self.tokenizer.is_control(token):
                self._text_ids.append(token)
        elif token == self.think:
            self.reasoning_tokens += 1
            self._switch(State.REASONING, delta)
        elif not self.tokenizer.is_control(token):
            self._text_ids.append(token)

    def _switch(self, state: State, delta: OutputDelta) -> None:
        """Close the open segment, then move on unless a stop string ended the output. Content
        held for a stop string is shown before a call: no stop string spans one (the engines'
        rule), so it comes before the call's delta, where it was generated."""
        self._close_segment(delta)
        if self.state is not State.DONE:
            self.state = state
            if state is State.TOOL_NAME:  # from content, or from reasoning after content
                delta.content += self._hold.flush()

    def _close_segment(self, delta: OutputDelta, ended: bool = True) -> None:
        """End the open text or tool call, so the next state starts clean; `ended`: the call
        was ended by the model (not cut by the token budget or an abort)."""
        if self.state in (State.TOOL_NAME, State.TOOL_ARGS):
            decode = self.tokenizer.decode
            # a call the model ended with no arguments takes none: "{}", so they still parse as
            # JSON (one cut short keeps what it had, as OpenAI's do)
            arguments = decode(self._args_ids).strip()
            call = ToolCall(new_call_id(), decode(self._name_ids).strip(),
                            arguments or ("{}" if ended else ""))
            self._name_ids, self._args_ids = [], []
            if self.tools_enabled and call.name:  # a call naming no function is none
                self.calls.append(call)
                delta.tool_calls.append(call)
        else:
            self._emit_text(delta, flush=True)

    def _emit_text(self, delta: OutputDelta, *, flush: bool = False) -> None:
        """Detokenize the pending text ids into the delta of the current state."""
        text = self._text.feed(self._text_ids)
        self._text_ids = []
        if flush:
            text += self._text.flush()
        if self.state is State.REASONING:
            delta.reasoning += text
        elif self.state is State.CONTENT and text:
            delta.content += self._hold.push(text)
            if self._hold.stopped:
                self.state = State.DONE


def parse_completion(tokenizer: PromptTokenizer, ids: list[int], finish_reason: str, *,
                     tools_enabled: bool, stop: tuple[str, ...] = ()
                     ) -> tuple[str, str, list[ToolCall], str]:
    """The whole output at once: (content, reasoning, tool_calls, finish_reason)."""
    parser = OutputParser(tokenizer, tools_enabled=tools_enabled, stop=stop)
    body = parser.feed(ids)
    last, reason = parser.finish(finish_reason)
    return (body.content + last.content, body.reasoning + last.reasoning,
            body.tool_calls + last.tool_calls, reason)
