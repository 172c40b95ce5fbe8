"""Prompt ids for chat requests equal mistral-common's own encoding of the same conversation."""

from __future__ import annotations

import pytest
from mistral_common.protocol.instruct.messages import (AssistantMessage, SystemMessage,
                                                       ToolMessage, UserMessage)
from mistral_common.protocol.instruct.request import ChatCompletionRequest as MCRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall

from services.api.plan import plan_text_request
from services.api.schemas import parse_chat_request
from services.errors import InvalidRequest
from services.settings import LimitSettings, ModelSettings, RoutingSettings

WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}

OPENAI_MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call00001", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call00001", "content": "sunny, 21C"},
    {"role": "assistant", "content": "Sunny and 21C."},
    {"role": "user", "content": "And tomorrow?"},
]


def mistral_common_ids(tokenizer, effort: str, with_tools: bool) -> list[int]:
    """Encode the conversation with mistral-common's own message classes (independent path)."""
    messages = [
        SystemMessage(content="You are terse."),
        UserMessage(content="Weather in Paris?"),
        AssistantMessage(content=None, tool_calls=[ToolCall(
            id="call00001", function=FunctionCall(name="get_weather",
                                                  arguments='{"city": "Paris"}'))]),
        ToolMessage(tool_call_id="call00001", content="sunny, 21C"),
        AssistantMessage(content="Sunny and 21C."),
        UserMessage(content="And tomorrow?"),
    ]
    tools = [Tool(function=Function(**WEATHER))] if with_tools else None
    request = MCRequest(messages=messages, tools=tools, reasoning_effort=effort)
    return tokenizer._mt.encode_chat_completion(request).tokens


@pytest.mark.parametrize("effort", ["none", "high"])
@pytest.mark.parametrize("with_tools", [True, False])
def test_chat_ids_match_mistral_common(tokenizer, effort, with_tools):
    tools = [{"type": "function", "function": WEATHER}] if with_tools else None
    ours = tokenizer.encode_chat(OPENAI_MESSAGES, effort=effort, tools=tools).ids
    assert ours == mistral_common_ids(tokenizer, effort, with_tools)
    text = tokenizer.decode(ours)
    assert f'"reasoning_effort": "{effort}"' in text
    assert ("[AVAILABLE_TOOLS]" in text) is with_tools


def test_ingress_plan_encodes_the_same_ids(tokenizer):
    body = {"model": "mistral-small-4", "messages": OPENAI_MESSAGES, "reasoning_effort": "medium",
            "tools": [{"type": "function", "function": WEATHER}], "max_tokens": 8}
    plan = plan_text_request(parse_chat_request(body), "r1", model=ModelSettings(),
                        routing=RoutingSettings(), limits=LimitSettings(), tokenizer=tokenizer)
    assert plan.effort == "high"  # medium maps to the model's "high" by default
    assert plan.engine_request.prompt_ids == mistral_common_ids(tokenizer, "high", True)
    assert plan.engine_request.sampling.max_tokens == 8


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content.0.image_url.url"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"tool_choice": "maybe"}, "tool_choice"),
    ({"n": 2}, "n"),
])
def test_bad_requests_name_the_field(tokenizer, body, param):
    full = {"model": "mistral-small-4", "messages": [{"role": "user", "content": "hi"}]} | body
    with pytest.raises(InvalidRequest) as err:
        plan_text_request(parse_chat_request(full), "r1", model=ModelSettings(),
                     routing=RoutingSettings(), limits=LimitSettings(), tokenizer=tokenizer)
    assert err.value.param == param
    assert err.value.status == 400


def test_overlong_prompt_is_refused_with_context_code(tokenizer):
    body = {"model": "mistral-small-4", "messages": [{"role": "user", "content": "word " * 400}]}
    with pytest.raises(InvalidRequest) as err:
        plan_text_request(parse_chat_request(body), "r1", model=ModelSettings(context_length=256),
                     routing=RoutingSettings(), limits=LimitSettings(), tokenizer=tokenizer)
    assert err.value.code == "context_length_exceeded" and err.value.param == "messages"
