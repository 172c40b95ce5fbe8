"""What a large body costs in memory: read with one copy less at each step, and not kept once
the request's prompt is encoded (an answer lives for minutes; its body may be 100 MB)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import tracemalloc

import numpy as np
import pytest
from PIL import Image
from starlette.requests import Request

from services.guard.body import read_json
from services.settings import LimitSettings

MB = 1024 * 1024


def request_of(body: bytes, chunk: int = 64 * 1024) -> Request:
    parts = [body[i:i + chunk] for i in range(0, len(body), chunk)]

    async def receive():
        if parts:
            return {"type": "http.request", "body": parts.pop(0), "more_body": bool(parts)}
        return {"type": "http.request", "body": b"", "more_body": False}

    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions",
                    "headers": [(b"content-type", b"application/json")]}, receive)


def test_a_body_is_read_with_at_most_three_copies_alive():
    """The chunks, their join, the text and the parsed strings were all alive at once (four
    copies of a 100 MB body); the chunks go once joined, the bytes once decoded."""
    text = "x" * (12 * MB)
    body = json.dumps({"messages": [{"role": "user", "content": text}]}).encode()
    del text
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        parsed = asyncio.run(read_json(request_of(body), LimitSettings()))
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert len(parsed["messages"][0]["content"]) == 12 * MB
    assert peak < 3.5 * len(body), peak / len(body)


def png_url(size: int, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def ingress():
    from cluster.inprocess import build_inprocess
    from cluster.settings import parse_settings

    return build_inprocess(parse_settings({
        "auth": {"enabled": False}, "model": {"context_length": 8192},
        "engine": {"kind": "simulated", "simulated": {"output": "counter"}}}))


def test_an_answer_does_not_keep_its_requests_body(ingress):
    """Once the first token is out, the body's strings (here a 5 MB image's data URL) are no
    longer held: the answer keeps the prompt's ids and pixels, not the messages."""
    from services.api.service import Answer
    from services.guard.keys import Principal

    url = png_url(1100, 1)
    body = json.dumps({"model": "mistral-small-4", "max_tokens": 64, "stream": True,
                       "messages": [{"role": "user", "content": [
                           {"type": "text", "text": "What is this?"},
                           {"type": "image_url", "image_url": {"url": url}}]}]}).encode()
    del url

    async def ask():
        answer = await ingress.service.chat(
            Principal("k", "t"), {}, lambda: read_json(request_of(body), LimitSettings()))
        assert isinstance(answer, Answer), answer
        try:
            held = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(True, "*/json/decoder.py")])
            return sum(stat.size for stat in held.statistics("filename"))
        finally:
            await answer.close()

    tracemalloc.start(5)
    try:
        held = asyncio.run(ask())
    finally:
        tracemalloc.stop()
    assert held < 0.1 * len(body), held / len(body)
