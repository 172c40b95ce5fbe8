"""The OpenAI chat-completions wire schema we accept, validated before anything else runs.

Unknown top-level fields are ignored (as common OpenAI-compatible servers do), except the ones
other servers and their clients know to change the answer (`NOT_HONOURED`: OpenAI's audio and
web-search fields, vLLM's and SGLang's sampling and decoding extensions): those are refused
unless set to their neutral value, as `UNSUPPORTED` fields are. `ignore_eos` (vLLM, SGLang;
load tools send it for fixed-length answers) is honoured. Fields of the
spec that would change the answer but are not implemented yet are declared with the spec's types
and ranges and listed in `UNSUPPORTED` with their neutral values: a request that sets one to
anything else is refused with a 400 naming it, never answered as if it had not been set. `null`
is accepted wherever the spec allows it and means the default. Numbers and booleans are strict:
`"16"` or `true` for `max_tokens` and `"yes"` for `stream` are refused, not coerced. Validation
errors become `InvalidRequest` naming the field path.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError,
                      field_validator, model_validator)

from services.errors import InvalidRequest, clip
from services.grammar import calls_constrained


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Wire):
    type: Literal["text"]
    text: str


class RefusalPart(_Wire):
    """An earlier assistant turn's refusal, as OpenAI's content parts carry it (its text)."""

    type: Literal["refusal"]
    refusal: str


class ImageURL(_Wire):
    url: str = Field(min_length=1)
    # "low" (a fixed low resolution, fewer tokens) is not implemented: every image is read at
    # its own resolution up to `images.max_pixels`, which is what "high" and "auto" ask for
    detail: Literal["auto", "high"] | None = None


class ImagePart(_Wire):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(_Wire):
    name: str = Field(min_length=1)
    arguments: str


class ToolCall(_Wire):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


# A participant's name: not part of Mistral's prompt format, so refused unless empty (the
# served schema says so: maxLength 0; `_conversation` refuses it by name)
NoName = Annotated[str | None, Field(json_schema_extra={"maxLength": 0})]


# Parts of one message's content, and of all messages together: far beyond any real request
# (text and images interleaved), checked before the parts are (100k bad parts cost 0.5 s of
# the event loop to validate and report, in one message or spread over many)
MAX_CONTENT_PARTS = 1024
MAX_TOTAL_CONTENT_PARTS = 4096
MAX_TOTAL_TOOL_CALLS = 4096  # over every message (each holds at most 128)
TextParts = Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)]
AssistantParts = Annotated[list[Annotated[TextPart | RefusalPart, Field(discriminator="type")]],
                           Field(max_length=MAX_CONTENT_PARTS)]
ContentParts = Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS)]


class SystemMessage(_Wire):
    role: Literal["system", "developer"]
    content: str | TextParts
    name: NoName = None


class UserMessage(_Wire):
    role: Literal["user"]
    content: str | ContentParts
    name: NoName = None


class AssistantMessage(_Wire):
    """An earlier assistant turn, as the model's prompt carries it.

    Its reasoning stays, as the model wrote it and as mistral-common encodes it
    (`[THINK]…[/THINK]` before the turn's answer or calls): dropped, the model would see its
    answer without the reasoning it followed, the prompt would stop matching the KV cached
    when that turn was generated, and a turn that is reasoning alone (an answer cut by
    `max_tokens`) would be an empty message that cannot be encoded. vLLM's name for it,
    `reasoning`, is the same field. A refusal (OpenAI's shape for a turn the model declined:
    no content) is that turn's text. An audio answer names audio this model never made."""

    role: Literal["assistant"]
    content: str | AssistantParts | None = None
    name: NoName = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=128)
    # the deprecated functions API's call (a next turn of a `functions` conversation)
    function_call: FunctionCall | None = None
    reasoning_content: str | None = None
    reasoning: str | None = Field(None, description="vLLM's name for `reasoning_content`")
    refusal: str | None = None
    audio: None = Field(None, description="an earlier audio answer: this model answers in "
                        "text, so none can be part of its conversation")

    prefix: StrictBool | None = Field(
        None, description="Mistral's prefill: the last message, an assistant's, is continued")

    @field_validator("audio", mode="before")
    @classmethod
    def _no_audio(cls, value):
        if value is not None:
            raise ValueError("this model answers in text; an earlier audio answer cannot be "
                             "part of its conversation")
        return value

    @field_validator("reasoning")
    @classmethod
    def _one_reasoning(cls, value, info):
        given = info.data.get("reasoning_content")
        if value is not None and given is not None and given != value:
            raise ValueError("reasoning and reasoning_content are two names for one field; "
                             "they differ here")
        return value

    @field_validator("refusal")
    @classmethod
    def _content_or_refusal(cls, value, info):
        if value and info.data.get("content"):
            raise ValueError("an assistant turn is its content or its refusal, not both")
        return value

    @model_validator(mode="after")
    def _as_the_prompt_carries_it(self):
        """One name for the reasoning, the refusal as the turn's text (see the class)."""
        if self.reasoning is not None:
            self.reasoning_content, self.reasoning = self.reasoning, None
        if self.refusal:
            self.content, self.refusal = self.refusal, None
        if isinstance(self.content, list):  # a refusal part is its text
            self.content = [TextPart(type="text", text=part.refusal)
                            if isinstance(part, RefusalPart) else part for part in self.content]
        return self


class ToolMessage(_Wire):
    role: Literal["tool"]
    content: str | TextParts
    tool_call_id: str
    name: str | None = None


class FunctionMessage(_Wire):
    """The deprecated functions API's result: answers the assistant's last `function_call`."""

    role: Literal["function"]
    name: str = Field(min_length=1)
    content: str | None


# One schema per role, as in OpenAI's spec: what each role requires is in the schema (and so in
# the served OpenAPI document); turn order is checked by mistral-common when encoding.
Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage
                    | FunctionMessage, Field(discriminator="role")]
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class FunctionSpec(_Wire):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(_Wire):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Wire):
    name: str = Field(min_length=1)


class NamedToolChoice(_Wire):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Wire):
    include_usage: bool = Field(False, strict=True)
    # vLLM's: every chunk carries the usage so far (guidellm asks for it)
    continuous_usage_stats: bool = Field(False, strict=True)


class ResponseFormatText(_Wire):
    type: Literal["text"]


class ResponseFormatJSONObject(_Wire):
    type: Literal["json_object"]


class JSONSchemaSpec(_Wire):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormatJSONSchema(_Wire):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormat = Annotated[ResponseFormatText | ResponseFormatJSONObject
                           | ResponseFormatJSONSchema, Field(discriminator="type")]


class Prediction(_Wire):
    type: Literal["content"]
    content: str | TextParts


class FunctionCallChoice(_Wire):
    name: str = Field(min_length=1)


Penalty = Annotated[float, Field(ge=-2.0, le=2.0, strict=True)]
MAX_LOGIT_BIAS = 300  # entries; each costs every sampled token of the request
# a stop string is looked for in the decoded tail of the output after every token, a tail as
# long as the string: bounded, so a long one cannot make each token's check costly
MAX_STOP_BYTES = 256


class ChatCompletionRequest(_Wire):
    model: str
    # at least one user message: the model's format sets the tools and the effort on it
    # (`_conversation` refuses it by name; the served schema says it with `contains`)
    messages: list[Message] = Field(min_length=1, json_schema_extra={"contains": {
        "type": "object", "required": ["role"], "properties": {"role": {"const": "user"}}}})
    reasoning_effort: str | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0, strict=True)] | None = 1.0
    top_p: Annotated[float, Field(ge=0.0, le=1.0, strict=True)] | None = 1.0
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(None, ge=-2**63, le=2**63 - 1)  # int64, as OpenAI
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = Field(None, max_length=128)  # OpenAI's limit
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    n: Annotated[int, Field(ge=1, le=128, strict=True)] | None = 1
    user: str | None = None
    # structured outputs and sampling controls (engines: grammar masks, logits processing)
    response_format: ResponseFormat | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20, strict=True)] | None = None
    logit_bias: dict[str, Annotated[int, Field(ge=-100, le=100, strict=True)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    parallel_tool_calls: StrictBool | None = None
    # vLLM's and SGLang's extension: generate past end-of-sequence, up to max_tokens
    ignore_eos: StrictBool | None = None
    # declared with the spec's types and ranges; refused unless neutral (see UNSUPPORTED)
    prediction: Prediction | None = None
    functions: list[FunctionSpec] | None = Field(None, min_length=1, max_length=128)
    function_call: Literal["none", "auto"] | FunctionCallChoice | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value):
        for key in value or {}:
            if not (key.isascii() and key.isdigit()) or len(key) > 9:
                raise ValueError(f"keys are token ids (decimal strings); got {clip(key)}")
        return value

    @model_validator(mode="after")
    def _functions_are_tools(self):
        """The deprecated `functions`/`function_call` are tools with one call at most; the
        answer comes back in their shape (`message.function_call`), see `legacy_functions`."""
        if self.functions is None:
            if self.function_call is None:
                return self
            if self.tools is not None:  # even "none": refused, not dropped (it would have
                # kept the tools from being called)
                raise InvalidRequest("function_call: with tools, choose with tool_choice; "
                                     "function_call goes with the deprecated functions",
                                     param="function_call")
            if self.function_call in ("none", "auto"):
                return self  # no functions, no tools: "none" and "auto" choose nothing
            raise InvalidRequest("function_call: it names one of `functions`, which is not "
                                 "set", param="function_call")
        if self.tools is not None or self.tool_choice is not None:
            raise InvalidRequest("functions: use tools and tool_choice, or the deprecated "
                                 "functions and function_call, not both", param="functions")
        self.tools = [Tool(type="function", function=f) for f in self.functions]
        choice = self.function_call
        self.tool_choice = (NamedToolChoice(type="function",
                                            function=NamedFunction(name=choice.name))
                            if isinstance(choice, FunctionCallChoice) else choice)
        self.parallel_tool_calls = False
        return self

    @property
    def legacy_functions(self) -> bool:
        return self.functions is not None

    @model_validator(mode="after")
    def _conversation(self):
        """What Mistral's format cannot carry is refused, not dropped: a participant's `name`
        (mistral-common discards it; a tool message's `name` only repeats its call's), and a
        conversation without a user message (mistral-common renders it, but with neither the
        tools nor the reasoning effort's setting, which it puts on the user's turn: the answer
        would be routed and constrained for tools the model never saw)."""
        for i, message in enumerate(self.messages):
            if message.role not in ("tool", "function") and message.name:
                raise InvalidRequest(f"messages.{i}.name: participant names are not part of "
                                     "the model's prompt format; leave name out",
                                     param=f"messages.{i}.name")
        if not any(m.role == "user" for m in self.messages):
            raise InvalidRequest("messages: a conversation needs a user message (the model's "
                                 "format sets the tools and the reasoning effort on the last "
                                 "one: without it neither would reach the model)",
                                 param="messages")
        return self

    @model_validator(mode="after")
    def _related_fields(self):
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise InvalidRequest("max_tokens: max_completion_tokens is the same limit by its "
                                 "newer name; set one of them (or both alike)",
                                 param="max_tokens", code="invalid_parameter_combination")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options: only allowed when stream is true",
                                 param="stream_options")
        if not self.tools and self.tool_choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice: a required or named tool_choice needs tools",
                                 param="tool_choice")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs: logprobs must be true to use top_logprobs",
                                 param="top_logprobs")
        json_format = self.response_format is not None and self.response_format.type != "text"
        if json_format and self.tools_offered and self.tool_choice not in (None, "auto"):
            raise InvalidRequest("response_format: a JSON format goes with tool_choice "
                                 "auto or none only", param="response_format")
        constrained_calls = self.tools_offered and calls_constrained(
            self.tool_choice, self.parallel_tool_calls is not False,
            any(t.function.strict for t in self.tools))
        if self.ignore_eos and (json_format or constrained_calls):
            raise InvalidRequest("ignore_eos: a constrained answer (a JSON response_format, a "
                                 "required or named tool_choice, a strict tool, "
                                 "parallel_tool_calls false) ends where its grammar does",
                                 param="ignore_eos")
        return self

    @property
    def logit_bias_ids(self) -> tuple[tuple[int, float], ...]:
        """(id, bias) once per id: `"1"` and `"01"` name one token, the last one given wins
        (as SGLang dedups them; a tensor's `+=` at a repeated index is undefined)."""
        return tuple({int(k): float(v) for k, v in (self.logit_bias or {}).items()}.items())

    @field_validator("temperature", "top_p", "n", "stream")
    @classmethod
    def _null_is_default(cls, value, info):
        """`null` means the field's default, as the spec says."""
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        if any(len(s.encode("utf-8", "surrogatepass")) > MAX_STOP_BYTES for s in stops):
            raise ValueError(f"each stop string is at most {MAX_STOP_BYTES} bytes of UTF-8")
        for s in stops:
            # text is matched as it is decoded, where a character cut between tokens reads as
            # U+FFFD for a moment (a stop on it would end answers at the first split emoji),
            # and no decoded text holds a lone surrogate (such a stop would never match)
            if "\ufffd" in s or any("\ud800" <= c <= "\udfff" for c in s):
                raise ValueError("a stop string may not hold U+FFFD or a lone surrogate: "
                                 "decoded text never matches them as sent")
        return stops

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    def openai_messages(self) -> list[dict[str, Any]]:
        """Messages as plain dicts for mistral-common (developer → system; the deprecated
        functions API's `function_call` and `function` messages as a tool call and its
        result, under an id of Mistral's shape)."""
        out, legacy, called = [], None, ""
        for i, message in enumerate(self.messages):
            item = message.model_dump(exclude_none=True)
            if item["role"] == "developer":
                item["role"] = "system"
            if item["role"] == "assistant" and "function_call" not in item:
                legacy = None  # a function message answers the turn just before it
            if item["role"] == "assistant" and "function_call" in item:
                if item.get("tool_calls"):
                    raise InvalidRequest(f"messages.{i}: an assistant message has tool_calls "
                                         "or the deprecated function_call, not both",
                                         param=f"messages.{i}.function_call")
                legacy, called = f"func{i:05d}", item["function_call"]["name"]
                item["tool_calls"] = [{"id": legacy, "type": "function",
                                       "function": item.pop("function_call")}]
            elif item["role"] == "function":
                if legacy is None:
                    raise InvalidRequest(f"messages.{i}: a function message answers an "
                                         "assistant's function_call; none came before it",
                                         param=f"messages.{i}")
                if item["name"] != called:
                    raise InvalidRequest(f"messages.{i}.name: the result of {called!r} (the "
                                         f"function_call it answers), not of {item['name']!r}",
                                         param=f"messages.{i}.name")
                item = {"role": "tool", "tool_call_id": legacy,
                        "content": item.get("content") or ""}
                legacy = None  # one result per call
            if not item.get("prefix", True):
                item.pop("prefix")
            out.append(item)
        _every_call_answered(out)
        return out

    @cached_property
    def text_bytes(self) -> int:
        """Bytes of everything textual that reaches the prompt: contents, earlier turns'
        reasoning, calls, tools (a refused turn's refusal is its content,
        `AssistantMessage`). Counted once a request: its floor, its budget and what a refusal
        keeps all read it (a tool list of 55 KB is dumped as JSON to count it)."""
        text = sum(_text_bytes(m.content) + _calls_bytes(m)
                   + _text_bytes(getattr(m, "reasoning_content", None)) for m in self.messages)
        return text + sum(_json_bytes(t.model_dump())
                          for t in (self.tools if self.tools_offered else ()))

    @property
    def tools_offered(self) -> bool:
        """Whether the model is shown the tools (`tool_choice: none` hides them)."""
        return bool(self.tools) and self.tool_choice != "none"


def _every_call_answered(messages: list[dict[str, Any]]) -> None:
    """Each assistant turn's calls get one result each before the conversation goes on, as
    OpenAI requires: Mistral's format pairs results with calls by position, not by id, so a
    missing result would hand the next call's result to this one."""
    pending: dict[str, int] = {}  # call id -> the assistant message that made it
    for i, item in enumerate(messages):
        if item["role"] == "tool":
            call = item["tool_call_id"]
            if pending.pop(call, None) is None:
                raise InvalidRequest(f"messages.{i}.tool_call_id: {call[:64]!r} answers no "
                                     "call of the assistant message before it, or one already "
                                     "answered",
                                     param=f"messages.{i}.tool_call_id")
            continue
        _refuse_unanswered(pending, i)
        if item["role"] == "assistant":
            pending = {c["id"]: i for c in item.get("tool_calls") or ()}
    _refuse_unanswered(pending, len(messages))


def _refuse_unanswered(pending: dict[str, int], at: int) -> None:
    if pending:
        asked = next(iter(pending.values()))
        raise InvalidRequest(
            f"messages.{asked}.tool_calls: each call needs a tool message with its result "
            f"before message {at}; none for {', '.join(map(repr, pending))}",
            param=f"messages.{asked}.tool_calls")


# Fields of the spec that change the answer and are not implemented yet, with the JSON values that
# mean "as if it were not set" (`null` always does). Anything else is refused, and the served
# OpenAPI spec states these values (api/openapi.py), so generated clients and fuzzers see them.
UNSUPPORTED: dict[str, list[Any]] = {
    "prediction": [],
}


# Fields outside the chat-completions fields above that change the answer where other servers
# honour them, with the values that leave it unchanged; set to anything else they are refused
# (400 naming the field), never dropped as unknown fields are. OpenAI's own: output modalities,
# audio, web search, verbosity. vLLM's and SGLang's extensions, which OpenAI-compatible clients
# pass through (`extra_body`): sampling, guided decoding, templates, output shaping. Mistral's.
NOT_HONOURED: dict[str, list[Any]] = {
    "modalities": [["text"]], "audio": [], "web_search_options": [],
    "verbosity": ["medium"],  # OpenAI's default
    "moderation": [],
    "top_k": [-1, 0], "min_p": [0], "repetition_penalty": [1], "min_tokens": [0],
    "best_of": [1], "use_beam_search": [False], "length_penalty": [1],
    "stop_token_ids": [[]], "bad_words": [[]], "allowed_token_ids": [],
    "logits_processors": [], "custom_logit_processor": [], "prompt_logprobs": [],
    "guided_json": [], "guided_regex": [], "guided_choice": [], "guided_grammar": [],
    "guided_whitespace_pattern": [], "structured_outputs": [], "structural_tag": [],
    "regex": [], "ebnf": [], "json_schema": [],
    "echo": [False], "add_generation_prompt": [True], "continue_final_message": [False],
    "chat_template": [], "chat_template_kwargs": [], "documents": [],
    "skip_special_tokens": [True], "spaces_between_special_tokens": [True],
    "include_stop_str_in_output": [False], "no_stop_trim": [False],
    "truncate_prompt_tokens": [], "lora_path": [], "return_hidden_states": [False],
    "separate_reasoning": [True], "stream_reasoning": [True], "stop_regex": [],
    "mm_processor_kwargs": [], "max_dynamic_patch": [], "min_dynamic_patch": [],
    "custom_params": [], "return_tokens_as_token_ids": [False],
    # Mistral's API, which its clients send: a seed by another name, a safety system prompt,
    # a reasoning system prompt
    "random_seed": [], "safe_prompt": [False], "prompt_mode": [],
    # reasoning switched by other APIs' names (OpenRouter's `reasoning` object and
    # `include_reasoning`, Qwen's `enable_thinking`, Anthropic's `thinking`): here the effort
    # is `reasoning_effort`, and a request naming it otherwise must not be answered without
    "reasoning": [], "include_reasoning": [True], "enable_thinking": [], "thinking": [],
    # llama.cpp's and Ollama's sampling names (and OpenRouter's top_a), which their clients
    # send to any OpenAI-compatible endpoint
    # (their settings of a sampler, mirostat's tau and eta, repeat_last_n, only matter with it on)
    "grammar": [], "repeat_penalty": [1], "typical_p": [1], "tfs_z": [1], "mirostat": [0],
    "n_predict": [-1], "num_predict": [-1], "top_a": [0], "dry_multiplier": [0],
    "xtc_probability": [0],
}
# what to send instead, where the endpoint has it under another name
INSTEAD = {name: "set reasoning_effort (none or high) instead"
           for name in ("reasoning", "include_reasoning", "enable_thinking", "thinking")}


def refuse_not_honoured(body: dict) -> None:
    """A 400 naming the first `NOT_HONOURED` field set to a value that changes the answer."""
    for name, accepted in NOT_HONOURED.items():
        value = body.get(name)
        if value is not None and not any(_same(value, a) for a in accepted):
            words = " or ".join(json.dumps(v) for v in [*accepted, None])
            instead = f"; {INSTEAD[name]}" if name in INSTEAD else ""
            raise InvalidRequest(f"{name}: this endpoint does not honour {name}; only {words} "
                                 f"is accepted{instead}", param=name)


def _same(value: Any, accepted: Any) -> bool:
    """JSON equality without Python's `True == 1`: a boolean matches only a boolean."""
    if isinstance(value, bool) or isinstance(accepted, bool):
        return type(value) is type(accepted) and value == accepted
    return value == accepted


def _as_json(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_none=True)
    return value


def refuse_unsupported(req: ChatCompletionRequest) -> None:
    """A 400 naming the first field set to a value this endpoint cannot honour yet."""
    for name, accepted in UNSUPPORTED.items():
        value = _as_json(getattr(req, name))
        if value is not None and value not in accepted:
            words = " or ".join(json.dumps(v) for v in [*accepted, None])
            raise InvalidRequest(f"{name}: this value is not supported (yet) by this "
                                 f"endpoint; only {words} is accepted", param=name)


def parse_chat_request(body: Any, max_messages: int | None = None) -> ChatCompletionRequest:
    """Validate a decoded JSON body, raising `InvalidRequest` that names the bad field; more
    than `max_messages` messages (`limits.max_messages`) are refused before they are
    validated (tens of thousands of messages cost a third of a second to)."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", param=None)
    refuse_not_honoured(body)
    messages = body.get("messages")
    if isinstance(messages, list):
        if max_messages is not None and len(messages) > max_messages:
            raise InvalidRequest(f"at most {max_messages} messages are accepted",
                                 param="messages")
        parts = sum(len(m["content"]) for m in messages
                    if isinstance(m, dict) and isinstance(m.get("content"), list))
        if parts > MAX_TOTAL_CONTENT_PARTS:
            raise InvalidRequest(f"the messages have {parts} content parts; at most "
                                 f"{MAX_TOTAL_CONTENT_PARTS} are accepted", param="messages")
        calls = sum(len(m["tool_calls"]) for m in messages
                    if isinstance(m, dict) and isinstance(m.get("tool_calls"), list))
        if calls > MAX_TOTAL_TOOL_CALLS:  # as slow to validate as parts, when malformed
            raise InvalidRequest(f"the messages have {calls} tool calls; at most "
                                 f"{MAX_TOTAL_TOOL_CALLS} are accepted", param="messages")
    try:
        req = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        # the deepest error is the most specific one (union members each report their own;
        # their inputs are not copied into the reports); at one depth, what is wrong with a
        # value of the member's type (a list too long) before that it is not another's
        errors = exc.errors(include_input=False, include_url=False)
        error = max(errors, key=lambda e: (len(field_path(e["loc"])),
                                           not e["type"].endswith("_type")))
        path = field_path(error["loc"])
        message = error["msg"]
        if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
            path.append(error["ctx"]["discriminator"].strip("'"))
            if "tag" in error["ctx"]:  # pydantic quotes the caller's tag whole
                message = (f"{clip(error['ctx']['tag'])} is not one of "
                           f"{error['ctx']['expected_tags']}")
        param = ".".join(path) or None
        raise InvalidRequest(f"{param}: {message}" if param else message,
                             param=param) from None
    refuse_unsupported(req)
    return req


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict"}


def field_path(loc: tuple) -> list[str]:
    """The field names and indices of a pydantic error location, without the union-member tags
    pydantic inserts (`str`, `list[...]`, `literal[...]`, model class names, a message's role
    after its index, a discriminator value repeated before the field it names)."""
    path: list[str] = []
    for part in loc:
        if isinstance(part, str) and ("[" in part or part in _TYPE_TAGS or part[:1].isupper()):
            continue
        if path and str(part) == path[-1] and isinstance(part, str):
            continue
        if part in ROLES and path[-2:-1] == ["messages"]:
            continue
        path.append(str(part))
    return path


def _json_bytes(value: Any) -> int:
    """Bytes of `value` as compact JSON, a lone surrogate (valid in the caller's JSON, not
    UTF-8) counted as its three bytes, as the texts are."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":"))
               .encode("utf-8", "surrogatepass"))


def _text_bytes(content) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content.encode("utf-8", "surrogatepass"))
    return sum(len(p.text.encode("utf-8", "surrogatepass")) for p in content
               if getattr(p, "type", None) == "text")


def _calls_bytes(message) -> int:
    """An assistant turn's calls reach the prompt too: their names and arguments (the
    deprecated `function_call` as a call like the others)."""
    functions = [c.function for c in getattr(message, "tool_calls", None) or ()]
    if getattr(message, "function_call", None) is not None:
        functions.append(message.function_call)
    return sum(len(f.name.encode("utf-8", "surrogatepass"))
               + len(f.arguments.encode("utf-8", "surrogatepass")) for f in functions)
