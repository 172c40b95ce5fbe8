"""Structured outputs, forced tool calls, logprobs and sampling controls end to end, with the
official `openai` client against the reference stack (random-weight stand-in model: whatever it
writes, the grammar must make it valid).

Schemas are bounded (maxLength, maxItems, integer ranges, no additional properties), as a
random model would otherwise write one string forever; the answer is then always complete
within max_tokens."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.structured_cases import CLOCK, SCHEMA, TOOLS, WEATHER

pytestmark = pytest.mark.ray

MODEL = "mistral-small-4"
FORMAT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA,
                                                 "strict": True}}
ASK = [{"role": "user", "content": "Describe a thing."}]


class Inner(BaseModel):
    ok: bool
    kind: Literal["red", "green", "blue"]


class Thing(BaseModel):
    name: str = Field(max_length=8)
    count: int = Field(ge=0, le=99)
    inner: Inner
    tags: list[Literal["a", "b"]] = Field(max_length=3)


def streamed_text(stream) -> tuple[str, str, str | None]:
    """(content, reasoning, finish_reason) of a streamed answer."""
    content, reasoning, finish = [], [], None
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            content.append(delta.content or "")
            reasoning.append((delta.model_extra or {}).get("reasoning_content") or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(content), "".join(reasoning), finish


@pytest.mark.parametrize("seed", range(6))
def test_every_json_schema_answer_validates(client, seed):
    """100 % of answers parse and validate, streamed (odd seeds) or not, sampled at T=1."""
    args = dict(model=MODEL, messages=ASK, response_format=FORMAT, max_tokens=200,
                temperature=1.0, seed=seed)
    if seed % 2:
        content, _, finish = streamed_text(client.chat.completions.create(stream=True, **args))
    else:
        choice = client.chat.completions.create(**args).choices[0]
        content, finish = choice.message.content, choice.finish_reason
    assert finish == "stop"
    jsonschema.validate(json.loads(content), SCHEMA)


def test_the_sdks_parse_returns_the_typed_object(client):
    completion = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Thing,
                                               max_tokens=200, seed=11)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Thing) and isinstance(parsed.inner, Inner)


@pytest.mark.parametrize("stream", [False, True])
def test_with_reasoning_the_answer_reasons_then_validates(client, stream):
    """Effort high: reasoning is free text (the stand-in writes its whole budget of it), then the
    content validates against the schema."""
    args = dict(model=MODEL, messages=ASK, response_format=FORMAT, max_tokens=160, seed=3,
                reasoning_effort="high")
    if stream:
        content, reasoning, finish = streamed_text(
            client.chat.completions.create(stream=True, **args))
    else:
        choice = client.chat.completions.create(**args).choices[0]
        content, finish = choice.message.content, choice.finish_reason
        reasoning = (choice.message.model_extra or {}).get("reasoning_content")
    assert reasoning and finish == "stop"
    jsonschema.validate(json.loads(content), SCHEMA)


@pytest.mark.parametrize("choice, effort", [
    ("required", "none"), ({"type": "function", "function": {"name": "get_time"}}, "none"),
    ("required", "high"), ({"type": "function", "function": {"name": "get_weather"}}, "high"),
])
def test_forced_tool_calls_are_always_valid_calls(client, choice, effort):
    """`required` and a named tool always produce one call (parallel_tool_calls false) whose
    arguments validate against that tool's parameters; with effort high, after reasoning."""
    for seed in range(3):
        message = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Weather or time?"}],
            tools=[WEATHER, CLOCK], tool_choice=choice, parallel_tool_calls=False,
            reasoning_effort=effort, max_tokens=160, seed=seed).choices[0]
        assert message.finish_reason == "tool_calls"
        (call,) = message.message.tool_calls
        if isinstance(choice, dict):
            assert call.function.name == choice["function"]["name"]
        tool = TOOLS[call.function.name]["function"]
        jsonschema.validate(json.loads(call.function.arguments), tool["parameters"])
        if effort == "high":
            assert (message.message.model_extra or {}).get("reasoning_content")


def test_streamed_forced_call_arrives_as_valid_calls_of_the_named_function(client):
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Time?"}], tools=[WEATHER, CLOCK],
            tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=120,
            stream=True, seed=4):
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    # the named function, every call (parallel calls allowed: parallel_tool_calls is not false)
    assert calls and {c["name"] for c in calls.values()} == {"get_time"}, calls
    assert finish == "tool_calls"
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), CLOCK["function"]["parameters"])


def test_logprobs_come_with_the_tokens_streamed_and_not(client):
    args = dict(model=MODEL, messages=ASK, max_tokens=12, temperature=0.0, logprobs=True,
                top_logprobs=3)
    answer = client.chat.completions.create(**args).choices[0]
    entries = answer.logprobs.content
    assert entries and all(len(e.top_logprobs) == 3 for e in entries)
    for entry in entries:  # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
        assert entry.logprob <= 0 and bytes(entry.bytes).decode("utf-8", "replace")
    assert "".join(e.token for e in entries) == (answer.message.content or "")
    streamed = [e for chunk in client.chat.completions.create(stream=True, **args)
                if chunk.choices and chunk.choices[0].logprobs
                for e in chunk.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in entries]


@pytest.mark.parametrize("extra", [
    {"reasoning_effort": "high", "response_format": FORMAT, "max_tokens": 200},
    {"tools": [CLOCK], "tool_choice": "required", "max_tokens": 60},
], ids=["reasoning-then-json", "forced-call"])
def test_logprobs_cover_the_content_only(client, extra):
    """Not the reasoning, not a tool call's name or arguments: `logprobs.content` is the
    message content's tokens, streamed and not."""
    args = dict(model=MODEL, messages=ASK, temperature=0.0, logprobs=True) | extra
    answer = client.chat.completions.create(**args).choices[0]
    reasoning = (answer.message.model_extra or {}).get("reasoning_content") or ""
    assert reasoning or answer.message.tool_calls, "nothing but content: the case tests nothing"
    joined = "".join(e.token for e in answer.logprobs.content)
    assert joined == (answer.message.content or "")
    streamed = [e.token for chunk in client.chat.completions.create(stream=True, **args)
                if chunk.choices and chunk.choices[0].logprobs
                for e in chunk.choices[0].logprobs.content]
    assert "".join(streamed) == joined


def test_logit_bias_changes_the_answer(client):
    """A +100 bias on one token makes greedy decoding write only that token (the same request
    unbiased writes something else)."""
    from services.tokenizer import load_tokenizer

    token = 1784  # an ordinary text token of the Tekken vocabulary
    text = load_tokenizer().decode([token])
    args = dict(model=MODEL, messages=ASK, max_tokens=6, temperature=0.0, logprobs=True)
    biased = client.chat.completions.create(logit_bias={str(token): 100}, **args)
    assert [e.token for e in biased.choices[0].logprobs.content] == [text] * 6
    plain = client.chat.completions.create(**args)
    assert [e.token for e in plain.choices[0].logprobs.content] != [text] * 6


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}},
     "response_format.json_schema"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"n": 9}, "n"),  # above limits.max_n
])
def test_what_cannot_be_honoured_is_a_400_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4,
                                       extra_body=body)
    assert caught.value.body["param"] == param


@pytest.mark.parametrize("stream", [False, True])
def test_deprecated_functions_answer_in_their_own_shape(client, stream):
    """`functions` + a named `function_call`: one call, as `message.function_call`, finish
    reason `function_call` (what clients of the deprecated API read)."""
    args = dict(model=MODEL, messages=[{"role": "user", "content": "Time?"}],
                functions=[CLOCK["function"], WEATHER["function"]],
                function_call={"name": "get_time"}, max_tokens=120, seed=6)
    if stream:
        name, arguments, finish = "", "", None
        for chunk in client.chat.completions.create(stream=True, **args):
            if chunk.choices:
                call = chunk.choices[0].delta.function_call
                name += (call.name or "") if call else ""
                arguments += (call.arguments or "") if call else ""
                finish = chunk.choices[0].finish_reason or finish
    else:
        choice = client.chat.completions.create(**args).choices[0]
        assert choice.message.tool_calls is None
        name, arguments = choice.message.function_call.name, choice.message.function_call.arguments
        finish = choice.finish_reason
    assert (name, finish) == ("get_time", "function_call")
    jsonschema.validate(json.loads(arguments), CLOCK["function"]["parameters"])
