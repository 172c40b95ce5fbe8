"""When a sequence is finished: end-of-sequence ids, stop ids, stop strings, the token budget.

Stop strings apply to the answer's content only, as the ingress's output parser shows it
(`services.api.output`): text inside `[THINK]…[/THINK]` or in a call (`[TOOL_CALLS]` to the end
of sequence, past which only `ignore_eos` goes on) never ends the output, so a reasoning step
or a call's arguments that happen to contain one are not cut; nor does a stop string span a
call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services.engines.protocol import FinishReason, SamplingParams


@dataclass(frozen=True)
class OutputMarks:
    """The control ids that open and close the output's segments that are not content."""

    think: int
    end_think: int
    tool_calls: int
    is_control: Callable[[int], bool]
    # the ids only an image's encoding puts in a prompt: never sampled (a resumed leg's prompt
    # is the prompt and what was sampled, and one there would read as an image's slot)
    images: tuple[int, ...] = ()

    @classmethod
    def of(cls, tokenizer) -> OutputMarks:
        images = []
        for name in ("[IMG]", "[IMG_BREAK]", "[IMG_END]"):
            try:
                images.append(tokenizer.special(name))
            except Exception:  # a tokenizer without images
                continue
        return cls(tokenizer.special("[THINK]"), tokenizer.special("[/THINK]"),
                   tokenizer.special("[TOOL_CALLS]"), tokenizer.is_control, tuple(images))


_CONTENT, _REASONING, _CALL = range(3)


class StopChecker:
    """Feed it each new token; it answers the finish reason once the sequence is done.

    Without `marks` every token is content (a tokenizer without the markers)."""

    def __init__(self, params: SamplingParams, eos_ids: tuple[int, ...],
                 detokenize: Callable[[list[int]], str], marks: OutputMarks | None = None):
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.eos_ids = frozenset(eos_ids)
        self.detokenize = detokenize
        self.marks = marks
        self.generated: list[int] = []
        # A stop string is matched in the decoded tail of the content; each content token adds
        # at least one byte of text (a character may take several: byte-fallback tokens), so
        # this many tokens always cover the longest stop string, with room for a character cut
        # at the tail's start.
        self._tail = max((len(s.encode("utf-8", "surrogatepass")) for s in params.stop),
                         default=0) + 4
        self._segment = _CONTENT
        self._content: list[int] = []
        for token in params.stop_context:  # the tokens sent before this leg: where it resumes
            self._is_content(token)

    def check(self, tokens: list[int]) -> FinishReason | None:
        for token in tokens:
            self.generated.append(token)
            if token in self.stop_ids:
                return "stop"
            if self._is_content(token) and self.params.stop and self._stop_string_hit():
                return "stop"
            if len(self.generated) >= self.params.max_tokens:
                return "length"
        return None

    def _is_content(self, token: int) -> bool:
        """Move through the output's segments by `token`; keep it when it is content text."""
        marks = self.marks
        if marks is not None:
            if token == marks.tool_calls:  # a call runs to its end of sequence (the parser's
                self._segment = _CALL   # rule): no stop string spans it
                self._content.clear()
            elif self._segment == _CALL:
                if token in self.eos_ids:  # past it only with ignore_eos: content again
                    self._segment = _CONTENT
            elif self._segment == _REASONING:
                if token == marks.end_think:
                    self._segment = _CONTENT
            elif self._segment == _CONTENT and token == marks.think:
                self._segment = _REASONING
            if self._segment != _CONTENT or marks.is_control(token):
                return False
        self._content.append(token)
        if len(self._content) > 2 * self._tail:
            del self._content[:-self._tail]
        return True

    def _stop_string_hit(self) -> bool:
        tail = self.detokenize(self._content[-self._tail:])
        return any(stop in tail for stop in self.params.stop)
