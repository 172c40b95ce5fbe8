"""The OpenAI chat-completions wire schema we accept, validated before anything else runs.

Unknown top-level fields are ignored (as common OpenAI-compatible servers do); fields we cannot
honour (`n > 1`) are refused. Numbers and booleans are strict: `"16"` or `true` for `max_tokens`
and `"yes"` for `stream` are refused, not coerced. Validation errors become `InvalidRequest` naming the field path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError,
                      field_validator)

from services.errors import InvalidRequest, clip


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Wire):
    type: Literal["text"]
    text: str


class ImageURL(_Wire):
    url: str = Field(min_length=1)
    detail: str | None = None


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


class SystemMessage(_Wire):
    role: Literal["system", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Wire):
    role: Literal["user"]
    content: str | list[ContentPart]
    name: str | None = None


class AssistantMessage(_Wire):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None


class ToolMessage(_Wire):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str
    name: str | None = None


# One schema per role, as in OpenAI's spec: what each role requires is in the schema (and so in
# the served OpenAPI document); turn order is checked by mistral-common when encoding.
Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage,
                    Field(discriminator="role")]
ROLES = ("system", "developer", "user", "assistant", "tool")


class FunctionSpec(_Wire):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Wire):
    type: Literal["function"]
    function: FunctionSpec


class NamedToolChoice(_Wire):
    type: Literal["function"]
    function: dict[str, str]


class StreamOptions(_Wire):
    include_usage: bool = Field(False, strict=True)


class ChatCompletionRequest(_Wire):
    model: str
    messages: list[Message] = Field(min_length=1)
    reasoning_effort: str | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0, strict=True)
    top_p: float = Field(1.0, gt=0.0, le=1.0, strict=True)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(None, ge=-2**63, le=2**63 - 1)  # int64, as OpenAI
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    n: StrictInt = Field(1, ge=1, le=1)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    def openai_messages(self) -> list[dict[str, Any]]:
        """Messages as plain dicts for mistral-common (developer → system)."""
        out = []
        for message in self.messages:
            item = message.model_dump(exclude_none=True)
            if item["role"] == "developer":
                item["role"] = "system"
            item.pop("reasoning_content", None)
            out.append(item)
        return out


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body, raising `InvalidRequest` that names the bad field."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", param=None)
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        # the deepest error is the most specific one (union members each report their own)
        error = max(exc.errors(), key=lambda e: len(field_path(e["loc"])))
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
