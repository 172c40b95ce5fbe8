"""What a request's prompt may cost, checked from its images' headers before any is decoded.

The ingress knows the fewest tokens the text can take (its bytes over the longest token's),
the context and what the key's token quota can pay, but not the images' tokens: those follow
from each image's size, which the multimodal service reads from the headers. Checked there,
before decoding, an image request that cannot fit the context, or that its key cannot pay,
costs its headers (a PNG of a few KB can declare 6 MP: seconds of decoding and resizing).
The exact count is checked again once the prompt is encoded."""

from __future__ import annotations

from dataclasses import dataclass

from services.errors import ContextLengthExceeded, over_token_quota


@dataclass(frozen=True)
class TokenRoom:
    """What a request holds of its key's token bucket: the tokens the ingress charged it
    before its images were read (its text's floor and completion, and as much of the most its
    images can take as the key had: `Quotas.reserve`), and the bucket's size. Neither what
    other requests hold nor the bucket's refill since is counted (the refill is the key's, not
    this request's: credited to each of twenty requests at once, it had all their images
    decoded unpaid); the exact charge after encoding may still take the refill."""

    key: str
    tokens_per_min: float
    available: float
    capacity: float

    def check(self, tokens: int) -> None:
        """Raise the quota's 429 if `tokens` are more than the request holds."""
        if tokens > self.capacity:
            raise over_token_quota(tokens, self.key, self.tokens_per_min, float("inf"))
        if tokens > self.available:
            raise over_token_quota(tokens, self.key, self.tokens_per_min,
                                   (tokens - self.available) / (self.tokens_per_min / 60.0))


@dataclass(frozen=True)
class PromptBudget:
    """The text's floor, the context, the completion asked and the key's room: enough to refuse
    a prompt from its images' token count. `completion` is the one sizing rule: the request
    plan's `max_tokens` comes from it too, once the prompt is encoded."""

    text_tokens: int
    context_length: int
    choices: int = 1
    max_tokens: int | None = None  # asked (None: the default, where the prompt leaves room)
    max_tokens_field: str = "max_tokens"
    default_max_tokens: int = 0
    quota: TokenRoom | None = None

    def completion(self, prompt: int, taken: str) -> int:
        """The completion a prompt of `prompt` tokens gets: the one asked, or the default
        where the context leaves room; `ContextLengthExceeded` when it cannot fit, saying what
        the messages take (`taken`)."""
        context = self.context_length
        room = context - prompt
        if room <= 0:
            raise ContextLengthExceeded(f"this model's maximum context length is {context} "
                                        f"tokens; {taken}", param="messages")
        if self.max_tokens is None:
            return min(self.default_max_tokens, room)
        if self.max_tokens > room:  # (its range, 1 to limits.max_tokens_cap: `admit`'s)
            raise ContextLengthExceeded(
                f"this model's maximum context length is {context} tokens; {taken} and "
                f"{self.max_tokens_field} asks for {self.max_tokens}", param="messages")
        return self.max_tokens

    def check(self, image_tokens: int) -> None:
        """Raise if a prompt of at least the text's floor plus `image_tokens` cannot fit the
        context with the completion asked, or its key cannot pay for every choice."""
        prompt = self.text_tokens + image_tokens
        completion = self.completion(prompt, f"the messages' images take {image_tokens} and "
                                             f"their text at least {self.text_tokens}")
        if self.quota is not None:
            self.quota.check(self.choices * (prompt + completion))
