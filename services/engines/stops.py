"""When a sequence is finished: end-of-sequence ids, stop ids, stop strings, the token budget."""

from __future__ import annotations

from collections.abc import Callable

from services.engines.protocol import FinishReason, SamplingParams


class StopChecker:
    """Feed it each new token; it answers the finish reason once the sequence is done."""

    def __init__(self, params: SamplingParams, eos_ids: tuple[int, ...],
                 detokenize: Callable[[list[int]], str]):
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.detokenize = detokenize
        self.generated: list[int] = []
        # A stop string is matched in the decoded tail; each token adds at least one character
        # except control tokens, so this many tokens always cover the longest stop string.
        self._tail = max((len(s) for s in params.stop), default=0) + 4
        self.context = list(params.stop_context[-self._tail:])

    def check(self, tokens: list[int]) -> FinishReason | None:
        for token in tokens:
            self.generated.append(token)
            if token in self.stop_ids:
                return "stop"
            if self.params.stop and self._stop_string_hit():
                return "stop"
            if len(self.generated) >= self.params.max_tokens:
                return "length"
        return None

    def _stop_string_hit(self) -> bool:
        tail = self.detokenize((self.context + self.generated)[-self._tail:])
        return any(stop in tail for stop in self.params.stop)
