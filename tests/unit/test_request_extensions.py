"""Fields outside OpenAI's chat-completions that other servers honour: `ignore_eos` (vLLM and
SGLang; load tools send it for fixed-length answers) is honoured, and the ones that would
change the answer but are not implemented here (OpenAI's audio and web search, vLLM's and
SGLang's sampling and decoding extensions) are refused with a 400 naming them unless set to
their neutral value, never dropped as unknown fields are. In process, simulated engine."""

from __future__ import annotations

import pytest

from tests.unit.test_http_surface import PROFILE as SURFACE
from tests.unit.test_http_surface import serve

# the HTTP-surface stack with an engine that ends its answers (echo) before max_tokens
PROFILE = SURFACE | {
    "profile": "request-extensions",
    "engine": {"kind": "simulated", "simulated": {"decode_step_ms": 1, "output": "echo"}},
}
BODY = {"model": "mistral-small-4", "max_tokens": 40, "temperature": 0,
        "messages": [{"role": "user", "content": "hello there"}]}
SCHEMA = {"type": "json_schema", "json_schema": {"name": "n", "schema": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}


def post(*bodies):
    return serve(PROFILE, *[("POST", "/v1/chat/completions", {"json": b}) for b in bodies])


def test_ignore_eos_generates_up_to_max_tokens():
    stops, ignores, streamed = post(BODY, BODY | {"ignore_eos": True},
                                    BODY | {"ignore_eos": True, "stream": True,
                                            "stream_options": {"include_usage": True}})
    assert stops.status_code == ignores.status_code == streamed.status_code == 200
    stopped, ignored = stops.json(), ignores.json()
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] < 40
    assert ignored["choices"][0]["finish_reason"] == "length"
    assert ignored["usage"]["completion_tokens"] == 40
    assert '"completion_tokens":40' in streamed.text.replace(" ", "")
    # what was generated past the end-of-sequence is shown, as it is billed
    content = ignored["choices"][0]["message"]["content"]
    assert content.startswith(stopped["choices"][0]["message"]["content"])
    assert len(content) > len(stopped["choices"][0]["message"]["content"]) + 10


@pytest.mark.parametrize("extra", [{"response_format": SCHEMA},
                                   {"tools": [{"type": "function", "function": {"name": "f"}}],
                                    "tool_choice": "required"}])
def test_ignore_eos_with_a_constrained_answer_is_refused(extra):
    [reply] = post(BODY | {"ignore_eos": True} | extra)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "ignore_eos"


@pytest.mark.parametrize("field, value", [
    ("top_k", 20), ("min_p", 0.1), ("repetition_penalty", 1.2), ("min_tokens", 8),
    ("best_of", 2), ("use_beam_search", True), ("guided_json", {"type": "object"}),
    ("guided_choice", ["a", "b"]), ("regex", "[0-9]+"), ("stop_token_ids", [2]),
    ("echo", True), ("skip_special_tokens", False), ("include_stop_str_in_output", True),
    ("chat_template", "{{ messages }}"), ("modalities", ["text", "audio"]),
    ("audio", {"voice": "alloy", "format": "wav"}), ("web_search_options", {}),
    ("verbosity", "low"), ("add_generation_prompt", False), ("ignore_eos", "yes"),
    ("separate_reasoning", False), ("random_seed", 7), ("safe_prompt", True),
    ("prompt_mode", "reasoning"), ("reasoning", {"effort": "high"}),
    ("include_reasoning", False), ("enable_thinking", True),
    ("thinking", {"type": "enabled", "budget_tokens": 1024}),
    ("moderation", {"model": "omni-moderation-latest", "policy": {"output": {"mode": "block"}}}),
    ("stop_regex", "\\d"), ("stream_reasoning", False), ("custom_params", {"a": 1}),
    ("mm_processor_kwargs", {"max_pixels": 1}), ("max_dynamic_patch", 4),
    ("return_tokens_as_token_ids", True),
    # llama.cpp's and Ollama's names (their clients send them anywhere), OpenRouter's top_a
    ("repeat_penalty", 1.1), ("typical_p", 0.9), ("mirostat", 2), ("n_predict", 16),
    ("grammar", 'root ::= "a"'), ("top_a", 0.5)])
def test_extensions_that_change_the_answer_are_refused_naming_themselves(field, value):
    [reply] = post(BODY | {field: value})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == field and field in error["message"]
    assert error["type"] == "invalid_request_error"
    assert ("reasoning_effort" in error["message"]) is (field in (
        "reasoning", "include_reasoning", "enable_thinking", "thinking"))


@pytest.mark.parametrize("field, value", [
    ("top_k", -1), ("min_p", 0.0), ("repetition_penalty", 1.0), ("min_tokens", 0),
    ("best_of", 1), ("modalities", ["text"]), ("skip_special_tokens", True),
    ("echo", False), ("verbosity", None), ("verbosity", "medium"), ("stop_token_ids", []),
    ("ignore_eos", False), ("stream_reasoning", True),
    ("safe_prompt", False), ("separate_reasoning", True), ("include_reasoning", True),
    ("return_tokens_as_token_ids", False), ("repeat_penalty", 1.0), ("mirostat", 0),
    # llama-server's defaults: settings of samplers that are off, no length limit
    ("mirostat_tau", 5.0), ("repeat_last_n", 64), ("penalize_nl", False), ("n_predict", -1),
    ("some_field_nobody_knows", 3)])
def test_neutral_values_and_unknown_fields_are_answered(field, value):
    [reply] = post(BODY | {field: value})
    assert reply.status_code == 200, reply.text


def test_usage_on_every_chunk_is_honoured():
    """vLLM's `stream_options.continuous_usage_stats` (guidellm sends it) was accepted and
    dropped: every chunk now carries the usage so far, and the last chunk the whole."""
    import json

    [reply] = post(BODY | {"stream": True, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}})
    assert reply.status_code == 200, reply.text
    events = [json.loads(line[6:]) for line in reply.text.splitlines()
              if line.startswith("data: {")]
    done = [e["usage"]["completion_tokens"] for e in events]
    assert all(e["usage"]["prompt_tokens"] > 0 for e in events)
    assert done == sorted(done) and done[0] == 0 and done[-1] > 0  # so far, then the whole
    assert events[-1]["choices"] == [] and done[-1] == done[-2]
    [bad] = post(BODY | {"stream": True, "stream_options": {"continuous_usage_stats": "yes"}})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "stream_options.continuous_usage_stats"


def test_a_boolean_is_not_a_neutral_number():
    """`true` is not `1` in JSON, whatever Python says: best_of true is refused."""
    [reply] = post(BODY | {"best_of": True})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "best_of"


def test_a_stop_string_decoded_text_cannot_match_as_sent_is_refused():
    """A character cut between two tokens decodes as U+FFFD until its last byte comes: a stop
    on U+FFFD ended an answer at its first split emoji (its content cut there, finish_reason
    stop). A lone surrogate never appears in decoded text: such a stop was silently never
    matched. Both are refused; an ordinary non-ASCII stop is answered."""
    import json

    replacement, surrogate, emoji = serve(PROFILE, *[
        ("POST", "/v1/chat/completions", {"content": json.dumps(body),  # (escaped, as sent)
                                          "headers": {"content-type": "application/json"}})
        for body in (BODY | {"stop": ["\ufffd"]}, BODY | {"stop": ["ab", "\ud83d"]},
                     BODY | {"stop": "\U0001f600"})])
    for reply in (replacement, surrogate):
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["param"] == "stop"
    assert emoji.status_code == 200, emoji.text
