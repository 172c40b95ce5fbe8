"""OpenAI response bodies as pydantic models: the one source of every body this endpoint sends
(completion, stream chunk, model card and list, error) and of their schemas in the served
OpenAPI spec (`services.api.openapi`).

A field is in a body exactly when its builder set it (`model_dump(exclude_unset=True)`): the
ones the spec requires even when empty are always set, `null` included (`content`, `refusal`,
`finish_reason`, `logprobs`), and the optional ones only when they say something
(`reasoning_content`, `tool_calls`, a stream's `usage` without `include_usage`). The schema is
taken in validation mode, where exactly the fields without a default are required: the same
rule, so what the spec requires is what every body carries.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["stop", "length", "tool_calls", "function_call"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def body(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)


class PromptTokensDetails(_Body):
    cached_tokens: int = Field(ge=0)


class CompletionTokensDetails(_Body):
    reasoning_tokens: int = Field(ge=0)


class Usage(_Body):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails


class CalledFunction(_Body):
    name: str
    arguments: str = Field(description="the arguments as a JSON text")


class ToolCallOut(_Body):
    index: int | None = Field(None, description="streamed calls only: which call this is")
    id: str
    type: Literal["function"]
    function: CalledFunction


class TopLogprob(_Body):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Body):
    content: list[TokenLogprob] | None
    refusal: None


class ResponseMessage(_Body):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None
    reasoning_content: str | None = Field(None, description="the model's reasoning "
                                          "([THINK]…[/THINK]); absent when there was none")
    tool_calls: list[ToolCallOut] | None = None
    function_call: CalledFunction | None = Field(None, description="the deprecated "
                                                 "`functions` request's one call")


class Choice(_Body):
    index: int = Field(ge=0, description="which of the request's n choices")
    message: ResponseMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None


class _Meta(_Body):
    id: str
    created: int
    model: str
    reasoning_effort: str | None = Field(None, description="the effort the answer ran at")
    pool: str | None = Field(None, description="the replica pool that answered")


class ChatCompletion(_Meta):
    object: Literal["chat.completion"]
    choices: list[Choice] = Field(min_length=1, description="one per choice asked (n)")
    usage: Usage


class Delta(_Body):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None
    function_call: CalledFunction | None = None


class ChunkChoice(_Body):
    index: int = Field(ge=0, description="which of the request's n choices")
    delta: Delta
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None


class ChatCompletionChunk(_Meta):
    object: Literal["chat.completion.chunk"]
    choices: list[ChunkChoice] = Field(max_length=1, description="empty in the usage chunk")
    usage: Usage | None = Field(None, description="with stream_options.include_usage: null "
                                "on every chunk but the last, which has no choices")


class ModelCard(_Body):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    engine: str | None = None
    context_length: int | None = None
    pools: dict[str, str] | None = Field(None, description="pool name -> its reasoning effort")


class ModelList(_Body):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(_Body):
    message: str
    type: str
    param: str | None
    code: str | None
    request_id: str | None = None
    trace_id: str | None = None


class ErrorBody(_Body):
    error: ErrorDetail


# The component schemas of the served spec, by name.
SCHEMAS: dict[str, type[_Body]] = {"ChatCompletion": ChatCompletion,
                                   "ChatCompletionChunk": ChatCompletionChunk,
                                   "ModelCard": ModelCard, "ModelList": ModelList,
                                   "Error": ErrorBody}


def usage(prompt: int, completion: int, reasoning: int, cached: int = 0) -> dict[str, Any]:
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
                 completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning)
                 ).body()


def tool_call_dicts(calls, start: int = 0, *, streaming: bool = False) -> list[dict[str, Any]]:
    return [call.body() for call in _tool_calls(calls, start, streaming=streaming)]


def _tool_calls(calls, start: int = 0, *, streaming: bool = False) -> list[ToolCallOut]:
    out = []
    for i, call in enumerate(calls, start):
        function = CalledFunction(name=call.name, arguments=call.arguments)
        out.append(ToolCallOut(index=i, id=call.id, type="function", function=function)
                   if streaming else ToolCallOut(id=call.id, type="function", function=function))
    return out


def _logprobs(entries: list[dict[str, Any]] | None) -> ChoiceLogprobs | None:
    """A choice's `logprobs` object; None when the request did not ask for them."""
    return None if entries is None else ChoiceLogprobs(content=entries, refusal=None)


def logprob_entries(records, tokenizer, ids: list[int],
                    content: list[bool]) -> list[dict[str, Any]]:
    """OpenAI's per-token entries (token text, logprob, bytes, top alternatives) for the sampled
    tokens of the message's content: `content` marks which of the chunk's `ids` are content
    text (`OutputParser.content_ids`), not reasoning, a tool call or a control token. Each
    record is matched to its own id in order (a chunk may carry fewer records than ids)."""
    def entry(token: int, logprob: float) -> dict[str, Any]:
        return {"token": tokenizer.token_piece(token), "logprob": max(logprob, -9999.0),
                "bytes": list(tokenizer.token_bytes(token))}
    out, at = [], 0
    for record in records:
        found = next((i for i in range(at, len(ids)) if ids[i] == record.token), None)
        if found is None:  # not one of this chunk's ids: nothing to attribute it to
            continue
        if content[found]:
            out.append({**entry(record.token, record.logprob), "top_logprobs": [
                entry(t, lp) for t, lp in record.top if lp > float("-inf")]})
        at = found + 1
    return out


def choice(index: int, *, content: str, reasoning: str, tool_calls: list, finish_reason: str,
           logprob_list: list[dict[str, Any]] | None = None,
           legacy_functions: bool = False) -> Choice:
    """One choice of a non-streamed completion."""
    message = ResponseMessage(role="assistant", content=content or None, refusal=None)
    if reasoning:
        message.reasoning_content = reasoning
    if tool_calls and legacy_functions:  # the deprecated shape: one call, no id
        message.function_call = CalledFunction(name=tool_calls[0].name,
                                               arguments=tool_calls[0].arguments)
        finish_reason = "function_call" if finish_reason == "tool_calls" else finish_reason
    elif tool_calls:
        message.tool_calls = _tool_calls(tool_calls)
    return Choice(index=index, message=message, finish_reason=finish_reason,
                  logprobs=_logprobs(logprob_list))


def completion(meta: dict[str, Any], choices: list[Choice],
               usage_body: dict[str, Any]) -> dict[str, Any]:
    return ChatCompletion(**meta, object="chat.completion", choices=choices,
                          usage=Usage.model_validate(usage_body)).body()


def chunk(meta: dict[str, Any], delta: dict[str, Any], finish_reason: str | None = None,
          usage_body: dict[str, Any] | None = None, *, index: int = 0,
          include_usage: bool = False,
          logprob_list: list[dict[str, Any]] | None = None) -> dict:
    choice = ChunkChoice(index=index, delta=Delta.model_validate(delta),
                         finish_reason=finish_reason, logprobs=_logprobs(logprob_list))
    extra = {"usage": usage_body} if include_usage else {}
    return ChatCompletionChunk(**meta, object="chat.completion.chunk", choices=[choice],
                               **extra).body()


def usage_chunk(meta: dict[str, Any], usage_body: dict[str, Any]) -> dict[str, Any]:
    return ChatCompletionChunk(**meta, object="chat.completion.chunk", choices=[],
                               usage=usage_body).body()


def model_card(**fields: Any) -> dict[str, Any]:
    return ModelCard(object="model", **fields).body()


def model_list(cards: list[dict[str, Any]]) -> dict[str, Any]:
    return ModelList(object="list", data=cards).body()


def error(body: dict[str, Any]) -> dict[str, Any]:
    """An error body (`StackError.body`) as the `Error` schema has it; never fails (an error
    being answered must not become another one): every field is taken as text."""
    inner = body["error"]

    def text(key: str) -> str | None:
        value = inner.get(key)
        return None if value is None else str(value)
    ids = {key: text(key) for key in ("request_id", "trace_id") if inner.get(key) is not None}
    return ErrorBody(error=ErrorDetail(message=str(inner.get("message", "")),
                                       type=str(inner.get("type", "internal_error")),
                                       param=text("param"), code=text("code"), **ids)).body()
