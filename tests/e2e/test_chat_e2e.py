"""The deployed stack over HTTP with the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from services.api.output import parse_completion
from services.engines.protocol import EngineRequest, SamplingParams
from services.engines.reference import ReferenceEngine
from services.settings import EngineSettings

pytestmark = pytest.mark.ray
MODEL = "mistral-small-4"
HELLO = [{"role": "user", "content": "Say something about the sea."}]


def engine_level_greedy(standin, tokenizer, messages, effort, max_tokens):
    """The same prompt straight on a reference engine, no Ray, no HTTP."""
    engine = ReferenceEngine(standin, EngineSettings(), role="both", context_length=4096,
                             eos_ids=(tokenizer.eos_id,), detokenize=tokenizer.decode)
    request = EngineRequest("direct", tokenizer.encode_chat(messages, effort=effort).ids,
                            SamplingParams(max_tokens=max_tokens, temperature=0.0))

    async def go():
        result = await engine.prefill(request)
        tokens, finish = [result.first_token], None
        async for chunk in engine.decode(request, result.first_token, result.kv):
            tokens, finish = tokens + chunk.token_ids, chunk.finish_reason
        return tokens, finish or "length"

    tokens, finish = asyncio.run(go())
    return tokens, parse_completion(tokenizer, tokens, finish, tools_enabled=False, stop=())


def test_greedy_over_http_equals_engine_level_greedy(client, standin, tokenizer):
    tokens, (content, reasoning, _, finish) = engine_level_greedy(standin, tokenizer, HELLO,
                                                                  "none", 24)
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=24,
                                           temperature=0)
    assert reply.choices[0].message.content == (content or None)
    assert reply.choices[0].finish_reason == finish
    assert reply.usage.completion_tokens == len(tokens)
    assert reply.usage.prompt_tokens == len(tokenizer.encode_chat(HELLO, effort="none").ids)


def test_streaming_equals_non_streaming_and_reports_usage(client):
    kwargs = dict(model=MODEL, messages=HELLO, max_tokens=30, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True,
                                                 stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == (whole.choices[0].message.content or "")
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert 1 < len(content_chunks) < whole.usage.completion_tokens  # coalesced, yet streamed


@pytest.mark.parametrize("effort, pool, applied", [
    (None, "fast", "none"), ("low", "fast", "none"), ("minimal", "fast", "none"),
    ("medium", "deep", "high"), ("high", "deep", "high"), ("none", "fast", "none"),
])
def test_efforts_land_in_their_pools(client, effort, pool, applied):
    extra = {} if effort is None else {"reasoning_effort": effort}
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO,
                                                           max_tokens=2, **extra)
    assert raw.headers["x-small4-pool"] == pool
    assert raw.headers["x-small4-reasoning-effort"] == applied
    assert raw.parse().model_extra["reasoning_effort"] == applied


def test_reasoning_content_is_split(sim_client):
    question = "why is the sky blue"
    reply = sim_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], reasoning_effort="high")
    message = reply.choices[0].message
    assert message.model_extra["reasoning_content"] == question
    assert message.content == question
    assert reply.usage.completion_tokens_details.reasoning_tokens >= 2
    stream = sim_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], reasoning_effort="high",
        stream=True)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == question
    assert "".join(d.content or "" for d in deltas) == question


TOOLS = [{"type": "function", "function": {
    "name": "lookup", "description": "Look a thing up",
    "parameters": {"type": "object", "properties": {"input": {"type": "string"}}}}}]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_are_parsed(sim_client, stream):
    messages = [{"role": "user", "content": "find the tide tables"}]
    reply = sim_client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                               stream=stream)
    if stream:
        chunks = [c for c in reply if c.choices]
        calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        name, args = calls[0].function.name, calls[0].function.arguments
        assert finish == ["tool_calls"] and len(calls) == 1 and calls[0].index == 0
    else:
        call = reply.choices[0].message.tool_calls[0]
        name, args = call.function.name, call.function.arguments
        assert reply.choices[0].finish_reason == "tool_calls"
        assert len(call.id) == 9 and call.id.isalnum()
    assert name == "lookup" and json.loads(args) == {"input": "find the tide tables"}


def test_models_lists_the_engine_kind(client, sim_client):
    ref = client.models.list().data[0]
    sim = sim_client.models.list().data[0]
    assert ref.id == sim.id == MODEL
    assert ref.model_extra["engine"] == "reference" and sim.model_extra["engine"] == "simulated"


def test_health_and_ready(stack):
    assert httpx.get(f"{stack['ref']}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{stack['ref']}/ready").json()
    assert ready["ready"] and ready["pools"] == {"fast": {"decode": True, "prefill": True},
                                                 "deep": {"decode": True, "prefill": True}}


def test_n_choices_are_sampled_independently_and_reproducibly(client):
    """`n` choices on the reference engine: seeded, they differ from one another and are the
    same on every call; streamed, each choice's text is its whole answer's; usage sums them."""
    kwargs = dict(model=MODEL, messages=HELLO, max_tokens=12, temperature=1.0, seed=7)
    one = client.chat.completions.create(**kwargs)
    first, again = (client.chat.completions.create(n=3, **kwargs) for _ in range(2))
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len(set(texts)) > 1, texts  # sampled independently
    assert texts[0] == one.choices[0].message.content  # the first is the n=1 answer
    assert [c.message.content for c in again.choices] == texts  # seeded: reproducible
    assert first.usage.prompt_tokens == one.usage.prompt_tokens
    assert first.usage.completion_tokens > one.usage.completion_tokens
    chunks = list(client.chat.completions.create(n=3, stream=True,
                                                 stream_options={"include_usage": True},
                                                 **kwargs))
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks
                        if c.choices and c.choices[0].index == i) for i in range(3)]
    assert streamed == [t or "" for t in texts]
    assert chunks[-1].usage.completion_tokens == first.usage.completion_tokens


@pytest.mark.parametrize("kwargs, param", [
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "many words " * 3000}]}, "messages"),
])
def test_client_mistakes_get_400_naming_the_field(client, kwargs, param):
    args = {"model": MODEL, "messages": HELLO} | kwargs
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**args)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param
    assert err.value.body["request_id"].startswith("chatcmpl-")


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"model": "mistral-small-4"}'])
def test_malformed_bodies_are_400_not_500(stack, body):
    reply = httpx.post(f"{stack['ref']}/v1/chat/completions", content=body,
                       headers={"content-type": "application/json"})
    assert reply.status_code == 400
    assert reply.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_is_an_openai_404(stack):
    reply = httpx.get(f"{stack['ref']}/v1/nothing")
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "not_found"


def test_spillover_when_home_pool_is_full(stack, sim_client, ask):
    """fast has max_queue 1 in the sim app: a second concurrent `none` request goes to deep."""
    long_text = " ".join(f"word{i}" for i in range(80))  # ~80 steps of 10 ms

    async def both():
        async with httpx.AsyncClient(timeout=60) as http:
            body = {"model": MODEL, "messages": [{"role": "user", "content": long_text}]}
            first = asyncio.create_task(http.post(f"{stack['sim']}/v1/chat/completions", json=body))
            deadline = time.monotonic() + 30  # the first is in fast before the second is sent
            while (await asyncio.to_thread(ask, "sim", "fast-decode", "stats")).running < 1:
                assert time.monotonic() < deadline and not first.done(), "first never ran"
                await asyncio.sleep(0.02)
            second = await http.post(f"{stack['sim']}/v1/chat/completions", json=body)
            return await first, second

    first, second = asyncio.run(both())
    assert first.headers["x-small4-pool"] == "fast" and first.headers["x-small4-spillover"] == "0"
    assert second.headers["x-small4-pool"] == "deep" and second.headers["x-small4-spillover"] == "1"
    assert second.headers["x-small4-reasoning-effort"] == "none"
    assert second.json()["choices"][0]["message"]["content"] == long_text


def test_client_disconnect_aborts_and_frees_kv(stack, ask):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3000, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", f"{stack['ref']}/v1/chat/completions", json=body,
                      timeout=60) as reply:
        lines = reply.iter_lines()
        for _ in range(3):
            next(lines)
        assert ask("ref", "fast-decode", "stats").kv_tokens > 0
    deadline = time.time() + 20
    while time.time() < deadline:
        stats = ask("ref", "fast-decode", "stats")
        if stats.kv_tokens == 0 and stats.running == 0:
            break
        time.sleep(0.2)
    assert (stats.running, stats.kv_tokens) == (0, 0)


@pytest.mark.parametrize("kwargs, param", [
    ({"n": 9}, "n"),  # above limits.max_n
    ({"frequency_penalty": 5}, "frequency_penalty"),  # out of [-2, 2]: a range error
    ({"prediction": {"type": "content", "content": "The sea"}}, "prediction"),
    ({"tools": TOOLS, "functions": [TOOLS[0]["function"]]}, "functions"),  # not both
])
def test_fields_we_cannot_honour_are_refused_naming_them(client, kwargs, param):
    """Never a 200 that ignored a field changing the answer."""
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, **kwargs)
    assert err.value.body["param"] == param
    assert err.value.body["type"] == "invalid_request_error"
    assert ("supported" in err.value.body["message"]) is (param == "prediction")


def test_spec_nulls_mean_the_defaults(client):
    kwargs = dict(model=MODEL, messages=HELLO, max_tokens=6)
    nulls = client.chat.completions.create(temperature=None, top_p=None, n=None, stop=None,
                                           presence_penalty=None, extra_body={"stream": None},
                                           seed=7, **kwargs)
    plain = client.chat.completions.create(seed=7, **kwargs)  # the defaults, sampled alike
    assert len(nulls.choices) == 1
    assert nulls.choices[0].message.content == plain.choices[0].message.content
    unseeded = client.chat.completions.create(seed=None, **kwargs)
    assert unseeded.choices[0].finish_reason in ("stop", "length")
    greedy = client.chat.completions.create(temperature=0, **kwargs)
    assert client.chat.completions.create(top_p=0, **kwargs).choices[0].message.content == \
        greedy.choices[0].message.content  # top_p 0 keeps the most likely token only


def test_models_retrieve(client):
    model = client.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "small4")
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4o")
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_none_offers_no_tools(sim_client, stream):
    """The echo engine calls the first tool the prompt offers: with `none` there is none."""
    messages = [{"role": "user", "content": "find the tide tables"}]
    reply = sim_client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                               tool_choice="none", stream=stream)
    if stream:
        chunks = [c for c in reply if c.choices]
        assert not [c for c in chunks if c.choices[0].delta.tool_calls]
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    else:
        assert reply.choices[0].message.tool_calls is None
        content, finish = reply.choices[0].message.content, [reply.choices[0].finish_reason]
    assert content == "find the tide tables" and finish == ["stop"]
    assert "[TOOL_CALLS]" not in content


def test_assistant_prefill_is_continued(client, tokenizer):
    messages = [{"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "The colour is", "prefix": True}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    continued = tokenizer.encode_chat(messages, effort="none").ids
    assert tokenizer.decode(continued).endswith("[/INST]The colour is")
    assert reply.usage.prompt_tokens == len(continued)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=messages[:1] + [
            {"role": "assistant", "content": "The colour is"}], max_tokens=3)
    assert err.value.body["param"] == "messages"


def test_response_headers_and_refusal(stack, sim_client):
    """The sim app traces nothing: a trace id is made up for every answer anyway."""
    raw = sim_client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
    assert len(raw.headers["x-trace-id"]) == 32
    message = json.loads(raw.text)["choices"][0]["message"]
    assert "refusal" in message and message["refusal"] is None
    with httpx.stream("POST", f"{stack['sim']}/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": HELLO, "stream": True}) as streamed:
        assert streamed.headers["cache-control"] == "no-cache"
        assert streamed.headers["x-accel-buffering"] == "no"
        assert len(streamed.headers["x-trace-id"]) == 32
        streamed.read()
    for path in ("/health", "/ready", "/v1/models", "/v1/nothing"):
        got = httpx.get(f"{stack['sim']}{path}")
        head = httpx.head(f"{stack['sim']}{path}")
        assert len(got.headers["x-trace-id"]) == 32, path
        if path != "/v1/nothing":
            assert (head.status_code, head.content) == (200, b""), path
