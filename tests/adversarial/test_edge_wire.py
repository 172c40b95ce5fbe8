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
