"""Read a JSON body within limits: size while streaming it in, string sizes and nesting depth
before `json.loads` sees it, so a hostile body costs at most `max_body_bytes` of memory and one
regular-expression pass."""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.requests import Request

from services.errors import InvalidRequest, PayloadTooLarge
from services.settings import LimitSettings

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


async def read_json(request: Request, limits: LimitSettings) -> Any:
    """The parsed body, or a 413/400 naming the limit it broke."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise PayloadTooLarge(f"the body has {declared} bytes; at most "
                              f"{limits.max_body_bytes} are accepted")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise PayloadTooLarge(f"the body is larger than {limits.max_body_bytes} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    check_shape(raw, limits)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequest("the request body is not valid JSON") from None


def check_shape(raw: bytes, limits: LimitSettings) -> None:
    """Refuse a string over `max_string_bytes` or nesting deeper than `max_json_depth`."""
    for match in _STRING.finditer(raw):
        if match.end() - match.start() - 2 > limits.max_string_bytes:
            raise PayloadTooLarge(f"a JSON string in the body is longer than "
                                  f"{limits.max_string_bytes} bytes")
    depth = 0
    for bracket in _BRACKETS.findall(_STRING.sub(b'""', raw)):
        depth += 1 if bracket in b"[{" else -1
        if depth > limits.max_json_depth:
            raise InvalidRequest(f"the body nests deeper than {limits.max_json_depth} levels")
