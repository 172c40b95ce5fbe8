"""Hostile bodies and heads against the edge: each is answered promptly with a 4xx while
/health keeps answering (its latency during each attack is printed)."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from edge_kit import (assert_health_answered, auth, chat_body, health_watch, raw_connection,
                      read_response)

pytestmark = pytest.mark.ray


def post(url: str, content: bytes, headers: dict | None = None, timeout: float = 30):
    return httpx.post(f"{url}/v1/chat/completions", content=content, timeout=timeout,
                      headers={"content-type": "application/json", **auth("beta"),
                               **(headers or {})})


def test_escape_heavy_body_is_checked_in_linear_time(edge):
    # 160 KB of `\"` after an opening quote: the old scan restarted at every quote (quadratic,
    # 100 s of one core); the streaming scan reads it once
    body = b'{"model": "mistral-small-4", "messages": [{"role": "user", "content": "' + \
        b'\\"' * 80_000
    with health_watch(edge, "an escape-heavy 160 KB body") as latencies:
        started = time.perf_counter()
        response = post(edge, body, timeout=20)
        took = time.perf_counter() - started
    print(f"escape-heavy body answered {response.status_code} in {took * 1000:.0f} ms")
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert_health_answered(latencies)


def test_utf16_body_cannot_pass_depth_and_string_limits(edge):
    deep = "[" * 100_000 + "]" * 100_000
    with health_watch(edge, "UTF-16 and deep bodies") as latencies:
        for text in (deep, json.dumps(chat_body(user="x" * (1024 * 1024 + 10)))):
            response = post(edge, text.encode("utf-16"))
            assert response.status_code == 415, response.text[:300]
            assert response.json()["error"]["code"] == "unsupported_media_type"
            response = post(edge, text.encode("utf-16-le"))
            assert response.status_code == 415, response.text[:300]
        response = post(edge, json.dumps(chat_body()).encode(),
                        headers={"content-type": "application/json; charset=utf-16"})
        assert response.status_code == 415
        assert post(edge, deep.encode()).status_code == 400  # UTF-8: the depth limit
        big = post(edge, json.dumps(chat_body(user="x" * (1024 * 1024 + 10))).encode())
        assert big.status_code == 413  # a string over max_string_bytes
    assert_health_answered(latencies)


def test_huge_seed_is_a_400_naming_seed(edge):
    body = json.dumps(chat_body()).replace('"max_tokens": 4', '"seed": ' + "9" * 5000)
    response = post(edge, body.encode())
    assert response.status_code == 400, response.text[:300]
    assert response.json()["error"]["param"] == "seed"


def test_header_of_megabytes_is_refused_before_it_is_read(edge):
    with health_watch(edge, "a 4 MB header") as latencies:
        sock = raw_connection(edge)
        path = edge.split("//", 1)[1].split("/", 1)[1]
        head = f"GET /{path}/health HTTP/1.1\r\nhost: x\r\nx-junk: ".encode()
        sock.sendall(head)
        sent, status = 0, 0
        try:
            while sent < 4 * 1024 * 1024:
                sock.sendall(b"a" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while the header was still coming
        if not status:
            try:
                sock.sendall(b"\r\n\r\n")
            except OSError:
                pass
            status, raw = read_response(sock, 20)
        sock.close()
    print(f"4 MB header: answered {status} after {sent} header bytes were sent")
    assert status == 431, raw[:300]
    assert b'"headers_too_large"' in raw
    assert_health_answered(latencies)


def test_body_shorter_than_its_content_length_is_answered_promptly(edge):
    body = json.dumps(chat_body()).encode()
    sock = raw_connection(edge)
    path = edge.split("//", 1)[1].split("/", 1)[1]
    sock.sendall(f"POST /{path}/v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                 f"authorization: {auth('beta')['authorization']}\r\n"
                 f"content-type: application/json\r\ncontent-length: {len(body) + 100}\r\n"
                 f"\r\n".encode() + body)
    started = time.perf_counter()
    status, raw = read_response(sock, 20)
    sock.close()
    print(f"short body answered {status} in {(time.perf_counter() - started) * 1000:.0f} ms")
    assert status == 408, raw[:300]
    assert b'"request_timeout"' in raw


def test_slow_uploads_of_one_key_do_not_lock_out_other_keys(edge):
    """More slow uploads of one key than the ingress takes requests at once: past the key's
    upload slots they get 429, and another key is served meanwhile."""
    path = edge.split("//", 1)[1].split("/", 1)[1]
    socks = []
    with health_watch(edge, "12 slow uploads") as latencies:
        for _ in range(12):
            sock = raw_connection(edge)
            sock.sendall(f"POST /{path}/v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                         f"authorization: {auth('slow')['authorization']}\r\n"
                         "content-type: application/json\r\ncontent-length: 100000\r\n\r\n{"
                         .encode())
            socks.append(sock)
        time.sleep(0.5)
        try:
            for _ in range(3):  # keep them trickling under the idle timeout
                for sock in socks:
                    try:
                        sock.sendall(b" ")
                    except OSError:
                        pass
                time.sleep(0.3)
            started = time.perf_counter()
            other = httpx.post(f"{edge}/v1/chat/completions", json=chat_body(),
                               headers=auth("beta"), timeout=8)
            print(f"another key served {other.status_code} in "
                  f"{(time.perf_counter() - started) * 1000:.0f} ms during the slow uploads")
            assert other.status_code == 200, other.text[:300]
        finally:
            statuses = []
            for sock in socks:
                statuses.append(read_response(sock, 10)[0])
                sock.close()
    print("slow uploads answered:", sorted(statuses))
    assert statuses.count(429) >= 12 - 3 - 1 and set(statuses) <= {408, 429}
    assert_health_answered(latencies)
