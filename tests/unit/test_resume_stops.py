"""Where an engine stops for a stop string. A stream resumed on another decode leg still stops at
one that began before the break: the resumed leg gets the tokens already sent as stop context
(in-process workers, the simulated engine echoing the user's text, every second decode stream
broken after 2 tokens). Stop strings apply to content only: reasoning and tool calls that
contain one run on, as the ingress's output parser shows them."""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from cluster.inprocess import build_inprocess
from cluster.settings import parse_settings
from services.engines.protocol import SamplingParams
from services.engines.stops import OutputMarks, StopChecker

PROFILE = {
    "profile": "resume-stops",
    "auth": {"enabled": False},
    "model": {"context_length": 4096},
    "engine": {"kind": "simulated", "simulated": {"output": "echo"},
               "faults": {"decode_fail_every": 2, "decode_fail_after_tokens": 2}},
    "stream": {"interval_tokens": 1},  # every token reaches the ingress before the break
}
TEXT = "one two three four five six seven eight nine ten"


def chars(ids: list[int]) -> str:
    return "".join(map(chr, ids))


def test_stop_checker_matches_across_the_context_boundary():
    with_context = StopChecker(SamplingParams(max_tokens=9, stop=("xyz",),
                                              stop_context=tuple(map(ord, "..xy"))), (), chars)
    without = StopChecker(SamplingParams(max_tokens=9, stop=("xyz",)), (), chars)
    assert with_context.check([ord("z")]) == "stop"
    assert without.check([ord("z")]) is None
    assert with_context.generated == [ord("z")]  # the context counts toward nothing else


THINK, END_THINK, CALLS = 1, 2, 3
MARKS = OutputMarks(THINK, END_THINK, CALLS, is_control=lambda token: token < 10)


def ids(text: str) -> list[int]:
    return list(map(ord, text))


def test_a_stop_string_in_reasoning_or_a_tool_call_does_not_end_the_output():
    def run(tokens: list[int], **sampling) -> tuple[str | None, int]:
        checker = StopChecker(SamplingParams(max_tokens=99, stop=("END",), **sampling), (),
                              chars, MARKS)
        reason = next((r for k in range(len(tokens)) if (r := checker.check([tokens[k]]))),
                      None)
        return reason, len(checker.generated)

    answer = [THINK] + ids("maybe END") + [END_THINK] + ids("fine END") + ids("more")
    assert run(answer) == ("stop", len(answer) - 4)  # at the answer's own END
    call = ids("ok ") + [CALLS] + ids("f") + [5] + ids('{"q": "END"}')
    assert run(call) == (None, len(call))
    # the reasoning's D does not complete the content's EN
    assert run(ids("EN") + [THINK] + ids("D") + [END_THINK] + ids("x")) == (None, 6)
    # resumed inside the reasoning: the context says where the new leg starts
    resumed = dict(stop_context=tuple([THINK] + ids("so")))
    assert run(ids(" END") + [END_THINK] + ids("END"), **resumed) == ("stop", 8)
    without_marks = StopChecker(SamplingParams(max_tokens=99, stop=("END",)), (), chars)
    assert without_marks.check([THINK] + ids("END")) == "stop"


EOS = 4


def test_past_a_calls_end_of_sequence_ignore_eos_is_content_again_and_no_stop_spans_a_call():
    """As the output parser reads it: with `ignore_eos` the text after a call's end of
    sequence is content, where a stop string ends the output; none spans the call."""
    def reason(tokens: list[int]) -> str | None:
        checker = StopChecker(SamplingParams(max_tokens=99, stop=("END",), ignore_eos=True),
                              (EOS,), chars, MARKS)
        return checker.check(tokens)

    assert reason(ids("ok ") + [CALLS] + ids("f") + [5] + ids("{}") + [EOS] + ids("so END")
                  ) == "stop"
    assert reason(ids("ok EN") + [CALLS] + ids("f") + [5] + ids("{}") + [EOS] + ids("D")) is None


@pytest.fixture(scope="module")
def client():
    ingress = build_inprocess(parse_settings(PROFILE))
    with TestClient(ingress.build_asgi_app()) as test_client:
        yield test_client


def ask(client, **extra):
    body = {"model": "mistral-small-4", "max_tokens": 30, "temperature": 0,
            "messages": [{"role": "user", "content": TEXT}]} | extra
    reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_a_stop_string_spanning_the_resume_point_ends_the_stream(client):
    whole = ask(client)  # decode stream 1: not broken
    assert whole["choices"][0]["message"]["content"] == TEXT
    # stream 2 breaks after the prefill token and 2 decoded ones ("one two three"), and resumes
    # (without the stop context the engine would run on to max_tokens: finish "length")
    answer = ask(client, stop=["three four"], max_tokens=8)
    choice = answer["choices"][0]
    assert choice["message"]["content"] == "one two "
    assert choice["finish_reason"] == "stop"
    assert answer["usage"]["completion_tokens"] < 8


def test_a_stop_string_in_the_reasoning_leaves_it_whole_and_ends_the_answer(client):
    # effort high: the engine thinks the user's text, then answers it; every second stream
    # breaks after 2 tokens and resumes inside the reasoning
    for _ in range(2):
        answer = ask(client, stop=["three four"], max_tokens=60, reasoning_effort="high")
        message, choice = answer["choices"][0]["message"], answer["choices"][0]
        assert message["reasoning_content"] == TEXT
        assert message["content"] == "one two "
        assert choice["finish_reason"] == "stop"


@pytest.fixture(scope="module")
def dying():
    """Every decode stream dies before its finish (its tokens arrive, the finish never)."""
    faults = {"decode_fail_every": 1, "decode_fail_after_tokens": 1000}
    profile = PROFILE | {"profile": "dying-decode",
                         "engine": PROFILE["engine"] | {"faults": faults}}
    ingress = build_inprocess(parse_settings(profile))
    with TestClient(ingress.build_asgi_app()) as test_client:
        yield test_client


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_whose_last_leg_died_before_its_finish_is_not_resumed_past_its_end(dying,
                                                                                    stream):
    # max_tokens 1: the prefill's first token ends it (no decode replica is asked); 3: the
    # budget is spent when the leg dies; 30: the echo ends with its end of sequence first.
    # Resumed, the first two would ask for 0 tokens (a 400), the last would run on after EOS.
    for max_tokens, content, finish in ((1, "one", "length"), (3, "one two three", "length"),
                                        (30, TEXT, "stop")):
        body = {"model": "mistral-small-4", "max_tokens": max_tokens, "temperature": 0,
                "stream": stream, "messages": [{"role": "user", "content": TEXT}]}
        reply = dying.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        if stream:
            events = [json.loads(line[6:]) for line in reply.text.splitlines()
                      if line.startswith("data: {")]
            assert not [e for e in events if "error" in e], reply.text
            text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                           if e.get("choices"))
            reason = [e["choices"][0]["finish_reason"] for e in events
                      if e.get("choices") and e["choices"][0].get("finish_reason")]
            assert (text, reason) == (content, [finish]), max_tokens
        else:
            choice = reply.json()["choices"][0]
            assert choice["message"]["content"].strip() == content, max_tokens
            assert choice["finish_reason"] == finish, max_tokens


def test_a_stop_string_whose_characters_take_several_tokens_each_is_found(tokenizer):
    """Byte-fallback tokens: a character can take four tokens, so a window of as many tokens as
    the stop string has characters never holds all of it."""
    stop = "🦜🦜🦜"
    def encode(text):
        return tokenizer._raw.encode(text, bos=False, eos=False)

    ids = encode("hello " + stop + " and on")
    assert len(encode(stop)) > len(stop) + 4
    checker = StopChecker(SamplingParams(max_tokens=len(ids) + 1, stop=(stop,)),
                          (tokenizer.eos_id,), tokenizer.decode, OutputMarks.of(tokenizer))
    reasons = [checker.check([token]) for token in ids]
    assert "stop" in reasons
    assert tokenizer.decode(ids[:reasons.index("stop") + 1]).endswith(stop)


@pytest.mark.parametrize("stop", ["x" * 257, ["ok", "é" * 129]])
def test_a_stop_string_over_256_bytes_is_refused_by_name(client, stop):
    reply = client.post("/v1/chat/completions", json={
        "model": "mistral-small-4", "messages": [{"role": "user", "content": "hi"}],
        "stop": stop})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "stop" and "256 bytes" in reply.json()["error"][
        "message"]
