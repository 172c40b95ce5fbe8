"""From a validated chat request to what the pool needs: applied effort, prompt ids, sampling."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from services.api.schemas import ChatCompletionRequest
from services.engines.protocol import EngineRequest, SamplingParams
from services.engines.stops import OutputMarks
from services.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound, clip
from services.grammar import StructuredRequest
from services.multimodal.budget import PromptBudget, TokenRoom
from services.multimodal.sources import check_data_url_size
from services.routing import applied_effort
from services.settings import LimitSettings, ModelSettings, RoutingSettings
from services.tokenizer import EncodedPrompt


@dataclass
class RequestPlan:
    """Everything decided about a request before it is sent to a pool."""

    request: ChatCompletionRequest
    effort: str
    engine_request: EngineRequest
    tools_enabled: bool

    @property
    def prompt_tokens(self) -> int:
        return len(self.engine_request.prompt_ids)

    @property
    def n(self) -> int:
        """How many choices: each is its own decode stream of the same prompt."""
        return self.request.n

    def forget_messages(self) -> None:
        """Drop the request's messages once its prompt is encoded and its grammar built: they
        may be a whole body (eight images as data URLs, 107 MB), and an answer lives for
        minutes on options alone (its engine request holds the prompt's ids and pixels)."""
        self.request = self.request.model_copy(update={"messages": []})

    def engine_requests(self) -> list[EngineRequest]:
        """One engine request per choice. The first is `engine_request` itself; the others get
        their own id and, when seeded, their own seed (seed + i, kept in int64), so choices
        differ yet a seeded request answers the same choices every time."""
        first = self.engine_request
        out = [first]
        for i in range(1, self.n):
            sampling = first.sampling
            if sampling.seed is not None:
                sampling = replace(sampling, seed=(sampling.seed + i + 2**63) % 2**64 - 2**63)
            out.append(replace(first, request_id=f"{first.request_id}-{i}", sampling=sampling))
        return out


def admit(req: ChatCompletionRequest, *, model: ModelSettings, routing: RoutingSettings,
          limits: LimitSettings, vocab_size: int | None = None,
          max_images: int | None = None, max_image_bytes: int | None = None) -> str:
    """Check the request against the served model and limits; return the effort to apply.
    Every check here is cheap and runs before the token quota and any encoding: a request
    these refuse gets its 400 (never a quota's 429), and no image of it is decoded."""
    if req.model != model.name:
        raise ModelNotFound(f"the model {clip(req.model)} does not exist; this endpoint serves "
                            f"{model.name!r}", param="model")
    # (`limits.max_messages` is checked before validation: `parse_chat_request`)
    if max_images is not None:
        images = [(i, j) for i, m in enumerate(req.messages) if isinstance(m.content, list)
                  for j, part in enumerate(m.content) if part.type == "image_url"]
        if len(images) > max_images:
            i, j = images[max_images]
            raise InvalidRequest(f"at most {max_images} images per request",
                                 param=f"messages.{i}.content.{j}")
        for i, j in images if max_image_bytes is not None else ():
            # before a copy of the request goes to the image service, which would refuse it
            check_data_url_size(req.messages[i].content[j].image_url.url, max_image_bytes,
                                f"messages.{i}.content.{j}.image_url")
    field = _max_tokens_field(req)
    asked = getattr(req, field)
    if asked is not None and asked <= 0:
        raise InvalidRequest(f"{field} must be at least 1, got {asked}", param=field)
    if asked is not None and asked > limits.max_tokens_cap:
        raise InvalidRequest(f"{field} must be at most {limits.max_tokens_cap}, got {asked}",
                             param=field)
    if req.n > limits.max_n:
        raise InvalidRequest(f"n must be at most {limits.max_n} on this deployment "
                             f"(limits.max_n), got {req.n}", param="n")
    if vocab_size is not None and any(token >= vocab_size for token, _ in req.logit_bias_ids):
        raise InvalidRequest(f"logit_bias: token ids are below {vocab_size} (the vocabulary)",
                             param="logit_bias")
    return applied_effort(req.reasoning_effort, routing)


def text_floor(req: ChatCompletionRequest, token_bytes: int) -> int:
    """The fewest tokens the request's text can take: its bytes over the longest token's."""
    return req.text_bytes // max(token_bytes, 1)


def prompt_floor(req: ChatCompletionRequest, token_bytes: int, *,
                 model: ModelSettings, limits: LimitSettings) -> int:
    """The fewest tokens the request can cost (for each of its `n` choices: its text over
    the longest token's bytes, at least one, plus the asked `max_tokens` or the default one as
    it will be set), known before tokenising: a prompt that cannot fit the context is refused
    here, cheaply (a 12 MB prompt is never tokenised), and so is one the key's token quota
    cannot pay (before its images are decoded)."""
    text = req.text_bytes
    floor = text_floor(req, token_bytes)
    field = _max_tokens_field(req)
    asked = max(getattr(req, field) or 0, 0)
    if asked >= model.context_length:  # no prompt could leave that much room
        raise ContextLengthExceeded(
            f"{field} is {asked}; this model's maximum context length is "
            f"{model.context_length} tokens, prompt and completion together", param=field)
    if floor + asked > model.context_length:  # each choice is its own sequence
        raise ContextLengthExceeded(
            f"this model's maximum context length is {model.context_length} tokens; the "
            f"messages have {text} bytes of text, at least {floor} tokens, and {field} asks "
            f"for {asked} more", param="messages")
    if getattr(req, field) is None:  # `_max_tokens`' default, where the prompt leaves room
        asked = min(limits.default_max_tokens, max(model.context_length - floor, 1))
    return req.n * (max(floor, 1) + asked)


def prompt_budget(req: ChatCompletionRequest, token_bytes: int, *, model: ModelSettings,
                  limits: LimitSettings, quota: TokenRoom | None) -> PromptBudget:
    """What the request's prompt may cost, for the image service to check against its images'
    tokens before decoding them (`services.multimodal.budget`)."""
    return _sizing(req, model, limits, text_floor(req, token_bytes), quota)


def _sizing(req: ChatCompletionRequest, model: ModelSettings, limits: LimitSettings,
            text_tokens: int = 0, quota: TokenRoom | None = None) -> PromptBudget:
    """The request's completion and context, as `PromptBudget` sizes every prompt."""
    field = _max_tokens_field(req)
    return PromptBudget(text_tokens, model.context_length, choices=req.n,
                        max_tokens=getattr(req, field), max_tokens_field=field,
                        default_max_tokens=limits.default_max_tokens, quota=quota)


def _max_tokens_field(req: ChatCompletionRequest) -> str:
    return "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"


def tools_of(req: ChatCompletionRequest) -> list[dict] | None:
    """The tools to put in the prompt: none with `tool_choice: none`, so none can be called."""
    return [t.model_dump(exclude_none=True) for t in req.tools] if req.tools_offered else None


def plan_request(req: ChatCompletionRequest, request_id: str, *, effort: str,
                 prompt: EncodedPrompt, model: ModelSettings, limits: LimitSettings,
                 marks: OutputMarks | None = None) -> RequestPlan:
    """Sampling and limits for an encoded prompt (of a request `admit` passed): what the pool
    receives. Two of the output's `marks` are banned where the request rules out what they
    open: the call marker where no tools are offered (none, or `tool_choice: none`: a call
    would have no tool to parse it against and the answer would lose it; `tool_choice: none`
    promises text, a history of calls invites one), and the reasoning marker at effort
    `none` (which promises an answer without reasoning: one begun anyway was shown as
    reasoning and counted as reasoning tokens)."""
    prompt_len = len(prompt.ids)
    max_tokens = _sizing(req, model, limits).completion(prompt_len,
                                                        f"the messages have {prompt_len}")
    # top_p 0 keeps only the most likely token: greedy decoding, which engines know as such
    temperature, top_p = (req.temperature, req.top_p) if req.top_p > 0 else (0.0, 1.0)
    bias = req.logit_bias_ids
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature,
                              top_p=top_p, seed=req.seed, stop=req.stop_strings,
                              logit_bias=bias, presence_penalty=req.presence_penalty or 0.0,
                              frequency_penalty=req.frequency_penalty or 0.0,
                              ignore_eos=bool(req.ignore_eos),
                              banned_ids=_banned(marks, req.tools_offered, effort),
                              logprobs=(req.top_logprobs or 0) if req.logprobs else None)
    engine_request = EngineRequest(request_id, prompt.ids, sampling, images=prompt.images)
    return RequestPlan(req, effort, engine_request, tools_enabled=req.tools_offered)


def _banned(marks: OutputMarks | None, tools_offered: bool, effort: str) -> tuple[int, ...]:
    if marks is None:
        return ()
    return ((() if tools_offered else (marks.tool_calls,))
            + ((marks.think,) if effort == "none" else ()) + marks.images)


def structured_request(plan: RequestPlan, limits: LimitSettings) -> StructuredRequest:
    """What decides the request's grammar; reasoning (any effort but `none`) may use up to
    `limits.constrained_reasoning_share` of `max_tokens`, so the constrained answer fits."""
    req = plan.request
    max_tokens = plan.engine_request.sampling.max_tokens
    return StructuredRequest(
        response_format=_json(req.response_format), tools=tools_of(req),
        tool_choice=_json(req.tool_choice) if req.tools_offered else None,
        parallel_tool_calls=req.parallel_tool_calls is not False,
        reasoning=plan.effort != "none",
        reasoning_budget=int(max_tokens * limits.constrained_reasoning_share))


def refuse_prefix_under(plan: RequestPlan, cause: str) -> None:
    """A constrained answer starts where its grammar does: an assistant prefix to continue
    (`prefix: true`) cannot go with one. Checked before any grammar is built; names what
    constrains the answer (`cause`: `StructuredRequest.cause`)."""
    if any(m.role == "assistant" and getattr(m, "prefix", False) for m in plan.request.messages):
        raise InvalidRequest(f"messages: an assistant prefix (prefix: true) cannot be continued "
                             f"under a constrained answer ({cause})", param="messages")


def constrain(plan: RequestPlan, grammar: str | None, field: str = "response_format") -> None:
    """Give the plan's engine request its grammar (None: unconstrained), from `field` (an
    assistant prefix was refused before the grammar was built: `refuse_prefix_under`)."""
    if grammar is None:
        return
    request = plan.engine_request
    request.sampling = replace(request.sampling, grammar=grammar, grammar_field=field)


def _json(value):
    return value.model_dump(exclude_none=True, by_alias=True) if hasattr(
        value, "model_dump") else value
