"""Lax edges of the wire format and of per-key state: strict types, bounded echo of the
caller's input, quotas keyed by the key (not its name), prompt size checked before tokenising."""

from __future__ import annotations

import time

import httpx
import pytest
from edge_kit import assert_health_answered, auth, chat_body, health_watch

pytestmark = pytest.mark.ray


def chat(url: str, body: dict, key: str = "beta", timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth(key),
                      timeout=timeout)


@pytest.mark.parametrize("field, value", [("max_tokens", True), ("max_tokens", "16"),
                                          ("stream", "yes"), ("stream", 1),
                                          ("max_completion_tokens", 4.0)])
def test_wrong_types_are_refused_not_coerced(edge, field, value):
    response = chat(edge, chat_body(**{field: value}))
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error"


def test_errors_do_not_echo_megabytes_of_input(edge):
    for body in (chat_body(model="m" * 1_000_000),
                 chat_body(messages=[{"role": "x" * 1_000_000, "content": "hi"}])):
        response = chat(edge, body)
        assert 400 <= response.status_code < 500
        assert len(response.content) < 4096, len(response.content)
    response = httpx.post(f"{edge}/v1/chat/completions", json=chat_body(), timeout=30,
                          headers=auth("beta") | {"x-request-timeout": "9" * 60_000})
    assert response.status_code == 400 and len(response.content) < 4096


def test_two_keys_with_one_name_have_their_own_quotas(edge):
    """`alpha` and its twin share a name; each may send one request per 5 s."""
    first = chat(edge, chat_body(), key="alpha")
    twin = chat(edge, chat_body(), key="alpha-twin")
    assert first.status_code == 200, first.text[:300]
    assert twin.status_code == 200, twin.text[:300]
    again = chat(edge, chat_body(), key="alpha")
    assert again.status_code == 429


def test_oversized_prompt_is_refused_before_it_is_tokenised(edge):
    prompt = "word " * 180_000  # 900 KB of text: far past the 4096-token context
    with health_watch(edge, "a 900 KB prompt") as latencies:
        started = time.perf_counter()
        response = chat(edge, chat_body(messages=[{"role": "user", "content": prompt}]))
        took = time.perf_counter() - started
    print(f"900 KB prompt refused in {took * 1000:.0f} ms")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "bytes of text" in error["message"]  # refused on its size, not after tokenising
    assert_health_answered(latencies)


def test_digits_in_a_calls_arguments_count_before_tokenising(edge):
    """A call's arguments reach the prompt as its content does: sized before tokenising."""
    call = {"id": "abcdefghi", "type": "function",
            "function": {"name": "f", "arguments": "7" * 900_000}}
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "abcdefghi", "content": "done"}]
    response = chat(edge, chat_body(messages=messages))
    assert response.status_code == 400, response.text[:300]
    assert "bytes of text" in response.json()["error"]["message"]


def test_a_prompt_past_the_context_by_its_tokens_is_counted_not_encoded(edge):
    """Digits are a token a byte: 300 KB passes the size floor (bytes over the longest token)
    at a 4096-token context, yet is 75 contexts long. It is counted up to the context off the
    event loop and refused; health is answered meanwhile."""
    with health_watch(edge, "a 300 KB prompt of digits") as latencies:
        response = chat(edge, chat_body(messages=[{"role": "user", "content": "9" * 300_000}]))
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert_health_answered(latencies)


def test_many_empty_content_parts_are_refused_while_the_body_streams_in(edge):
    parts = ",".join(['{"type":"text","text":""}'] * 140_000)
    raw = ('{"model":"mistral-small-4","max_tokens":4,"messages":[{"role":"user","content":['
           + parts + "]}]}").encode()
    with health_watch(edge, "140k content parts") as latencies:
        response = httpx.post(f"{edge}/v1/chat/completions", content=raw, timeout=60,
                              headers=auth("beta") | {"content-type": "application/json"})
    assert response.status_code == 400, response.text[:300]
    assert response.json()["error"]["code"] == "body_too_complex"
    assert_health_answered(latencies)
