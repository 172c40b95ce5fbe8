"""Every kind of answer the HTTP surface gives, validated against OpenAI's published schemas
(a verbatim excerpt vendored under tests/openai_spec, read from disk: no network).

The stack runs in process with the reference engine (the random-weight stand-in: what it writes
is noise, its shape must still be OpenAI's). Extra fields we add (`reasoning_content`, ...) pass
where the spec allows additional properties, which is everywhere it does not say otherwise."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from jsonschema import Draft202012Validator, validators
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from cluster.inprocess import build_inprocess
from cluster.settings import parse_settings
from services.tokenizer import PromptTokenizer

SPEC = Path(__file__).parents[1] / "openai_spec" / "chat_schemas.json"
SPEC_URI = "urn:openai-openapi:chat-schemas"
MODEL = "mistral-small-4"
PROFILE = {
    "profile": "openai-schemas",
    "auth": {"enabled": False},
    "model": {"context_length": 4096},
    "pools": {"fast": {"effort": "none"}, "deep": {"effort": "high"}},
    "stream": {"interval_tokens": 2, "interval_ms": 50},
}
ASK = [{"role": "user", "content": "Describe a thing."}]
BODY = {"model": MODEL, "messages": ASK, "max_tokens": 6, "seed": 1}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"enum": ["utc", "cet"]}}}}}
FORCED = {"tools": [CLOCK], "tool_choice": {"type": "function", "function": {"name": "get_time"}},
          "max_tokens": 40}
THING = {"type": "json_schema", "json_schema": {"name": "thing", "strict": True, "schema": {
    "type": "object", "additionalProperties": False, "required": ["ok", "kind"],
    "properties": {"ok": {"type": "boolean"}, "kind": {"enum": ["red", "green", "blue"]}}}}}
INCLUDE_USAGE = {"stream": True, "stream_options": {"include_usage": True}}
# Effort high under a grammar: free reasoning (`reasoning_content`, our extension), then JSON.
REASONED = {"reasoning_effort": "high", "response_format": THING, "max_tokens": 80}


def nullable(check):
    """OpenAPI 3.0's `nullable: true` (null is also valid), which some schemas of this 3.1 spec
    still use; JSON Schema 2020-12 would ignore it and refuse the nulls OpenAI itself sends."""
    def validate(validator, value, instance, schema):
        if instance is None and schema.get("nullable") is True:
            return
        yield from check(validator, value, instance, schema) or ()
    return validate


OpenAPIValidator = validators.extend(
    Draft202012Validator,
    {keyword: nullable(check) for keyword, check in Draft202012Validator.VALIDATORS.items()})


@pytest.fixture(scope="module")
def spec():
    """A validator per component schema name, resolving `$ref`s inside the vendored file."""
    document = json.loads(SPEC.read_text(encoding="utf-8"))
    registry = Registry().with_resource(SPEC_URI, DRAFT202012.create_resource(document))
    names = document["components"]["schemas"]

    def validator(name: str):
        assert name in names, name
        return OpenAPIValidator({"$ref": f"{SPEC_URI}#/components/schemas/{name}"},
                                registry=registry)
    return validator


def violations(spec, name: str, body) -> list[str]:
    """Where `body` breaks schema `name`: one line per error, with its JSON path."""
    return [f"{error.json_path}: {error.message}"
            for error in spec(name).iter_errors(body)]


def events(response: httpx.Response) -> list[dict]:
    """The JSON payloads of an SSE answer, up to `[DONE]` (which must end it)."""
    data = [line.removeprefix("data: ") for line in response.text.splitlines()
            if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", response.text[-200:]
    return [json.loads(payload) for payload in data[:-1]]


REQUESTS = {
    "plain": ("POST", "/v1/chat/completions", {"json": BODY}),
    "reasoning": ("POST", "/v1/chat/completions", {"json": BODY | REASONED}),
    "logprobs": ("POST", "/v1/chat/completions", {"json": BODY | {
        "logprobs": True, "top_logprobs": 2}}),
    "forced_tool": ("POST", "/v1/chat/completions", {"json": BODY | FORCED}),
    "json_schema": ("POST", "/v1/chat/completions", {"json": BODY | {
        "response_format": THING, "max_tokens": 40}}),
    "stream": ("POST", "/v1/chat/completions", {"json": BODY | INCLUDE_USAGE}),
    "stream_logprobs": ("POST", "/v1/chat/completions", {"json": BODY | INCLUDE_USAGE | {
        "logprobs": True, "top_logprobs": 2}}),
    "stream_tool": ("POST", "/v1/chat/completions", {"json": BODY | FORCED | INCLUDE_USAGE}),
    "stream_reasoning": ("POST", "/v1/chat/completions", {"json": BODY | REASONED | {
        "stream": True}}),
    "choices": ("POST", "/v1/chat/completions", {"json": BODY | {"n": 2, "temperature": 1}}),
    "stream_choices": ("POST", "/v1/chat/completions", {"json": BODY | INCLUDE_USAGE | {
        "n": 2}}),
    "models": ("GET", "/v1/models", {}),
    "model": ("GET", f"/v1/models/{MODEL}", {}),
    "bad_field": ("POST", "/v1/chat/completions", {"json": BODY | {"temperature": "hot"}}),
    "refused_field": ("POST", "/v1/chat/completions", {"json": BODY | {"n": 9}}),
    "bad_json": ("POST", "/v1/chat/completions", {
        "content": b"{not json", "headers": {"content-type": "application/json"}}),
    "unknown_model": ("POST", "/v1/chat/completions", {"json": BODY | {"model": "gpt-4o"}}),
    "missing_model": ("GET", "/v1/models/gpt-4o", {}),
}


@pytest.fixture(scope="module")
def answers() -> dict[str, httpx.Response]:
    """One in-process stack (reference engine), every request of REQUESTS sent once."""
    app = build_inprocess(parse_settings(PROFILE)).build_asgi_app()

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://small4") as client:
            return {name: await client.request(method, path, timeout=120, **kwargs)
                    for name, (method, path, kwargs) in REQUESTS.items()}

    return asyncio.run(go())


@pytest.mark.parametrize("name", ["plain", "reasoning", "logprobs", "forced_tool", "json_schema",
                                  "choices"])
def test_completions_match_the_completion_schema(answers, spec, name):
    response = answers[name]
    assert response.status_code == 200, response.text
    assert violations(spec, "CreateChatCompletionResponse", response.json()) == []


def test_the_variants_carry_what_makes_them_variants(answers):
    """So each validation above covers the part of the schema it is meant to."""
    reasoning = answers["reasoning"].json()["choices"][0]["message"]
    assert reasoning.get("reasoning_content")
    logprobs = answers["logprobs"].json()["choices"][0]["logprobs"]["content"]
    assert logprobs and all(len(entry["top_logprobs"]) == 2 for entry in logprobs)
    forced = answers["forced_tool"].json()["choices"][0]
    assert forced["finish_reason"] == "tool_calls"
    assert {c["function"]["name"] for c in forced["message"]["tool_calls"]} == {"get_time"}
    assert json.loads(answers["json_schema"].json()["choices"][0]["message"]["content"])


@pytest.mark.parametrize("name", ["stream", "stream_logprobs", "stream_tool", "stream_reasoning",
                                  "stream_choices"])
def test_every_stream_chunk_matches_the_chunk_schema(answers, spec, name):
    response = answers[name]
    assert response.status_code == 200, response.text
    chunks = events(response)
    assert {i: violations(spec, "CreateChatCompletionStreamResponse", chunk)
            for i, chunk in enumerate(chunks)} == {i: [] for i in range(len(chunks))}
    if "stream_options" in REQUESTS[name][2]["json"]:  # the usage chunk closes the answer
        *chunks, last = chunks
        assert last["choices"] == [] and last["usage"]["total_tokens"] > 0
    assert chunks[-1]["choices"][0]["finish_reason"] is not None


def test_streams_carry_what_makes_them_variants(answers):
    logprobs = [entry for chunk in events(answers["stream_logprobs"]) for choice in chunk["choices"]
                if choice["logprobs"] for entry in choice["logprobs"]["content"]]
    assert logprobs and all(len(entry["top_logprobs"]) == 2 for entry in logprobs)
    calls = [call for chunk in events(answers["stream_tool"]) for choice in chunk["choices"]
             for call in choice["delta"].get("tool_calls") or []]
    assert calls and calls[0]["function"]["name"] == "get_time"
    assert any(choice["delta"].get("reasoning_content")
               for chunk in events(answers["stream_reasoning"]) for choice in chunk["choices"])


def test_models_match_the_model_schemas(answers, spec):
    assert answers["models"].status_code == answers["model"].status_code == 200
    assert violations(spec, "ListModelsResponse", answers["models"].json()) == []
    assert answers["models"].json()["data"]
    assert violations(spec, "Model", answers["model"].json()) == []


@pytest.mark.parametrize("name, status", [
    ("bad_field", 400), ("refused_field", 400), ("bad_json", 400),
    ("unknown_model", 404), ("missing_model", 404)])
def test_errors_match_the_error_schema(answers, spec, name, status):
    response = answers[name]
    assert response.status_code == status, response.text
    assert violations(spec, "ErrorResponse", response.json()) == []
    assert response.json()["error"]["request_id"].startswith("chatcmpl-")  # every error


def test_with_include_usage_every_chunk_has_usage_null_until_the_last(answers):
    """As OpenAI sends them: `usage: null` on each chunk, the totals on the last."""
    chunks = events(answers["stream"])
    assert chunks and all("usage" in chunk for chunk in chunks)
    assert [c["usage"] is None for c in chunks] == [True] * (len(chunks) - 1) + [False]


def test_the_validator_refuses_what_the_spec_refuses(spec):
    """The checks above can fail: a missing required field, a wrong type, a null where the spec
    has no `nullable` are each caught."""
    message = {"role": "assistant", "content": "hi", "refusal": None}
    completion = {"id": "x", "object": "chat.completion", "created": 1, "model": MODEL,
                  "choices": [{"index": 0, "message": message, "finish_reason": "stop",
                               "logprobs": None}]}
    assert violations(spec, "CreateChatCompletionResponse", completion) == []
    del message["refusal"]
    assert violations(spec, "CreateChatCompletionResponse", completion)
    assert violations(spec, "Model", {"id": MODEL, "object": "model", "created": "1",
                                      "owned_by": "small4"})
    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
             "choices": [{"index": 0, "delta": {}, "finish_reason": None, "logprobs": None}]}
    assert violations(spec, "CreateChatCompletionStreamResponse", chunk) == []
    assert violations(spec, "CreateChatCompletionStreamResponse", chunk | {"id": None})


# The answers against the spec this deployment serves (`/openapi.json`), whose response schemas
# come from the same pydantic models the bodies are built from; those are closed
# (`additionalProperties: false`), so an undeclared field in any body fails here.
OURS = {"plain": "ChatCompletion", "reasoning": "ChatCompletion", "logprobs": "ChatCompletion",
        "forced_tool": "ChatCompletion", "json_schema": "ChatCompletion",
        "stream": "ChatCompletionChunk", "stream_logprobs": "ChatCompletionChunk",
        "stream_tool": "ChatCompletionChunk", "stream_reasoning": "ChatCompletionChunk",
        "choices": "ChatCompletion", "stream_choices": "ChatCompletionChunk",
        "models": "ModelList", "model": "ModelCard", "bad_field": "Error",
        "refused_field": "Error", "bad_json": "Error", "unknown_model": "Error",
        "missing_model": "Error"}


def test_every_answer_matches_the_served_spec(answers):
    from referencing import Resource

    app = build_inprocess(parse_settings(PROFILE))
    served = app.spec
    uri = "urn:small4:openapi"
    registry = Registry().with_resource(uri, Resource.from_contents(
        served, default_specification=DRAFT202012))
    assert set(OURS) == set(REQUESTS)
    wrong = {}
    for name, schema in OURS.items():
        check = Draft202012Validator({"$ref": f"{uri}#/components/schemas/{schema}"},
                                     registry=registry)
        response = answers[name]
        bodies = events(response) if schema == "ChatCompletionChunk" else [response.json()]
        errors = [f"{e.json_path}: {e.message}" for body in bodies for e in check.iter_errors(body)]
        if errors:
            wrong[name] = errors[:3]
    assert wrong == {}
    closed = served["components"]["schemas"]["ChatCompletion"]
    assert closed["additionalProperties"] is False


def test_the_served_spec_takes_its_response_schemas_from_the_models():
    from services.api.responses import SCHEMAS

    served = build_inprocess(parse_settings(PROFILE)).spec["components"]["schemas"]
    for name, model in SCHEMAS.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schema.pop("$defs", None)
        assert served[name] == schema, name


@pytest.mark.parametrize("body", [
    {},  # no tools
    {"tools": [CLOCK], "tool_choice": "none"},  # tools hidden: a text answer is promised
])
def test_where_no_tools_are_offered_the_answer_is_text_not_a_lost_call(body):
    """The stand-in model pushed to a call (its marker biased up as far as a client may): a
    call there has no tool to be parsed against and was dropped, leaving an empty answer.
    The marker is never sampled now; the answer is text."""
    tokenizer = PromptTokenizer()
    marker = str(tokenizer.special("[TOOL_CALLS]"))
    history = [{"role": "user", "content": "What time is it?"},
               {"role": "assistant", "content": None, "tool_calls": [{
                   "id": "abcdefghi", "type": "function",
                   "function": {"name": "get_time", "arguments": '{"zone": "utc"}'}}]},
               {"role": "tool", "tool_call_id": "abcdefghi", "content": "12:00"}]
    app = build_inprocess(parse_settings(PROFILE)).build_asgi_app()

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://small4") as client:
            return await client.post("/v1/chat/completions", timeout=60, json=BODY | body | {
                "messages": history, "temperature": 0, "max_tokens": 4,
                "logit_bias": {marker: 100}})

    reply = asyncio.run(go())
    assert reply.status_code == 200, reply.text
    message = reply.json()["choices"][0]
    assert message["message"]["content"] and not message["message"].get("tool_calls")
    assert message["finish_reason"] == "length"


@pytest.mark.parametrize("body, cause", [
    ({"response_format": THING}, "response_format"),
    ({"tools": [CLOCK | {"function": CLOCK["function"] | {"strict": True}}]},
     "tools.0.function.strict"),
    ({"tools": [CLOCK], "parallel_tool_calls": False}, "parallel_tool_calls"),
])
def test_an_assistant_prefix_under_a_constrained_answer_is_refused_before_any_compile(
        body, cause, monkeypatch):
    ingress = build_inprocess(parse_settings(PROFILE))
    compiled = []
    # (the guidance is shared by every in-process stack: patched for this test only)
    monkeypatch.setattr(ingress.service.guidance, "grammar", lambda *a: compiled.append(a))
    app = ingress.build_asgi_app()
    messages = ASK + [{"role": "assistant", "content": "It is", "prefix": True}]

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://small4") as client:
            return await client.post("/v1/chat/completions", timeout=60,
                                     json=BODY | body | {"messages": messages})

    reply = asyncio.run(go())
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "messages" and f"({cause})" in error["message"]
    assert compiled == []


def test_long_lists_are_refused_by_their_length_before_their_items_are_checked():
    """A message of thousands of parts is refused for its length (not each bad part checked
    and reported: 100k cost half a second); more messages than `limits.max_messages` are
    refused before any is validated."""
    from services.api.schemas import MAX_CONTENT_PARTS, parse_chat_request
    from services.errors import InvalidRequest

    parts = [{"type": "text", "text": ""}] * (MAX_CONTENT_PARTS + 1)
    with pytest.raises(InvalidRequest) as err:
        parse_chat_request({"model": "m", "messages": [{"role": "user", "content": parts}]})
    assert err.value.param == "messages.0.content"
    assert f"at most {MAX_CONTENT_PARTS} items" in str(err.value)
    spread = [{"role": "user", "content": [0] * MAX_CONTENT_PARTS}] * 5  # each within its cap
    with pytest.raises(InvalidRequest) as err:
        parse_chat_request({"model": "m", "messages": spread})
    assert err.value.param == "messages" and "content parts" in str(err.value)
    bad = [{"role": "user", "content": 1}] * 600  # each invalid: the count comes first
    with pytest.raises(InvalidRequest) as err:
        parse_chat_request({"model": "m", "messages": bad}, max_messages=512)
    assert err.value.param == "messages" and "at most 512 messages" in str(err.value)
