"""Request checks every engine applies before it queues work, naming the offending field."""

from __future__ import annotations

from services.engines.protocol import EngineRequest
from services.errors import ContextLengthExceeded, InvalidRequest


def validate_request(request: EngineRequest, context_length: int, vocab_size: int, *,
                     logits: bool = True) -> None:
    """Raise `InvalidRequest` for an empty prompt, bad sampling, or a prompt that cannot fit;
    an engine without logits (`logits=False`, the simulated one) refuses what needs them."""
    n = len(request.prompt_ids)
    if n == 0:
        raise InvalidRequest("the prompt is empty", param="messages")
    params = request.sampling
    if params.max_tokens <= 0:
        raise InvalidRequest(f"max_tokens must be at least 1, got {params.max_tokens}",
                             param="max_tokens")
    if params.temperature < 0:
        raise InvalidRequest("temperature must be >= 0", param="temperature")
    if not 0.0 < params.top_p <= 1.0:
        raise InvalidRequest("top_p must be in (0, 1]", param="top_p")
    if n + params.max_tokens > context_length:
        raise ContextLengthExceeded(
            f"this model's maximum context length is {context_length} tokens; the request has "
            f"{n} prompt tokens and asks for {params.max_tokens} more",
            param="messages")
    bad = next((t for t in request.prompt_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"prompt token id {bad} is outside the vocabulary", param="messages")
    bad = next((t for t, _ in params.logit_bias if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"logit_bias: token id {bad} is outside the vocabulary",
                             param="logit_bias")
    if not logits:
        needs = {params.grammar_field: params.grammar is not None,
                 "logprobs": params.logprobs is not None, "logit_bias": bool(params.logit_bias),
                 "presence_penalty": bool(params.presence_penalty),
                 "frequency_penalty": bool(params.frequency_penalty)}
        for name, asked in needs.items():
            if asked:
                raise InvalidRequest(f"{name}: this engine samples no logits and cannot "
                                     f"honour it", param=name)
