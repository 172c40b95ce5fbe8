"""The HTTP surface around the chat route, in process (simulated engine, real FastAPI app):
model retrieve, HEAD, CORS from settings, a trace id on every answer, SSE cache headers,
`refusal` in messages, refused fields naming themselves."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from cluster.inprocess import build_inprocess
from cluster.settings import parse_settings
from tests.log_lines import LogLines

ORIGIN = "https://app.example.com"
PROFILE = {
    "profile": "http-surface",
    "auth": {"enabled": False},
    "model": {"context_length": 4096},
    "engine": {"kind": "simulated", "simulated": {"decode_step_ms": 1, "output": "counter"}},
    "pools": {"fast": {"effort": "none"}, "deep": {"effort": "high"}},
}
BODY = {"model": "mistral-small-4", "max_tokens": 4,
        "messages": [{"role": "user", "content": "count"}]}
TRACE_ID = re.compile(r"^[0-9a-f]{32}$")


def serve(profile, *requests, prepare=None):
    """Send `requests` ((method, path, kwargs)) to a fresh in-process app; their responses.
    `prepare` gets the ingress first."""
    ingress = build_inprocess(parse_settings(profile))
    if prepare is not None:
        prepare(ingress)
    app = ingress.build_asgi_app()

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://small4") as client:
            return [await client.request(method, path, timeout=30, **kwargs)
                    for method, path, kwargs in requests]

    return asyncio.run(go())


@pytest.fixture(scope="module")
def plain():
    return serve(PROFILE,
                 ("GET", "/v1/models/mistral-small-4", {}),
                 ("GET", "/v1/models/gpt-4o", {}),
                 ("HEAD", "/health", {}), ("HEAD", "/v1/models", {}), ("HEAD", "/ready", {}),
                 ("GET", "/v1/models", {}),
                 ("OPTIONS", "/v1/chat/completions", {"headers": {
                     "origin": ORIGIN, "access-control-request-method": "POST"}}),
                 ("POST", "/v1/chat/completions", {"json": BODY}),
                 ("POST", "/v1/chat/completions", {"json": BODY | {"stream": True}}),
                 ("POST", "/v1/chat/completions", {"json": BODY | {"prediction": {
                     "type": "content", "content": "draft"}}}),
                 ("GET", "/nowhere", {}),
                 ("POST", "/v1/chat/completions", {"json": BODY | {"logprobs": True}}))


def test_the_served_model_is_retrievable_and_others_are_404(plain):
    found, missing = plain[0], plain[1]
    assert found.status_code == 200
    assert {k: found.json()[k] for k in ("id", "object", "owned_by")} == {
        "id": "mistral-small-4", "object": "model", "owned_by": "small4"}
    assert found.json() == plain[5].json()["data"][0]
    assert missing.status_code == 404
    assert missing.json()["error"] | {"message": "", "request_id": "", "trace_id": ""} == {
        "message": "", "type": "invalid_request_error", "param": "model",
        "code": "model_not_found", "request_id": "", "trace_id": ""}
    assert missing.json()["error"]["trace_id"] == missing.headers["x-trace-id"]


def test_head_answers_like_get_without_a_body(plain):
    for response in plain[2:5]:
        assert response.status_code == 200, response
        assert response.content == b""
    assert int(plain[3].headers["content-length"]) == len(plain[5].content)


def test_without_origins_cors_is_off(plain):
    preflight = plain[6]
    assert preflight.status_code == 405
    assert not [h for h in preflight.headers if h.startswith("access-control-")]


def test_every_answer_carries_a_trace_id(plain):
    for response in plain:
        assert TRACE_ID.match(response.headers["x-trace-id"]), response


def test_messages_carry_refusal_and_streams_are_not_cached(plain):
    message = plain[7].json()["choices"][0]["message"]
    assert "refusal" in message and message["refusal"] is None
    streamed = plain[8]
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.headers["cache-control"] == "no-cache"
    assert streamed.headers["x-accel-buffering"] == "no"


def test_an_unsupported_field_is_refused_naming_it(plain):
    refused = plain[9]
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "prediction")
    assert "not supported" in error["message"]
    assert error["trace_id"] == refused.headers["x-trace-id"]


def test_the_simulated_engine_refuses_what_needs_logits(plain):
    """It has no logits: logprobs (and grammars, bias, penalties) are refused, not faked."""
    refused = plain[11]
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "logprobs"


def test_an_incoming_traceparent_is_echoed_with_tracing_off():
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    (response, models) = serve(PROFILE, ("POST", "/v1/chat/completions", {
        "json": BODY, "headers": {"traceparent": f"00-{trace}-00f067aa0ba902b7-01"}}),
        ("GET", "/v1/models", {"headers": {"traceparent": f"00-{trace}-00f067aa0ba902b7-01"}}))
    assert response.headers["x-trace-id"] == models.headers["x-trace-id"] == trace


def test_only_a_valid_traceparent_and_a_sane_tracestate_are_carried_to_the_workers():
    from services.telemetry.tracing import incoming_context

    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert incoming_context({"traceparent": parent, "tracestate": "a=1"}) == {
        "traceparent": parent, "tracestate": "a=1"}
    assert incoming_context({"traceparent": parent, "tracestate": "a=" + "x" * 64000}) == {
        "traceparent": parent}
    for bad in ("x" * 60000, "00-" + "0" * 32 + "-00f067aa0ba902b7-01", "not-a-parent"):
        assert incoming_context({"traceparent": bad, "tracestate": "a=1"}) == {}


def test_cors_origins_answer_preflights_from_those_origins_only():
    profile = PROFILE | {"auth": {"enabled": False, "cors_origins": [ORIGIN]}}
    ask = {"access-control-request-method": "POST",
           "access-control-request-headers": "authorization, content-type"}
    allowed, other, simple = serve(
        profile,
        ("OPTIONS", "/v1/chat/completions", {"headers": {"origin": ORIGIN} | ask}),
        ("OPTIONS", "/v1/chat/completions", {"headers": {"origin": "https://evil.example"} | ask}),
        ("GET", "/v1/models", {"headers": {"origin": ORIGIN}}))
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert other.status_code == 400
    assert other.json()["error"]["param"] == "origin"
    assert not [h for h in other.headers if h.startswith("access-control-")]
    assert simple.headers["access-control-allow-origin"] == ORIGIN
    assert "x-trace-id" in simple.headers["access-control-expose-headers"]


def test_a_grammar_the_simulated_engine_cannot_honour_names_its_field():
    """A grammar comes from response_format, a forced call, a strict tool or one call at a
    time: the refusal names the field the request set, not response_format."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string"}}}}}
    strict = {"type": "function", "function": tool["function"] | {"strict": True}}
    replies = serve(PROFILE, *[("POST", "/v1/chat/completions", {"json": BODY | extra})
                               for extra in (
        {"tools": [tool], "tool_choice": "required"},
        {"tools": [tool], "parallel_tool_calls": False},
        {"tools": [tool, strict]},
        {"response_format": {"type": "json_object"}})])
    assert [r.json()["error"]["param"] for r in replies] == [
        "tool_choice", "parallel_tool_calls", "tools.1.function.strict", "response_format"]


def test_a_schema_too_large_to_compile_is_refused_before_it_is():
    """Compiling costs with the schema (a 12k-property object took 1.2 s of CPU): bounded by
    limits.max_schema_bytes before the compiler sees it, naming the field."""
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(200)}}
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    strict = {"type": "function", "function": {"name": "g", "parameters": schema,
                                               "strict": True}}
    loose = {"type": "function", "function": {"name": "h", "description": "d" * 3000}}
    big, forced, beside, one_call = serve(PROFILE | {"limits": {"max_schema_bytes": 2000}}, *[
        ("POST", "/v1/chat/completions", {"json": BODY | extra}) for extra in (
            {"response_format": {"type": "json_schema",
                                 "json_schema": {"name": "x", "schema": schema}}},
            {"tools": [tool], "tool_choice": "required"},
            # a strict tool is compiled beside a JSON format, tool_choice auto
            {"response_format": {"type": "json_object"}, "tools": [loose, strict]},
            # one call at a time: no tool's parameters are compiled, descriptions never are
            {"tools": [loose], "parallel_tool_calls": False})])
    assert big.json()["error"]["param"] == "response_format.json_schema"
    assert "limits.max_schema_bytes" in big.json()["error"]["message"]
    assert forced.json()["error"]["param"] == "tools.0.function.parameters"
    assert beside.json()["error"]["param"] == "tools.1.function.parameters"
    # (refused by the simulated engine, which has no logits: not for its size)
    assert one_call.json()["error"]["param"] == "parallel_tool_calls"


@pytest.mark.parametrize("trace", [
    "Z" * 32, "0" * 32, "0x" + "a" * 30, "a" * 15 + "_" + "a" * 16, " " + "a" * 31,
    "+" + "a" * 31, "0X" + "0" * 30])
def test_an_invalid_incoming_trace_id_is_never_echoed(trace):
    traceparent = f"00-{trace}-00f067aa0ba902b7-01"
    (response,) = serve(PROFILE, ("POST", "/v1/chat/completions", {
        "json": BODY, "headers": {"traceparent": traceparent}}))
    echoed = response.headers["x-trace-id"]
    assert response.status_code == 200 and echoed not in traceparent
    assert re.fullmatch("[0-9a-f]{32}", echoed) and echoed != "0" * 32


def test_a_refusal_outside_the_request_service_carries_its_trace_id(tmp_path):
    """The key check and unknown routes answer before the request service: their bodies name
    the trace id their header does (the client's, when it sent a valid one)."""
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys: []\n")
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    profile = PROFILE | {"auth": {"enabled": True, "keys_file": str(keys)}}
    with LogLines() as logged:
        unauthorised, missing = serve(profile, ("POST", "/v1/chat/completions", {
            "json": BODY, "headers": {"authorization": "Bearer sk-nope",
                                      "traceparent": f"00-{trace}-00f067aa0ba902b7-01"}}),
            ("GET", "/v1/nothing", {}))
    assert unauthorised.status_code == 401 and missing.status_code == 404
    assert unauthorised.json()["error"]["trace_id"] == unauthorised.headers["x-trace-id"] == trace
    assert missing.json()["error"]["trace_id"] == missing.headers["x-trace-id"]
    # and logged as the request service logs its refusals (401s were in no log)
    refused = [(r.status, r.trace_id, r.path) for r in logged.named("request refused")]
    assert refused == [(401, trace, "/v1/chat/completions"),
                       (404, missing.headers["x-trace-id"], "/v1/nothing")]


@pytest.mark.parametrize("text", ["9" * 100_000, "\U00020000" * 60_000],
                         ids=["digits", "four-byte-characters"])
def test_a_prompt_past_the_context_by_its_tokens_is_counted_never_encoded(text, monkeypatch):
    """Digits are about a token a byte: 100 KB passes the size floor (bytes over the longest
    token) at a 4096-token context, then is counted up to the context and refused: the
    conversation is never encoded whole. Encoding costs with bytes, not characters: 60,000
    four-byte characters (fewer than the inline threshold, 240 KB) are counted too."""
    encoded = []

    def spy(ingress):
        tokenizer = ingress.service.tokenizer
        real = tokenizer.encode_chat
        # (the process's one tokenizer: put back after the test)
        monkeypatch.setattr(tokenizer, "encode_chat",
                            lambda *a, **k: encoded.append(1) or real(*a, **k))

    (response,) = serve(PROFILE, ("POST", "/v1/chat/completions", {"json": BODY | {
        "messages": [{"role": "user", "content": text}]}}), prepare=spy)
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "context_length_exceeded"
    assert error["param"] == "messages" and encoded == []


def test_a_request_with_tools_is_encoded_off_the_event_loop(monkeypatch):
    """Tools are checked against JSON Schema's metaschema as the prompt is encoded, at many
    times a text byte's cost (48 KB of `anyOf` blocked the loop for 240 ms; 8 KB of them is
    encoded off the loop); a short text request and one small tool are encoded inline."""
    import threading

    threads = []

    def spy(ingress):
        tokenizer = ingress.service.tokenizer
        real = tokenizer.encode_chat
        monkeypatch.setattr(tokenizer, "encode_chat", lambda *a, **k: threads.append(
            threading.current_thread()) or real(*a, **k))

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    costly = {"type": "function", "function": {"name": "g", "parameters": {
        "anyOf": [{}] * 2700}}}  # 8 KB
    chat = "/v1/chat/completions"
    answers = serve(PROFILE, ("POST", chat, {"json": BODY | {"tools": [costly]}}),
                    ("POST", chat, {"json": BODY | {"tools": [tool]}}),
                    ("POST", chat, {"json": BODY}), prepare=spy)
    assert [r.status_code for r in answers] == [200] * 3, answers[0].text
    assert threads[0] is not threading.main_thread()
    assert threads[1:] == [threading.main_thread()] * 2


def test_a_lone_surrogate_quoted_back_in_an_error_is_still_a_400():
    """`"\\ud800"` is valid JSON and not valid UTF-8: the message quoting the tool_call_id back
    must reach the client escaped (the response could not be encoded: a 500 for a 400)."""
    import json

    body = BODY | {"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "tool_calls": [{"id": "abcdefghi", "type": "function", "function": {
            "name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "\ud800zz", "content": "42"}]}
    reply, = serve(PROFILE, ("POST", "/v1/chat/completions", {
        "content": json.dumps(body), "headers": {"content-type": "application/json"}}))
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "messages.2.tool_call_id" and "\\ud800" in error["message"]


def test_a_schema_is_charged_to_the_key_as_the_tokens_its_bytes_are_at_least():
    """A compile costs with the schema, which is not in the prompt: a large schema with
    `max_tokens: 1` cost seconds of compile for a few tokens of quota. Its bytes are charged as
    the prompt tokens they are at least, and kept whatever the answer (a schema the compiler
    refuses was compiled all the same). The reference engine: it samples under the grammar."""
    import json

    schema = {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 4}
                                               for i in range(150)}}
    bad = schema | {"properties": schema["properties"] | {"bad": {"type": "nonsense"}}}
    bodies = {"plain": BODY | {"max_tokens": 1}} | {
        name: BODY | {"max_tokens": 1, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": s}}}
        for name, s in (("answered", schema), ("refused", bad))}
    ingress = build_inprocess(parse_settings({
        "auth": {"enabled": False, "default_quota": {"tokens_per_min": 10**6}},
        "model": {"context_length": 4096}}))
    ingress.service.quotas.clock = lambda: 1000.0  # no refill
    app = ingress.build_asgi_app()

    async def go():
        spent = {}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://small4") as client:
            for name, body in bodies.items():
                reply = await client.post("/v1/chat/completions", json=body, timeout=60)
                assert reply.status_code == (400 if name == "refused" else 200), reply.text
                state, = ingress.service.quotas.keys.values()
                spent[name] = state.tokens.capacity - state.tokens.level - sum(spent.values())
        return spent

    spent = asyncio.run(go())
    floor = len(json.dumps(schema)) // ingress.service.token_bytes
    assert floor > 50  # the premise: a schema of some size
    assert spent["answered"] >= spent["plain"] + floor
    assert spent["refused"] >= floor

    # a failure of the stack's own gives back the prompt and an answer never sent, not the
    # compile: it ran
    from services.errors import EngineUnavailable

    failing = build_inprocess(parse_settings({
        "auth": {"enabled": False, "default_quota": {"tokens_per_min": 10**6}},
        "model": {"context_length": 4096}, "limits": {"max_resumes": 0}}))
    failing.service.quotas.clock = lambda: 1000.0

    async def lost(*args, **kwargs):  # the decode replica is gone
        raise EngineUnavailable("decode replica lost")
        yield
    failing.service.pools["fast"].decode_handed = lost

    async def fail():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(
                app=failing.build_asgi_app()), base_url="http://small4") as client:
            reply = await client.post("/v1/chat/completions", timeout=60,
                                      json=bodies["answered"] | {"max_tokens": 8})
        state, = failing.service.quotas.keys.values()
        return reply, state.tokens.capacity - state.tokens.level

    reply, kept = asyncio.run(fail())
    assert reply.status_code >= 500, reply.text
    assert kept >= floor


def test_lone_surrogates_in_tools_and_schemas_are_answered_or_refused_never_a_500():
    """A tool offered for the prompt is measured, a surrogate counted as the bytes it is
    quoted as (its measure could not be serialised: a 500); a schema the grammar compiler
    must take (a strict tool, `response_format`) is the client's 400 naming it."""
    import json

    def tool(**function):
        return {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"\ud800": {"type": "string"}}}} | function}

    cases = [(BODY | {"tools": [tool(description="\udc00")]}, 200, None),
             (BODY | {"tools": [tool(strict=True)]}, 400, "tools"),
             (BODY | {"response_format": {"type": "json_schema", "json_schema": {
                 "name": "x", "schema": {"enum": ["\ud800"]}}}}, 400,
              "response_format.json_schema")]
    replies = serve(PROFILE, *[("POST", "/v1/chat/completions", {
        "content": json.dumps(body), "headers": {"content-type": "application/json"}})
        for body, _, _ in cases])
    for reply, (_, status, param) in zip(replies, cases):
        assert reply.status_code == status, reply.text
        if param is not None:
            assert reply.json()["error"]["param"] == param


def test_ready_asks_every_pool_at_once():
    """The fast pool's answer waits for the deep pool to be asked: asked one after another,
    the fast pool's probe ran out its 5 s first and /ready said 503."""
    def prepare(ingress):
        asked = asyncio.Event()
        fast, deep = ingress.service.pools["fast"], ingress.service.pools["deep"]
        fast_ready, deep_ready = fast.readiness, deep.readiness

        async def fast_waits():
            await asyncio.wait_for(asked.wait(), 10)
            return await fast_ready()

        async def deep_says():
            asked.set()
            return await deep_ready()

        fast.readiness, deep.readiness = fast_waits, deep_says

    reply, = serve(PROFILE, ("GET", "/ready", {}), prepare=prepare)
    assert reply.status_code == 200, reply.text
    assert reply.json()["pools"] == {"fast": {"decode": True, "prefill": True},
                                     "deep": {"decode": True, "prefill": True}}



def test_a_pool_saturated_with_streams_is_ready_while_it_hands_out_tokens(monkeypatch):
    """/ready asks each pool through Serve's queue, behind its streams: a saturated pool
    answered after the probe's limit and read as down (503) while tokens were flowing. Tokens
    from both its roles just now say it serves; with none, the timeout is a 503 as before."""
    import services.ingress

    monkeypatch.setattr(services.ingress, "READY_CALL_S", 0.2)
    ingress = build_inprocess(parse_settings(PROFILE))
    for decoder in ingress.service.pools.values():
        async def queued(*args, **kwargs):  # behind the streams
            await asyncio.sleep(5)
        decoder.readiness = queued
    app = ingress.build_asgi_app()

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://small4") as client:
            idle = await client.get("/ready")
            for effort in ("none", "high"):  # tokens from both pools, both roles
                answered = await client.post("/v1/chat/completions", json=BODY | {
                    "reasoning_effort": effort})
                assert answered.status_code == 200, answered.text
            busy = await client.get("/ready")
            return idle, busy

    idle, busy = asyncio.run(go())
    assert idle.status_code == 503 and "error" in idle.json()["pools"]["fast"]
    assert busy.status_code == 200, busy.text
    assert busy.json()["pools"]["fast"] == {"prefill": True, "decode": True, "busy": True}


def test_the_prefill_lets_its_kv_go_once_decode_has_it_not_at_its_first_decoded_chunk(
        monkeypatch):
    """The ingress closed the prefill call (whose replica holds the KV it sent) only on the
    decode's first decoded chunk, which waits for a batch slot: on a saturated decode replica
    every waiting request kept a second copy of its KV, and a prefill call slot, on the
    prefill side. Decode now says when the KV is in (`kv_received`)."""
    import time

    from services.workers.prefill_client import Prefilled

    ingress = build_inprocess(parse_settings(PROFILE))
    seen: list[tuple[str, float]] = []
    close = Prefilled.close

    async def closed(self):
        if self.legs is not None:
            seen.append(("prefill closed", time.perf_counter()))
        await close(self)

    monkeypatch.setattr(Prefilled, "close", closed)
    for decoder in ingress.service.pools.values():
        engine, decode = decoder.engine, decoder.engine.decode

        def slow(request, first_token, kv, _decode=decode):
            async def tokens():
                await asyncio.sleep(0.3)  # waiting for a batch slot
                seen.append(("decoded", time.perf_counter()))
                async for chunk in _decode(request, first_token, kv):
                    yield chunk
            return tokens()

        monkeypatch.setattr(engine, "decode", slow)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(
                app=ingress.build_asgi_app()), base_url="http://small4") as client:
            return await client.post("/v1/chat/completions", json=BODY, timeout=30)

    reply = asyncio.run(go())
    assert reply.status_code == 200, reply.text
    assert [what for what, _ in seen] == ["prefill closed", "decoded"]
