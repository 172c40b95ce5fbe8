"""Prompt ids for chat requests equal mistral-common's own encoding of the same conversation."""

from __future__ import annotations

import json

import pytest
from mistral_common.protocol.instruct.chunk import TextChunk, ThinkChunk
from mistral_common.protocol.instruct.messages import (AssistantMessage, SystemMessage,
                                                       ToolMessage, UserMessage)
from mistral_common.protocol.instruct.request import ChatCompletionRequest as MCRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall

from services.api.plan import admit, plan_request, prompt_floor, tools_of
from services.api.schemas import parse_chat_request
from services.engines.stops import OutputMarks
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
    ({"n": 5}, "n"),  # above limits.max_n
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


def plan_text_request(req, request_id, *, model, routing, limits, tokenizer, vocab_size=None):
    """What the request service plans for a text request: admit, encode, plan."""
    effort = admit(req, model=model, routing=routing, limits=limits, vocab_size=vocab_size)
    prompt = tokenizer.encode_chat(req.openai_messages(), effort=effort, tools=tools_of(req))
    return plan_request(req, request_id, effort=effort, prompt=prompt, model=model,
                        limits=limits)


def plan(tokenizer, vocab=False, **body):
    full = {"model": "mistral-small-4", "messages": [{"role": "user", "content": "hi"}]} | body
    return plan_text_request(parse_chat_request(full), "r1", model=ModelSettings(),
                             routing=RoutingSettings(), limits=LimitSettings(),
                             tokenizer=tokenizer, vocab_size=tokenizer.vocab_size if vocab else None)


@pytest.mark.parametrize("body", [
    {"prediction": {"type": "content", "content": "draft"}},
])
def test_fields_we_cannot_honour_yet_are_refused_by_name(tokenizer, body):
    """Never a 200 that silently ignores a field that changes the answer."""
    (field,) = body
    with pytest.raises(InvalidRequest) as err:
        plan(tokenizer, **body)
    assert (err.value.status, err.value.type, err.value.param) == (
        400, "invalid_request_error", field)
    assert "not supported (yet)" in str(err.value)


@pytest.mark.parametrize("body", [
    {"n": 1}, {"logprobs": False}, {"top_logprobs": 0}, {"logit_bias": {}},
    {"presence_penalty": 0}, {"frequency_penalty": 0.0}, {"response_format": {"type": "text"}},
    {"parallel_tool_calls": True}, {"function_call": "auto"}, {"tool_choice": "auto"},
    {"tool_choice": "none", "function_call": "none"},  # no tools: nothing either could call
    {k: None for k in ("temperature", "top_p", "n", "stream", "max_tokens", "stop", "seed",
                       "logprobs", "response_format", "presence_penalty", "tool_choice",
                       "stream_options", "max_completion_tokens", "user")},
])
def test_neutral_values_and_nulls_are_the_defaults(tokenizer, body):
    got = plan(tokenizer, **body)
    assert got.engine_request.sampling.temperature == 1.0
    assert got.engine_request.sampling.top_p == 1.0
    assert got.request.stream is False and got.request.n == 1


@pytest.mark.parametrize("body, param", [
    ({"frequency_penalty": 5}, "frequency_penalty"), ({"presence_penalty": -2.5}, "presence_penalty"),
    ({"top_p": 1.5}, "top_p"), ({"temperature": 2.1}, "temperature"), ({"n": 0}, "n"),
    ({"top_logprobs": 21}, "top_logprobs"), ({"stream": "yes"}, "stream"),
])
def test_out_of_range_is_refused_before_unsupported(tokenizer, body, param):
    with pytest.raises(InvalidRequest) as err:
        plan(tokenizer, **body)
    assert err.value.param == param and "supported" not in str(err.value)


def test_top_p_zero_is_greedy(tokenizer):
    sampling = plan(tokenizer, top_p=0, temperature=0.7).engine_request.sampling
    assert (sampling.temperature, sampling.top_p) == (0.0, 1.0)


def test_tool_choice_none_keeps_the_tools_out_of_the_prompt(tokenizer):
    tools = [{"type": "function", "function": WEATHER}]
    hidden = plan(tokenizer, tools=tools, tool_choice="none")
    assert hidden.tools_enabled is False
    assert "[AVAILABLE_TOOLS]" not in tokenizer.decode(hidden.engine_request.prompt_ids)
    assert hidden.engine_request.prompt_ids == plan(tokenizer).engine_request.prompt_ids
    shown = plan(tokenizer, tools=tools, tool_choice="auto")
    assert shown.tools_enabled and "[AVAILABLE_TOOLS]" in tokenizer.decode(
        shown.engine_request.prompt_ids)


@pytest.mark.parametrize("effort", ["none", "high"])
def test_a_last_assistant_prefix_is_continued(tokenizer, effort):
    """Mistral's prefill: the prompt ends with the assistant's text, no end of turn."""
    messages = [{"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "The colour is", "prefix": True}]
    got = plan(tokenizer, messages=messages, reasoning_effort=effort)
    request = MCRequest(messages=[UserMessage(content="Name a colour."),
                                  AssistantMessage(content="The colour is", prefix=True)],
                        reasoning_effort=effort)
    assert got.engine_request.prompt_ids == tokenizer._mt.encode_chat_completion(request).tokens
    assert tokenizer.decode(got.engine_request.prompt_ids).endswith("[/INST]The colour is")


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "prefix": True},
     {"role": "user", "content": "c"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "prefix": False}],
])
def test_an_assistant_last_without_prefix_or_a_prefix_not_last_is_refused(tokenizer, messages):
    with pytest.raises(InvalidRequest) as err:
        plan(tokenizer, messages=messages)
    assert (err.value.status, err.value.param) == (400, "messages")


def test_sampling_controls_reach_the_engine_request(tokenizer):
    sampling = plan(tokenizer, logit_bias={"17": 5, "900": -100}, presence_penalty=0.5,
                    frequency_penalty=-1, logprobs=True, top_logprobs=3).engine_request.sampling
    assert sampling.logit_bias == ((17, 5.0), (900, -100.0))
    twice = plan(tokenizer, logit_bias={"17": 5, "017": 60}).engine_request.sampling.logit_bias
    assert twice == ((17, 60.0),)  # one token, once: the last given
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (0.5, -1.0)
    assert sampling.logprobs == 3
    assert plan(tokenizer, logprobs=True).engine_request.sampling.logprobs == 0
    assert plan(tokenizer, logprobs=False).engine_request.sampling.logprobs is None


@pytest.mark.parametrize("body, param, words", [
    ({"top_logprobs": 3}, "top_logprobs", "logprobs must be true"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"17": 101}}, "logit_bias.17", "less than or equal to 100"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias", "vocabulary"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "at most 300"),
    ({"response_format": {"type": "json_object"}, "tool_choice": "required"},
     "response_format", "tool_choice auto or none"),
])
def test_sampling_controls_out_of_their_domain_are_refused_by_name(tokenizer, body, param, words):
    with pytest.raises(InvalidRequest) as err:
        plan(tokenizer, tools=[{"type": "function", "function": WEATHER}], vocab=True, **body)
    assert err.value.param == param and words in str(err.value), str(err.value)


def test_deprecated_functions_are_tools_with_one_call(tokenizer):
    got = plan(tokenizer, functions=[WEATHER], function_call={"name": "get_weather"})
    req = got.request
    assert req.legacy_functions and [t.function.name for t in req.tools] == ["get_weather"]
    assert req.tool_choice.function.name == "get_weather"
    assert req.parallel_tool_calls is False and got.tools_enabled
    assert plan(tokenizer, functions=[WEATHER], function_call="none").tools_enabled is False


@pytest.mark.parametrize("body, param", [
    ({"functions": [WEATHER], "tools": [{"type": "function", "function": WEATHER}]},
     "functions"),
    ({"function_call": {"name": "get_weather"}}, "function_call"),
    # "none" beside tools kept nothing from being called: refused, not dropped
    ({"tools": [{"type": "function", "function": WEATHER}], "function_call": "none"},
     "function_call"),
    ({"tools": [{"type": "function", "function": WEATHER}],
      "function_call": {"name": "get_weather"}}, "function_call"),
    ({"functions": [WEATHER], "function_call": {"name": ""}}, "function_call.name"),
])
def test_functions_and_tools_do_not_mix(tokenizer, body, param):
    with pytest.raises(InvalidRequest) as err:
        plan(tokenizer, **body)
    assert err.value.param == param


@pytest.mark.parametrize("function, words", [
    (WEATHER | {"parameters": {"type": "objectx"}}, "Invalid tool schema"),
    (WEATHER | {"name": "get weather!"}, "Function name"),
    (WEATHER | {"parameters": {"type": "object", "properties": {
        "a": {"type": "string", "pattern": "[a-"}}}}, "properties/a/pattern"),
    (WEATHER | {"parameters": {"type": "object", "patternProperties": {"(": {}}}},
     "patternProperties"),
])
def test_a_bad_tool_definition_is_refused_naming_tools(tokenizer, function, words):
    with pytest.raises(InvalidRequest) as err:
        plan(tokenizer, tools=[{"type": "function", "function": function}])
    assert err.value.param == "tools" and words in str(err.value), str(err.value)


def test_tool_patterns_are_checked_in_rust_never_compiled_with_pythons_re(tokenizer,
                                                                       monkeypatch):
    """mistral-common checks a tool's schema with Python's jsonschema, which compiles each
    `pattern` with `re` on the event loop: 39 case-insensitive classes over a wide range
    (`(?i:[\\x01-\\uff01])`...) took 0.2 s a tool, for any client. The schema is checked
    in Rust instead, and mistral-common's own check (the name) sees the function without it."""
    from mistral_common.protocol.instruct import validator

    seen = []
    check = validator.validate_json_schema_by_draft7
    monkeypatch.setattr(validator, "validate_json_schema_by_draft7",
                        lambda value: seen.append(value) or check(value))
    costly = "".join("(?i:[\\x%02x-\\uff%02x])" % (i, i) for i in range(1, 40))
    parameters = {"type": "object", "properties": {"a": {"type": "string", "pattern": costly}},
                  "patternProperties": {"^x-[a-z]+$": {"type": "string"}}}
    got = plan(tokenizer, tools=[{"type": "function", "function": WEATHER | {
        "parameters": parameters}}])
    assert got.prompt_tokens > 0
    assert seen and all(value == {} for value in seen)  # the schema never reached Python's re
    # and the prompt carries the tool's schema as sent
    assert json.dumps(costly) in tokenizer.decode(got.engine_request.prompt_ids)
    # no format but regex is checked (Python's check had no URI checker): refs and ids that
    # are not URIs are answered as they were
    loose = {"$id": "my tool", "$schema": "draft-07", "$ref": "#/definitions/my type",
             "definitions": {"my type": {"type": "string"}}}
    assert plan(tokenizer, tools=[{"type": "function", "function": WEATHER | {
        "parameters": loose}}]).prompt_tokens > 0


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


@pytest.mark.parametrize("body, param, words", [
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
     "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "function": WEATHER}],
      "tool_choice": {"type": "function", "function": {"nam": "get_weather"}}},
     "tool_choice.function.name", "Field required"),
    ({"messages": [{"role": "user", "content": [IMAGE | {"image_url": {
        "url": IMAGE["image_url"]["url"], "detail": "low"}}]}]},
     "messages.0.content.0.image_url.detail", "'auto' or 'high'"),
    ({"messages": [{"role": "system", "content": "Be brief.", "name": "ops"},
                   {"role": "user", "content": "hi"}]}, "messages.0.name", "leave name out"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "hello", "name": "bot"},
                   {"role": "user", "content": "bye", "name": "Alice"}]},
     "messages.1.name", "participant names"),
    ({"messages": [{"role": "system", "content": "Say hi."}]}, "messages", "needs a user message"),
    # no user turn to carry them: mistral-common renders neither the tools nor the effort
    ({"messages": [{"role": "system", "content": "You are an agent."},
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": "call00001", "type": "function",
                        "function": {"name": "get_weather", "arguments": "{}"}}]},
                   {"role": "tool", "tool_call_id": "call00001", "content": "sunny"}],
      "tools": [{"type": "function", "function": WEATHER}], "tool_choice": "required"},
     "messages", "needs a user message"),
    ({"messages": [{"role": "system", "content": "Go on."},
                   {"role": "assistant", "content": "Once", "prefix": True}],
      "reasoning_effort": "high"}, "messages", "needs a user message"),
    # a grammar constrains the calls (one call at most, or a strict tool's schema)
    ({"tools": [{"type": "function", "function": WEATHER}], "parallel_tool_calls": False,
      "ignore_eos": True}, "ignore_eos", "ends where its grammar does"),
    ({"tools": [{"type": "function", "function": WEATHER | {"strict": True}}],
      "ignore_eos": True}, "ignore_eos", "ends where its grammar does"),
    ({"messages": [{"role": "user", "content": "hi"}] + [
        {"role": "assistant", "tool_calls": [{}] * 128}] * 33}, "messages", "tool calls"),
    ({"messages": [{"role": "developer", "content": "a"}, {"role": "system", "content": "b"}]},
     "messages", "needs a user message"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
    ({"logit_bias": {"\u00b2": 5}}, "logit_bias", "token ids"),  # '²'.isdigit()
    ({"logit_bias": {"\uff11\uff12": 5}}, "logit_bias", "token ids"),  # fullwidth 12
    # one limit by two names that differ: which one was meant? (OpenAI refuses both at once)
    ({"max_tokens": 10, "max_completion_tokens": 20}, "max_tokens", "same limit"),
    ({"max_tokens": -5, "max_completion_tokens": 10}, "max_tokens", "same limit"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "x", "refusal": "I can't"},
                   {"role": "user", "content": "why?"}]}, "messages.1.refusal", "not both"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": None, "audio": {"id": "audio_1"}},
                   {"role": "user", "content": "again"}]}, "messages.1.audio", "in text"),
])
def test_fields_that_would_change_the_answer_are_refused_by_name(tokenizer, body, param, words):
    with pytest.raises(InvalidRequest) as err:
        plan(tokenizer, **body)
    assert err.value.param == param and words in str(err.value), str(err.value)


def test_a_tool_results_name_and_an_empty_name_are_accepted(tokenizer):
    """A tool message's name only repeats the call it answers; "" is no name."""
    messages = [dict(m) for m in OPENAI_MESSAGES]
    messages[3]["name"], messages[1]["name"] = "get_weather", ""
    got = plan(tokenizer, messages=messages, tools=[{"type": "function", "function": WEATHER}])
    assert got.engine_request.prompt_ids == mistral_common_ids(tokenizer, "none", True)


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": 300}, "max_tokens"), ({"max_completion_tokens": 256}, "max_completion_tokens"),
    ({"max_tokens": 200, "messages": [{"role": "user", "content": "word " * 400}]}, "messages"),
])
def test_the_cheap_context_check_names_the_field_that_overflows(body, param):
    """Before tokenising: a completion longer than the whole context is the max_tokens' fault,
    not the two-byte prompt's."""
    full = {"model": "mistral-small-4", "messages": [{"role": "user", "content": "hi"}]} | body
    with pytest.raises(InvalidRequest) as err:
        prompt_floor(parse_chat_request(full), 8, model=ModelSettings(context_length=256),
                     limits=LimitSettings())
    assert err.value.code == "context_length_exceeded" and err.value.param == param


def test_counting_a_prompt_past_the_context_stops_soon_after_it(tokenizer, monkeypatch):
    """A prompt of millions of tokens costs what counting past the context costs."""
    encoded = []
    real = tokenizer._raw.encode

    def counting(text, **kwargs):
        encoded.append(len(text))
        return real(text, **kwargs)

    monkeypatch.setattr(tokenizer._raw, "encode", counting)
    digits = "9" * 5_000_000  # a token a digit or so
    assert tokenizer.exceeds(["hi", digits], 4096, piece_chars=65536)
    assert sum(encoded) <= 2 + 65536, "counted past the first piece that reached the limit"
    encoded.clear()
    words = "word " * 20_000
    assert not tokenizer.exceeds([words], 32768, piece_chars=16384)  # cuts counted off
    assert sum(encoded) == len(words)
    assert tokenizer.exceeds([words], 15_000, piece_chars=16384)


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": 50_000}, "max_tokens"),  # above limits.max_tokens_cap
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": [IMAGE, IMAGE, {"type": "text", "text": "x"},
                                                IMAGE]}]}, "messages.0.content.3"),
    # a data URL over the image service's byte limit (1 KB here) is refused from its length
    ({"messages": [{"role": "user", "content": [IMAGE, {"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + "A" * 1400}}]}]}, "messages.0.content.1.image_url"),
])
def test_admit_refuses_before_any_image_is_encoded(body, param):
    """admit runs before the token quota and the encoder: its 400 names the field, never a
    quota's 429 for a request that can never pass, and no image is fetched or decoded."""
    full = {"model": "mistral-small-4", "n": 3,
            "messages": [{"role": "user", "content": [IMAGE]}]} | body
    with pytest.raises(InvalidRequest) as err:
        admit(parse_chat_request(full), model=ModelSettings(), routing=RoutingSettings(),
              limits=LimitSettings(), max_images=2, max_image_bytes=1024)
    assert err.value.param == param


def test_a_functions_conversation_goes_on_as_the_tools_it_is(tokenizer):
    """The deprecated functions API answers with `function_call`; its next turn sends that
    call back and a `function` message with the result: the same prompt as the tool-call
    conversation it stands for."""
    legacy = [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": None, "function_call": {
                  "name": "get_weather", "arguments": '{"city": "Paris"}'}},
              {"role": "function", "name": "get_weather", "content": "sunny, 21C"}]
    tools = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "func00001", "type": "function",
                  "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
             {"role": "tool", "tool_call_id": "func00001", "content": "sunny, 21C"}]
    ours = plan(tokenizer, messages=legacy, functions=[WEATHER]).engine_request.prompt_ids
    assert ours == plan(tokenizer, messages=tools,
                        tools=[{"type": "function", "function": WEATHER}]).engine_request.prompt_ids


CALLED = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
                                             "function_call": {"name": "f", "arguments": "{}"}},
          {"role": "function", "name": "f", "content": "x"}]


@pytest.mark.parametrize("messages, param", [
    ([{"role": "user", "content": "hi"}, {"role": "function", "name": "f", "content": "x"}],
     "messages.1"),
    (CALLED + [{"role": "function", "name": "f", "content": "again"}], "messages.3"),
    (CALLED + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "and?"},
               {"role": "assistant", "content": "so"},
               {"role": "function", "name": "f", "content": "stale"}], "messages.6"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
      "function_call": {"name": "f", "arguments": "{}"}, "tool_calls": [
          {"id": "abcdefghi", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
     "messages.1.function_call"),
])
def test_a_function_message_without_its_call_is_refused(tokenizer, messages, param):
    with pytest.raises(InvalidRequest) as err:
        plan(tokenizer, messages=messages)
    assert err.value.param == param


def _calls(*cities):
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"call0000{i}", "type": "function",
         "function": {"name": "get_weather", "arguments": f'{{"city": "{city}"}}'}}
        for i, city in enumerate(cities)]}


def _result(i, text):
    return {"role": "tool", "tool_call_id": f"call0000{i}", "content": text}


ASKED = [{"role": "user", "content": "Weather in Paris and Rome?"}, _calls("Paris", "Rome")]


@pytest.mark.parametrize("messages, param", [
    # Rome's result alone: Mistral's format pairs results with calls by position, so it would
    # read as Paris's weather
    (ASKED + [_result(1, "Rome: 30C")], "messages.1.tool_calls"),
    (ASKED + [_result(1, "Rome: 30C"), {"role": "user", "content": "well?"}],
     "messages.1.tool_calls"),
    (ASKED + [{"role": "user", "content": "never mind"}], "messages.1.tool_calls"),
    (ASKED + [_result(0, "Paris: 21C"), _result(0, "Paris: 22C")], "messages.3.tool_call_id"),
    (ASKED + [_result(0, "Paris: 21C"), _result(1, "Rome: 30C"), _result(1, "again")],
     "messages.4.tool_call_id"),
    ([{"role": "user", "content": "hi"}, _result(0, "stray")], "messages.1.tool_call_id"),
    # the deprecated API: a result under another function's name; one after a user turn
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
      "function_call": {"name": "get_weather", "arguments": "{}"}},
      {"role": "function", "name": "get_time", "content": "12:00"}], "messages.2.name"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
      "function_call": {"name": "get_weather", "arguments": "{}"}},
      {"role": "user", "content": "well?"},
      {"role": "function", "name": "get_weather", "content": "sunny"}], "messages.1.tool_calls"),
])
def test_every_call_gets_its_own_result_before_the_conversation_goes_on(tokenizer, messages,
                                                                         param):
    tools = [{"type": "function", "function": WEATHER}]
    with pytest.raises(InvalidRequest) as err:
        plan(tokenizer, messages=messages, tools=tools)
    assert err.value.param == param


@pytest.mark.parametrize("body, banned", [
    ({}, True),  # no tools: a call would be lost
    ({"tools": [{"type": "function", "function": WEATHER}], "tool_choice": "none"}, True),
    ({"tools": [{"type": "function", "function": WEATHER}]}, False),
    ({"tools": [{"type": "function", "function": WEATHER}], "tool_choice": "required"}, False),
])
@pytest.mark.parametrize("effort", ["none", "high"])
def test_the_call_marker_is_banned_where_no_tools_are_offered_and_reasoning_at_effort_none(
        tokenizer, body, banned, effort):
    """At effort none a reasoning block begun anyway was shown as reasoning, its tokens
    counted as reasoning tokens: none promises an answer without."""
    full = {"model": "mistral-small-4", "messages": [{"role": "user", "content": "hi"}],
            "reasoning_effort": effort} | body
    req = parse_chat_request(full)
    effort = admit(req, model=ModelSettings(), routing=RoutingSettings(), limits=LimitSettings())
    prompt = tokenizer.encode_chat(req.openai_messages(), effort=effort, tools=tools_of(req))
    marks = OutputMarks.of(tokenizer)
    sampling = plan_request(req, "r1", effort=effort, prompt=prompt, model=ModelSettings(),
                            limits=LimitSettings(), marks=marks).engine_request.sampling
    # the image ids are never sampled: a resumed leg's prompt (prompt and what was sampled)
    # with one would read as an image's slot, failing the leg
    images = {tokenizer.special(n) for n in ("[IMG]", "[IMG_BREAK]", "[IMG_END]")}
    assert set(sampling.banned_ids) == ({marks.tool_calls} if banned else set()) | (
        {tokenizer.special("[THINK]")} if effort == "none" else set()) | images


def test_results_in_any_order_answer_their_calls(tokenizer):
    tools = [{"type": "function", "function": WEATHER}]
    ids = [plan(tokenizer, messages=ASKED + results, tools=tools).engine_request.prompt_ids
           for results in ([_result(0, "Paris: 21C"), _result(1, "Rome: 30C")],
                           [_result(1, "Rome: 30C"), _result(0, "Paris: 21C")])]
    assert ids[0] == ids[1]


def test_the_quota_floor_counts_every_choice_and_the_default_max_tokens():
    """What the key must be able to pay before its images are decoded or its grammar is
    compiled: each choice's prompt (at least a token, even with no text) and its answer, the
    default max_tokens where none is asked (as the plan will set it)."""
    model, limits = ModelSettings(context_length=4096), LimitSettings(max_tokens_default=1000)

    def floor(**body):
        full = {"model": "mistral-small-4", "messages": [{"role": "user", "content": ""}]}
        return prompt_floor(parse_chat_request(full | body), 8, model=model, limits=limits)

    assert floor() == 1 + 1000
    assert floor(max_tokens=10, n=3) == 3 * (1 + 10)
    long = [{"role": "user", "content": "x" * 8 * 3500}]  # at least 3500 tokens: room 596
    assert floor(messages=long) == 3500 + 596
    # a default above the cap is the cap: no request gets more than one may ask for
    limits = LimitSettings(max_tokens_default=1000, max_tokens_cap=48)
    assert floor() == 1 + 48


THOUGHT = [{"role": "user", "content": "q1"},
           {"role": "assistant", "content": "a1", "reasoning_content": "R1"},
           {"role": "user", "content": "q2"}]


@pytest.mark.parametrize("name", ["reasoning_content", "reasoning"])
@pytest.mark.parametrize("answer", ["a1", None])
def test_an_earlier_turns_reasoning_reaches_the_prompt_as_the_model_wrote_it(tokenizer, name,
                                                                             answer):
    """Dropped, the model saw its answer without the reasoning it followed, and a turn that is
    reasoning alone (an answer cut by max_tokens, sent back as the client got it) was an empty
    message: 400. Either name (vLLM's `reasoning`) is the one field."""
    messages = [THOUGHT[0], {"role": "assistant", "content": answer, name: "R1"}, THOUGHT[2]]
    got = plan(tokenizer, messages=messages, reasoning_effort="high")
    turn = [ThinkChunk(thinking="R1")] + ([TextChunk(text=answer)] if answer else [])
    expected = tokenizer._mt.encode_chat_completion(MCRequest(
        messages=[UserMessage(content="q1"), AssistantMessage(content=turn),
                  UserMessage(content="q2")], reasoning_effort="high")).tokens
    assert got.engine_request.prompt_ids == expected
    assert "[THINK]R1[/THINK]" in tokenizer.decode(expected)


def test_two_names_for_one_reasoning_that_differ_are_refused(tokenizer):
    messages = [THOUGHT[0], THOUGHT[1] | {"reasoning": "R2"}, THOUGHT[2]]
    with pytest.raises(InvalidRequest) as err:
        plan(tokenizer, messages=messages)
    assert err.value.param == "messages.1.reasoning" and err.value.status == 400


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning", "refusal"])
def test_an_earlier_turns_reasoning_or_refusal_counts_in_the_cheap_context_check(field):
    turn = {"role": "assistant", "content": None, field: "word " * 400}
    full = {"model": "mistral-small-4", "messages": [THOUGHT[0], turn, THOUGHT[2]],
            "max_tokens": 8}
    with pytest.raises(InvalidRequest) as err:
        prompt_floor(parse_chat_request(full), 8, model=ModelSettings(context_length=256),
                     limits=LimitSettings())
    assert err.value.code == "context_length_exceeded" and err.value.param == "messages"


def test_an_empty_reasoning_is_encoded_as_mistral_common_encodes_it(tokenizer):
    messages = [THOUGHT[0], THOUGHT[1] | {"reasoning_content": ""}, THOUGHT[2]]
    got = plan(tokenizer, messages=messages, reasoning_effort="high")
    expected = tokenizer.encode_chat(messages, effort="high").ids  # mistral-common's from_openai
    assert got.engine_request.prompt_ids == expected
    assert "[THINK][/THINK]a1" in tokenizer.decode(expected)


def test_a_refused_turn_is_its_refusal_text(tokenizer):
    """OpenAI's shape for a turn the model declined (content null, a refusal) was an empty
    assistant message: 400 from the encoder, naming no field."""
    refused = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
    said = {"role": "assistant", "content": "I can't help with that."}
    asked = [{"role": "user", "content": "hi"}, {"role": "user", "content": "why?"}]
    got = plan(tokenizer, messages=[asked[0], refused, asked[1]])
    assert got.engine_request.prompt_ids == plan(
        tokenizer, messages=[asked[0], said, asked[1]]).engine_request.prompt_ids


def test_both_names_of_the_limit_alike_are_one_limit(tokenizer):
    got = plan(tokenizer, max_tokens=7, max_completion_tokens=7)
    assert got.engine_request.sampling.max_tokens == 7


def test_every_effort_of_openais_sdk_is_routed_and_the_simulator_reads_them_alike():
    """The SDK's `ReasoningEffort` names seven; `xhigh` and `max` were 400s. The capacity
    planner's trace files pick pools by the same map (it imports nothing of the services)."""
    import typing

    from openai.types.shared.reasoning_effort import ReasoningEffort

    from autoscaling.simulator.tracefile import EFFORT_POOL
    from services.routing import applied_effort
    from services.settings import ServiceSettings

    names = [a for a in typing.get_args(typing.get_args(ReasoningEffort)[0])]
    routing, pools = RoutingSettings(), ServiceSettings.model_fields["pools"].default
    pool_of = {p.effort: name for name, p in pools.items()}
    assert {name: pool_of[applied_effort(name, routing)] for name in names} == \
        {name: EFFORT_POOL[name] for name in names}


def test_a_refusal_part_is_its_turns_text(tokenizer):
    """OpenAI's assistant content parts include `refusal`: the turn's text, as the message's
    own `refusal` field is."""
    parts = [{"type": "refusal", "refusal": "I can't help with that."}]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": parts},
                {"role": "user", "content": "why?"}]
    got = plan(tokenizer, messages=messages)
    as_text = [messages[0], {"role": "assistant", "content": "I can't help with that."},
               messages[2]]
    assert got.engine_request.prompt_ids == tokenizer.encode_chat(as_text, effort="none").ids


def test_a_call_whose_arguments_nest_too_deeply_to_parse_is_a_400(tokenizer):
    """An earlier call's `arguments` is a JSON string mistral-common parses: 2 KB nested a
    thousand deep raised RecursionError, a 500 (no body check sees inside a string)."""
    deep = "[" * 1100 + "]" * 1100
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call00001", "type": "function",
                     "function": {"name": "get_weather", "arguments": deep}}]},
                {"role": "tool", "tool_call_id": "call00001", "content": "ok"},
                {"role": "user", "content": "and?"}]
    with pytest.raises(InvalidRequest) as err:
        tokenizer.encode_chat(messages, effort="none",
                              tools=[{"type": "function", "function": WEATHER}])
    assert err.value.param == "messages" and "nest too deeply" in str(err.value)


def test_tools_are_sized_as_the_prompt_shows_them_not_escaped():
    """The text-size bound of a request with non-ASCII tool descriptions: escaped (`\\uXXXX`,
    six bytes a character) it refused tool sets that fit the context."""
    from services.api.service import _encoding_size

    description = "获取指定城市的天气预报信息并返回温度湿度风速等数据。" * 700
    tools = [{"type": "function", "function": WEATHER | {"description": description}}]
    size = _encoding_size([{"role": "user", "content": "北京天气怎么样"}], tools)
    assert size < 1.2 * len(description.encode())
