"""Read a JSON body within limits, checking it while it streams in.

Each chunk is scanned once as it arrives (string sizes, nesting depth, the number of values:
what parsing, validating and encoding the body will cost), so a hostile body costs
at most `max_body_bytes` of memory and time linear in its size, spread over the upload instead
of one blocking pass, and bounded by a CPU budget. The upload itself must keep moving: a chunk
must arrive within `body_idle_timeout_s` and the whole body within `body_timeout_s` (408).

Only UTF-8 JSON is accepted (RFC 8259 §8.1): a body declared or detected as UTF-16/32 is
refused with 415 before it is scanned, so no other encoding can slip past the byte-level
checks; `json.loads` is given the decoded text, never bytes (it would guess the encoding).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import sys
import time
from typing import Any, AsyncIterator

from starlette.requests import Request

from services.errors import (InvalidRequest, PayloadTooLarge, RequestTimeout,
                             UnsupportedMediaType)
from services.settings import LimitSettings

# One token per match: a string (closed, or running to the end of the chunk, possibly ending on
# a lone backslash that escapes the next chunk's first byte) or a run of opening or closing
# brackets. Possessive quantifiers never backtrack and a string that does not close in this
# chunk ends the scan of the chunk, so every byte is looked at once. Group 1 is how a string
# token ends: `"` closed, `\\` on a pending escape, empty at the chunk's end.
_TOKEN = re.compile(rb'"(?:[^"\\]++|\\.)*+("|\\?\Z)|[\[{]++|[\]}]++', re.DOTALL)
# The rest of a string that began in an earlier chunk.
_STRING_REST = re.compile(rb'(?:[^"\\]++|\\.)*+("|\\?\Z)', re.DOTALL)
_QUOTE, _OPEN = 0x22, frozenset(b"[{")


class ShapeCheck:
    """The streaming string-size, depth and value-count check of one body: `feed` each chunk
    in order, then `finish`. Raises 413 for a string over the limit, 400 for nesting too deep,
    too many values (a million empty content parts, or of numbers in an ignored field, take
    seconds of the event loop to parse and validate) or a body that costs more than the CPU
    budget to check."""

    def __init__(self, limits: LimitSettings):
        self.max_string = limits.max_string_bytes
        self.max_depth = limits.max_json_depth
        self.max_values = limits.max_json_values
        self.values = 0           # arrays, objects, strings and the commas between members
        self.budget_s = limits.body_check_budget_s
        self.spent_s = 0.0
        self.depth = 0
        self.in_string = False
        self.escaped = False      # the previous chunk ended on a backslash inside a string
        self.string_bytes = 0     # raw bytes of the open string so far (quotes excluded)

    def feed(self, chunk: bytes) -> None:
        started = time.perf_counter()
        pos = self._continue_string(chunk) if self.in_string else 0
        if not self.in_string:
            for match in _TOKEN.finditer(chunk, pos):
                # every member after an array's or object's first follows a comma: counted
                # between strings (a comma in a string is text), in C
                self.values += chunk.count(b",", pos, match.start())
                pos = match.end()
                first = chunk[match.start()]
                if first == _QUOTE:  # a value too (back-to-back strings have no commas)
                    self.values += 1
                    self.string_bytes = 0
                    self._string(match, match.start() + 1)
                elif first in _OPEN:
                    self.depth += match.end() - match.start()
                    self.values += match.end() - match.start()
                    if self.depth > self.max_depth:
                        raise InvalidRequest(f"the body nests deeper than {self.max_depth} "
                                             "levels")
                else:
                    self.depth -= match.end() - match.start()
            if not self.in_string:
                self.values += chunk.count(b",", pos)
        if self.values > self.max_values:
            raise InvalidRequest(f"the body has more than {self.max_values} JSON values "
                                 "(limits.max_json_values)", code="body_too_complex")
        self.spent_s += time.perf_counter() - started
        if self.spent_s > self.budget_s:
            raise InvalidRequest(f"the body took more than {self.budget_s:g} s to check "
                                 "(too many strings or brackets)", code="body_too_complex")

    def _continue_string(self, chunk: bytes) -> int:
        pos = 0
        if self.escaped:  # the first byte is the escaped character
            self.escaped, pos, self.string_bytes = False, 1, self.string_bytes + 1
        match = _STRING_REST.match(chunk, pos)
        self._string(match, pos)
        return match.end()

    def _string(self, match: re.Match, content_start: int) -> None:
        """Account for a string token (whole, opening or continuing) whose content starts at
        `content_start` and whose ending is group 1."""
        ending = match.group(1)
        self.string_bytes += match.start(1) - content_start + (ending == b"\\")
        self.in_string = ending != b'"'
        self.escaped = ending == b"\\"
        if self.string_bytes > self.max_string:
            raise PayloadTooLarge(f"a JSON string in the body is longer than "
                                  f"{self.max_string} bytes")

    def finish(self) -> None:
        if self.in_string:
            raise InvalidRequest("the request body is not valid JSON (a string never ends)")


def check_encoding(request: Request, head: bytes) -> None:
    """415 for a body that is not UTF-8: declared otherwise, or UTF-16/32 by its first bytes."""
    content_type = request.headers.get("content-type", "")
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "charset" and \
                value.strip().strip('"').lower().replace("_", "-") not in ("utf-8", "utf8"):
            raise UnsupportedMediaType(f"request bodies must be UTF-8 JSON; got charset "
                                       f"{value.strip()[:40]!r}")
    if head[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(head) >= 2 and b"\x00" in head[:4]):
        raise UnsupportedMediaType("request bodies must be UTF-8 JSON; this one is UTF-16 "
                                   "or UTF-32")


async def read_json(request: Request, limits: LimitSettings) -> Any:
    """The parsed body, or a 413/415/400/408 naming the limit it broke."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise PayloadTooLarge(f"the body has {declared[:20]} bytes; at most "
                              f"{limits.max_body_bytes} are accepted")
    check, chunks, size = ShapeCheck(limits), [], 0
    async for chunk in _chunks(request, limits):
        if not chunk:
            continue
        if size == 0:
            check_encoding(request, chunk)
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise PayloadTooLarge(f"the body is larger than {limits.max_body_bytes} bytes")
        check.feed(chunk)
        chunks.append(chunk)
        await asyncio.sleep(0)  # let other requests (and /health) run between chunks
    check.finish()
    # one copy less at each step: the chunks go once joined and decoded (the joined bytes are
    # a temporary), the text is all `loads` reads
    text = _utf8(b"".join(chunks))
    chunks.clear()
    return _loads(text)


async def _chunks(request: Request, limits: LimitSettings) -> AsyncIterator[bytes]:
    """The body's chunks, each within the idle timeout and all within the total timeout."""
    stream = request.stream().__aiter__()
    deadline = time.monotonic() + limits.body_timeout_s
    while True:
        left = deadline - time.monotonic()
        wait = min(limits.body_idle_timeout_s, left)
        try:
            async with asyncio.timeout(max(wait, 0)):
                chunk = await stream.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            why = (f"no body bytes arrived for {limits.body_idle_timeout_s:g} s"
                   if wait < left else f"the body took longer than {limits.body_timeout_s:g} s")
            raise RequestTimeout(f"{why}; send the whole body promptly") from None
        yield chunk


def parse_json(raw: bytes) -> Any:
    """`json.loads` of UTF-8 text; integers too long to be any field's value stay unparsed."""
    return _loads(_utf8(raw))


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not valid UTF-8") from None


def _loads(text: str) -> Any:
    try:
        return json.loads(text, parse_int=_parse_int, parse_float=_finite,
                          parse_constant=_not_json)
    except (json.JSONDecodeError, RecursionError):
        raise InvalidRequest("the request body is not valid JSON") from None
    except _NotJson as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc.args[0]} is not a "
                             "JSON value") from None


class _NotJson(ValueError):
    pass


def _not_json(constant: str):
    """Python's `json` reads NaN and ±Infinity; JSON has no such values (a tool's schema with
    `"maximum": NaN` reached the prompt as written)."""
    raise _NotJson(constant)


def _finite(text: str) -> float:
    """A JSON number past a double's range (`1e999`) is no number Python can hold: read as
    infinity, it reached the prompt as `Infinity`."""
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson(text if len(text) <= 32 else f"{text[:32]}…")
    return value


def _parse_int(digits: str) -> int | float:
    """A JSON integer of more digits than any field accepts stays a number, as a finite float:
    the schema's strict int fields refuse it, its bounded floats find it out of range, and its
    text fields refuse it as they refuse any number (never read as a string)."""
    if len(digits) <= 40:
        return int(digits)
    if len(digits.lstrip("-")) > 308:  # beyond any float: the largest stands in
        return -sys.float_info.max if digits.startswith("-") else sys.float_info.max
    return float(digits)
