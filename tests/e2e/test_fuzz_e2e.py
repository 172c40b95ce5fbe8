"""API fuzzing of the deployed stack on local Ray, from the OpenAPI spec it serves.

Schemathesis generates requests on both sides of the spec (valid and invalid bodies, headers,
missing or made-up keys, undeclared methods) and checks every answer against the spec: no 5xx,
declared status codes and content types, response bodies matching their schemas, invalid data
refused, invalid auth refused. Hypothesis then sends well-formed conversations (unicode, control
token names as text, stop strings, tools, streaming) that must all be answered in full, and
made-up keys that must all get the same 401. Afterwards no replica has restarted and no KV is held.
"""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error, positive_data_acceptance
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import GenerationMode

from tests.e2e.conftest import SIM_PROFILE, deployed
from tests.keyfiles import write_keys

pytestmark = pytest.mark.ray

KEY = "sk-fuzz"
KEYS = {KEY: {"name": "fuzz", "tenant": "fuzzers"},
        "sk-revoked-fuzz": {"name": "gone", "tenant": "gone", "revoked": True}}
MAX_TOKENS_CAP = 48
DEPLOYMENTS = ("fast-prefill", "fast-decode", "deep-prefill", "deep-decode")
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
FEWER = settings(FUZZ, max_examples=100)


def fuzz_profile(keys_file) -> dict:
    return SIM_PROFILE | {
        "profile": "fuzz-e2e",
        "auth": {"enabled": True, "keys_file": str(keys_file)},
        "engine": {"kind": "simulated", "simulated": {"output": "echo"}},
        "pools": {name: {"effort": effort, "max_queue": 64,
                         "prefill": {"num_cpus": 0.05}, "decode": {"num_cpus": 0.05}}
                  for name, effort in (("fast", "none"), ("deep", "high"))},
        "ingress": {"num_cpus": 0.05},
        # an image's data: URL within a string the limits allow (settings refuse it otherwise)
        "multimodal": {"num_cpus": 0.05, "images": {"max_bytes": 32_000}},
        "limits": {"max_tokens_cap": MAX_TOKENS_CAP, "max_messages": 32,
                   "max_body_bytes": 256_000, "max_string_bytes": 64_000, "max_json_depth": 16},
    }


@pytest.fixture(scope="module")
def fuzz(stack, ask, tmp_path_factory):
    """The fuzzed app at /fuzz; on teardown, no replica restarted and nothing is held."""
    keys_file = tmp_path_factory.mktemp("fuzzkeys") / "keys.yaml"
    write_keys(keys_file, KEYS)
    with deployed(fuzz_profile(keys_file), "fuzz", stack["ref"]) as url:
        replicas = {d: ask("fuzz", d, "replica_name") for d in DEPLOYMENTS}
        yield url
        assert {d: ask("fuzz", d, "replica_name") for d in DEPLOYMENTS} == replicas, \
            "a replica died"
        for deployment in DEPLOYMENTS:
            stats = ask("fuzz", deployment, "stats")
            assert stats.kv_tokens == 0 and stats.running == 0, (deployment, stats)


@pytest.fixture(scope="module")
def api_schema(fuzz):
    """The spec as the deployment serves it (keyed), with the key schemathesis sends."""
    config = SchemathesisConfig.from_dict({"auth": {"openapi": {"bearer": {"bearer": KEY}}}})
    return schemathesis.openapi.from_url(f"{fuzz}/openapi.json", config=config,
                                         headers={"authorization": f"Bearer {KEY}"})


CHAT = "POST /v1/chat/completions"


def test_fuzz_from_openapi_spec(fuzz, api_schema):
    """Valid and invalid requests for every operation: every answer conforms to the spec and
    none is a 5xx, except a 504 for a deadline the client itself set too short for any answer
    (`x-request-timeout` under a second)."""
    statuses: dict[tuple[str, int], int] = {}  # (operation, status) -> answers
    cases = st.one_of(api_schema.as_strategy(GenerationMode.POSITIVE),
                      api_schema.as_strategy(GenerationMode.NEGATIVE))

    @FUZZ
    @given(case=cases)
    def check(case):
        response = case.call(base_url=fuzz, timeout=60)
        seen = (case.operation.label, response.status_code)
        statuses[seen] = statuses.get(seen, 0) + 1
        # Conversation rules (role order, tool-call pairing) are checked after the schema (ours
        # and mistral-common's): a schema-valid conversation may get a 400 naming `messages`.
        case.validate_response(response,
                               excluded_checks=[positive_data_acceptance, not_a_server_error])
        if response.status_code >= 500:
            timeout = (case.headers or {}).get("x-request-timeout")
            assert (response.status_code == 504 and timeout is not None
                    and float(timeout) < 1.0), (response.status_code, response.text)

    check()
    reached_the_engines(statuses)


def reached_the_engines(statuses: dict[tuple[str, int], int]) -> None:
    """The generated traffic was not all refused at the door."""
    print(json.dumps({"fuzz_statuses": {f"{op} {code}": n
                                        for (op, code), n in sorted(statuses.items())}}))
    chat = {code: n for (op, code), n in statuses.items() if op == CHAT}
    # ~80 derandomized chat cases, most setting a field the simulated engine refuses
    # (logprobs, logit_bias, penalties, grammars need logits) or a conversation mistral-common
    # refuses (a `function` result with no call before it, turns out of order): a handful reach
    # the engines, answered (200) or cut by the sub-second deadline the case itself set (504,
    # only for x-request-timeout under a second: admitted past every check). How many of those
    # end either way follows the machine's speed.
    reached = chat.get(200, 0) + chat.get(504, 0)
    assert reached >= 5 and chat.get(200, 0) >= 2 and chat.get(400, 0) >= 20, chat
    # 415: a body that is not UTF-8 (a generated body of a UTF-16 byte-order mark was one)
    assert {code for _, code in statuses} <= {200, 400, 401, 404, 405, 413, 415, 504}, statuses


# Text that a naive prompt builder would turn into control tokens, mixed with any unicode.
CONTROL_NAMES = st.sampled_from(["[INST]", "[/INST]", "[THINK]", "[/THINK]", "[TOOL_CALLS]",
                                 "[SYSTEM_PROMPT]", "<s>", "</s>", "[IMG]", "\x00", "\ufeff"])
TEXT = st.lists(st.one_of(st.text(min_size=1, max_size=40), CONTROL_NAMES),
                min_size=1, max_size=4).map("".join)
TOOL = st.builds(lambda name: {"type": "function", "function": {
    "name": name, "description": "a tool", "parameters": {"type": "object", "properties": {
        "q": {"type": "string"}}}}}, st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True))


@st.composite
def conversations(draw) -> dict:
    """A well-formed request: optional system, alternating turns ending with the user."""
    turns = draw(st.integers(0, 3))
    messages = [{"role": "system", "content": draw(TEXT)}] if draw(st.booleans()) else []
    for _ in range(turns):
        messages += [{"role": "user", "content": draw(TEXT)},
                     {"role": "assistant", "content": draw(TEXT)}]
    messages.append({"role": "user", "content": draw(st.one_of(
        TEXT, st.lists(st.builds(lambda t: {"type": "text", "text": t}, TEXT), min_size=1,
                       max_size=3)))})
    body = {"model": "mistral-small-4", "messages": messages,
            "max_tokens": draw(st.integers(1, MAX_TOKENS_CAP)),
            "temperature": draw(st.floats(0, 2)), "top_p": draw(st.floats(0.01, 1)),
            "stream": draw(st.booleans()),
            "reasoning_effort": draw(st.sampled_from([None, "none", "low", "high"]))}
    if draw(st.booleans()):
        body["stop"] = draw(st.lists(TEXT, min_size=1, max_size=4))
    if draw(st.booleans()):
        body["seed"] = draw(st.integers(0, 2**31))
    if draw(st.booleans()):
        body["tools"] = draw(st.lists(TOOL, min_size=1, max_size=3,
                                      unique_by=lambda t: t["function"]["name"]))
    if body["stream"] and draw(st.booleans()):
        body["stream_options"] = {"include_usage": True}
    return body


@FEWER
@given(body=conversations())
def test_well_formed_conversations_are_answered_in_full(fuzz, body):
    reply = httpx.post(f"{fuzz}/v1/chat/completions", json=body, timeout=60,
                       headers={"authorization": f"Bearer {KEY}"})
    assert reply.status_code == 200, reply.text
    if not body["stream"]:
        answer = reply.json()
        choice = answer["choices"][0]
        assert choice["finish_reason"] in {"stop", "length", "tool_calls"}
        assert answer["usage"]["completion_tokens"] <= body["max_tokens"]
        return
    # splitlines() breaks at U+2028 and the like, as naive SSE clients do: events must not
    lines = [line for line in reply.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert not [e for e in events if "error" in e], events
    finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert len(finishes) == 1 and finishes[0] in {"stop", "length", "tool_calls"}, finishes
    if body.get("stream_options"):
        assert events[-1]["usage"]["completion_tokens"] <= body["max_tokens"]


@FEWER
@given(header=st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=80),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1,
            max_size=60).map("Bearer ".__add__),
    st.sampled_from(["Bearer sk-revoked-fuzz", f"Bearer {KEY}x", f"bearer {KEY[1:]}",
                     f"Basic {KEY}", f"Bearer  {KEY[:-1]}"])))
def test_made_up_keys_all_get_the_same_401(fuzz, header):
    reply = httpx.post(f"{fuzz}/v1/chat/completions", headers={"authorization": header},
                       json={"model": "mistral-small-4",
                             "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert reply.status_code == 401, (header, reply.text)
    error = reply.json()["error"]
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
    assert KEY not in reply.text and "fuzzers" not in reply.text and "gone" not in reply.text


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "TRACE"])
def test_undeclared_methods_get_405_with_allow(fuzz, method):
    reply = httpx.request(method, f"{fuzz}/v1/chat/completions", timeout=30,
                          headers={"authorization": f"Bearer {KEY}"})
    assert reply.status_code == 405 and reply.headers["allow"] == "POST", reply.text
    assert reply.json()["error"]["code"] == "method_not_allowed"
