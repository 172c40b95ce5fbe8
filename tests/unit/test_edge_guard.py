"""The edge's guards without Ray: the streaming body check, encodings, upload slots, quotas by
key, bounded error echo, and the proxy callback's head limit and error shapes on a real uvicorn
server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.requests import ClientDisconnect

from bench.ports import free_port
from services.api.http_errors import error_response
from services.api.schemas import parse_chat_request
from services.errors import (InvalidRequest, PayloadTooLarge, RateLimited, RequestAborted,
                             StackError, Unauthorized, UnsupportedMediaType, from_exception)
from services.guard.body import ShapeCheck, check_encoding, parse_json
from services.guard.keys import KeyRing, Principal, digest
from services.guard.quotas import Quotas
from services.guard.uploads import Uploads
from services.settings import LimitSettings, QuotaSettings
from services.telemetry.metrics import EDGE_ANSWERS
from tests.keyfiles import write_keys

SMALL = LimitSettings(max_string_bytes=40, max_json_depth=4, max_json_values=12)
_REFERENCE_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='ab"\\\n\té[]{}', max_size=50),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(alphabet='k"\\[', max_size=5), inner, max_size=3), max_leaves=12)


def outcome(raw: bytes, chunk: int, limits: LimitSettings = SMALL) -> str:
    check = ShapeCheck(limits)
    try:
        for i in range(0, len(raw), chunk):
            check.feed(raw[i:i + chunk])
        check.finish()
    except StackError as exc:
        return type(exc).__name__
    return "ok"


def expected(value) -> str:
    raw = json.dumps(value).encode()

    def depth(v):
        if isinstance(v, (list, dict)):
            items = v.values() if isinstance(v, dict) else v
            return 1 + max((depth(x) for x in items), default=0)
        return 0

    def values(v):  # containers, strings (keys too), and the commas between members
        if isinstance(v, (list, dict)):
            items = list(v.values() if isinstance(v, dict) else v)
            keys = len(v) if isinstance(v, dict) else 0
            return 1 + keys + max(len(items) - 1, 0) + sum(values(x) for x in items)
        return int(isinstance(v, str))

    longest = max((m.end() - m.start() - 2 for m in _REFERENCE_STRING.finditer(raw)), default=0)
    over = {n for ok, n in ((longest <= 40, "PayloadTooLarge"),
                            (depth(value) <= 4, "InvalidRequest"),
                            (values(value) <= 12, "InvalidRequest")) if not ok}
    return over.pop() if len(over) == 1 else ("ok" if not over else "either")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values, st.integers(1, 40))
def test_streaming_check_agrees_with_whole_body_limits_at_any_chunking(value, chunk):
    raw = json.dumps(value).encode()
    want, got = expected(value), outcome(raw, chunk)
    assert got == want or (want == "either" and got != "ok")


def test_escape_heavy_strings_and_deep_nesting_are_refused():
    limits = LimitSettings()
    assert outcome(b'"' + b'\\"' * 80_000, 65536, limits) == "InvalidRequest"  # never closes
    assert outcome(b'["' + b'\\\\' * 80_000 + b'"]', 65536, limits) == "ok"
    assert outcome(b"[" * 100_000, 65536, limits) == "InvalidRequest"
    over = b'"' + b"x" * (limits.max_string_bytes + 1) + b'"'
    assert outcome(over, 65536, limits) == "PayloadTooLarge"


@pytest.mark.parametrize("body", [
    # a million empty content parts: seconds of pydantic and mistral-common on the loop
    b'{"messages": [{"role": "user", "content": [' + b",".join(
        [b'{"type": "text", "text": ""}'] * 1_000_000) + b"]}]}",
    b'{"x": [' + b"0," * 2_000_000 + b"0]}",  # numbers in an ignored field
    # strings back to back (no commas): seconds of the check's own loop, one per string
    b'{"messages": [' + b'""' * 2_000_000 + b"]}",
], ids=["empty-parts", "numbers", "strings"])
def test_a_body_of_too_many_values_is_refused_while_it_streams_in(body):
    check = ShapeCheck(LimitSettings())
    with pytest.raises(InvalidRequest) as info:
        for i in range(0, len(body), 65536):
            check.feed(body[i:i + 65536])
    assert info.value.code == "body_too_complex" and "max_json_values" in str(info.value)
    assert i < len(body) // 2, "refused once past the limit, not at the end"


def test_a_long_agent_session_with_many_tools_is_within_the_value_limit():
    tool = {"type": "function", "function": {"name": "t", "description": "d", "parameters": {
        "type": "object", "properties": {f"p{i}": {"type": "string", "description": "x, y"}
                                         for i in range(8)}, "required": ["p0"]}}}
    turn = [{"role": "assistant", "content": None, "tool_calls": [{
        "id": "abcdefghi", "type": "function", "function": {"name": "t", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "abcdefghi", "content": "a, b, c " * 500}]
    body = json.dumps({"model": "m", "tools": [tool] * 128, "messages": [
        {"role": "user", "content": "go"}] + turn * 250}).encode()
    assert outcome(body, 65536, LimitSettings()) == "ok"


def test_a_body_too_costly_to_check_is_refused_with_a_code():
    check = ShapeCheck(LimitSettings(body_check_budget_s=1e-9))
    with pytest.raises(InvalidRequest) as info:
        check.feed(b'{"a": "b"}' * 1000)
    assert info.value.code == "body_too_complex"


class _Headers:
    def __init__(self, content_type: str):
        self.headers = {"content-type": content_type}


@pytest.mark.parametrize("head, content_type", [
    ('{"a": 1}'.encode("utf-16"), "application/json"),
    ('{"a": 1}'.encode("utf-16-le"), "application/json"),
    ('{"a": 1}'.encode("utf-32-be"), "application/json"),
    (b'{"a": 1}', "application/json; charset=utf-16")])
def test_non_utf8_bodies_are_415(head, content_type):
    with pytest.raises(UnsupportedMediaType):
        check_encoding(_Headers(content_type), head)


def test_utf8_bodies_pass_the_encoding_check():
    check_encoding(_Headers("application/json; charset=UTF-8"), b'{"a": 1}')
    check_encoding(_Headers("application/json"), b"[1]")


def test_a_5000_digit_seed_is_refused_naming_seed():
    body = parse_json(b'{"model": "m", "messages": [{"role": "user", "content": "x"}], '
                      b'"seed": ' + b"9" * 5000 + b"}")
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(body)
    assert info.value.param == "seed"


@pytest.mark.parametrize("field, where, param", [
    ("stop", b'"stop": {}', "stop"),
    ("content", b'"messages": [{"role": "user", "content": {}}]', "messages.0.content"),
    ("temperature", b'"temperature": {}', "temperature"),
])
def test_a_huge_integer_is_a_number_never_a_string(field, where, param):
    """A 45-digit integer sent for a text field is refused as the number it is (a 12 is), not
    read as a string the client never sent."""
    for digits in (b"1" * 45, b"-" + b"7" * 400):
        text = where.replace(b"{}", digits)
        if field != "content":
            text += b', "messages": [{"role": "user", "content": "x"}]'
        with pytest.raises(InvalidRequest) as info:
            parse_chat_request(parse_json(b'{"model": "m", ' + text + b"}"))
        assert info.value.param == param, info.value.message


def test_invalid_utf8_and_runaway_recursion_are_400():
    with pytest.raises(InvalidRequest):
        parse_json(b'{"a": "\xff"}')
    with pytest.raises(InvalidRequest):
        parse_json(b"[" * 100_000 + b"]" * 100_000)


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1.5e400"])
def test_values_python_reads_and_json_has_not_are_400(constant):
    """A tool's schema with `"maximum": NaN` (or `1e999`, read as infinity) reached the prompt
    as `NaN` (`Infinity`)."""
    with pytest.raises(InvalidRequest, match=constant.decode()):
        parse_json(b'{"tools": [{"parameters": {"maximum": ' + constant + b'}}]}')


def test_client_disconnect_is_an_aborted_request_not_an_internal_error():
    error = from_exception(ClientDisconnect())
    assert isinstance(error, RequestAborted) and error.type == "request_aborted"


def test_running_out_of_memory_is_a_503_to_retry_not_an_internal_error():
    """An image decode that hits a MemoryError, or a full object store, was the stack's 500
    (`internal error`): it is capacity, and the client may send it again."""
    import torch

    class ObjectStoreFullError(Exception):  # Ray's, as its name is all that is matched
        pass

    for exc in (MemoryError(), ObjectStoreFullError("full"), torch.OutOfMemoryError("oom")):
        wrapped = RuntimeError("in a replica")
        wrapped.__cause__ = exc
        error = from_exception(wrapped)
        assert (error.status, error.type) == (503, "overloaded_error"), exc
        assert error.retry_after and type(exc).__name__ in error.message
    assert from_exception(ValueError("x")).status == 500  # the rest as before


def test_errors_clip_what_they_quote():
    response = error_response(InvalidRequest("bad " + "x" * 1_000_000, param="p" * 5000))
    assert len(response.body) < 3000
    assert json.loads(response.body)["error"]["message"].startswith("bad xxx")


def test_keys_sharing_a_name_have_separate_quotas():
    quotas = Quotas(QuotaSettings(requests_per_s=1))
    first = Principal("same", "t", key_id="a" * 64)
    twin = Principal("same", "t", key_id="b" * 64)
    quotas.admit(first, 1)
    quotas.admit(twin, 1)
    with pytest.raises(RateLimited):
        quotas.admit(first, 1)


def test_the_room_an_image_check_sees_is_what_the_request_holds_never_others_tokens():
    """The image service checks a request's images' tokens (from their headers) against the
    room the ingress gave it, before decoding them. That room counted what the key had plus
    every refund its requests in flight might bring, and held nothing: a drained key's image
    requests, or fifty at once on one minute's tokens, all had their images decoded before
    the exact charge refused them. Now a request holds what it may cost before the check."""
    clock = [0.0]
    quotas = Quotas(QuotaSettings(tokens_per_min=60_000), clock=lambda: clock[0])
    who = Principal("k", "t", key_id="c" * 64)
    busy = [quotas.admit(who, 19_000) for _ in range(3)]  # 3,000 left
    grant = quotas.admit_request(who)
    quotas.charge(grant, 1_000)  # the text's floor, charged at admission
    room = quotas.reserve(grant, 9_000)  # the most its images can take: 2,000 left to hold
    assert room.available == 3_000 and room.capacity == 60_000
    room.check(3_000)
    with pytest.raises(RateLimited) as err:
        room.check(6_000)  # what the busy requests hold is not this request's
    assert err.value.code == "tokens_per_min_exceeded" and 0 < err.value.retry_after <= 3.0
    with pytest.raises(RateLimited):  # a second at once: nothing left, refused before its body
        quotas.admit_request(who)
    quotas.settle(grant, 2_500)  # the exact cost known: what it held beyond is back at once
    assert (grant.tokens, grant.bucketed) == (2_500, 2_500)
    other = quotas.admit_request(who)
    assert quotas.reserve(other, 9_000).available == 500  # what the first gave back
    quotas.settle(other, 500)
    with pytest.raises(RateLimited):
        quotas.settle(other, 4_000)  # more than the key has: the exact charge refuses it
    for g in (*busy, grant, other):
        quotas.release(g, 0)
    assert quotas.keys[who.ident].charged == 0
    assert quotas.keys[who.ident].tokens.level == 60_000  # every token came back, no more
    with pytest.raises(RateLimited, match="needs 70000 tokens") as never:
        quotas.reserve(quotas.admit_request(who), 0).check(70_000)  # more than the bucket
    assert never.value.retry_after == 60.0


def test_a_requoted_key_keeps_what_it_spent():
    """Reloading the keys file with a changed quota must not refill the key's buckets: an edit
    (even one of max_concurrent_streams only) is no fresh minute of tokens."""
    quota = QuotaSettings(requests_per_s=1, tokens_per_min=1000, max_concurrent_streams=32)
    quotas = Quotas(QuotaSettings(), clock=lambda: 0.0)
    key = Principal("k", "t", quota, key_id="a" * 64)
    quotas.release(quotas.admit(key, 1000), 1000)
    for streams in (31, 32):
        edited = Principal("k", "t", quota.model_copy(
            update={"max_concurrent_streams": streams}), key_id="a" * 64)
        with pytest.raises(RateLimited):
            quotas.admit(edited, 1000)
    raised = Principal("k", "t", quota.model_copy(update={"tokens_per_min": 5000}),
                       key_id="a" * 64)
    with pytest.raises(RateLimited):  # a higher quota refills at its rate from here, not at once
        quotas.admit(raised, 10)


def test_a_raw_key_pasted_into_the_keys_file_is_never_printed(tmp_path, caplog):
    """At start the error names where the file is wrong; on reload the log does too: neither
    quotes the value, which may be the secret itself."""
    secret = "sk-live-" + "S3CRET" * 8
    path = tmp_path / "keys.yaml"
    good = {"keys": [{"name": "a", "tenant": "t", "sha256": digest("k" * 32)}]}
    bad = {"keys": [{"name": "a", "tenant": "t", "sha256": secret}]}
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError) as err:
        KeyRing(path)
    assert "keys.0.sha256" in str(err.value) and "S3CRET" not in str(err.value)
    path.write_text(json.dumps(good))
    ring = KeyRing(path, reload_s=0)
    path.write_text(json.dumps(bad))
    os.utime(path, (time.time() + 5, time.time() + 5))
    ring.refresh()
    assert "not reloaded" in caplog.text and "S3CRET" not in caplog.text
    assert len(ring.entries) == 1


def test_a_keys_file_not_utf8_or_listing_a_key_twice_keeps_the_last_good_set(tmp_path, caplog):
    """Not UTF-8 (a comment in Latin-1): refused at start with where, kept through on reload,
    never a 500 and never the file's text in the log (a UnicodeDecodeError's repr holds all
    of it). A digest listed twice: refused (the last entry winning would un-revoke a key
    whose entry was copied below its revoked one)."""
    path = tmp_path / "keys.yaml"
    one = {"name": "a", "tenant": "t", "sha256": digest("k" * 32)}
    latin1 = "# sk-live-S3CRET (clé de prod)\n".encode("latin-1") + json.dumps(
        {"keys": [one]}).encode()
    path.write_bytes(latin1)
    with pytest.raises(ValueError, match="not UTF-8") as err:
        KeyRing(path)
    assert "S3CRET" not in str(err.value)
    path.write_text(json.dumps({"keys": [one]}))
    ring = KeyRing(path, reload_s=0)
    for bad in (latin1, json.dumps({"keys": [one | {"revoked": True}, one | {"name": "b"}]})):
        path.write_bytes(bad if isinstance(bad, bytes) else bad.encode())
        os.utime(path, (time.time() + 5, time.time() + 5))
        assert ring.authenticate("Bearer " + "k" * 32).key == "a"
    assert "not UTF-8" in caplog.text and "S3CRET" not in caplog.text
    assert "keys.1.sha256: the digest of keys.0 again" in caplog.text


def test_an_empty_or_half_written_keys_file_keeps_the_keys_and_a_same_tick_edit_is_seen(
        tmp_path, caplog):
    path = tmp_path / "keys.yaml"
    one = {"keys": [{"name": "a", "tenant": "t", "sha256": digest("k" * 32)}]}
    path.write_text(json.dumps(one))
    ring = KeyRing(path, reload_s=0)
    stamp = path.stat().st_mtime_ns
    for partial in ("", "# being rewritten\n", "keys"):
        path.write_text(partial)
        os.utime(path, ns=(stamp + 1, stamp + 1))
        ring.refresh()
        assert len(ring.entries) == 1, partial  # not every request a 401
    assert "no top-level `keys:` list" in caplog.text
    # a revocation written with the old mtime kept (cp -p, a coarse clock): still read
    revoked = {"keys": [one["keys"][0] | {"revoked": True}]}
    path.write_text(json.dumps(revoked))
    os.utime(path, ns=(stamp, stamp))
    ring.refresh()
    assert next(iter(ring.entries.values())).revoked
    path.write_text(json.dumps({"keys": []}))  # revoking every key, on purpose
    os.utime(path, ns=(stamp + 2, stamp + 2))
    ring.refresh()
    assert ring.entries == {}


def test_upload_slots_per_key_then_per_replica():
    async def scenario():
        uploads = Uploads(LimitSettings(max_uploads=3, max_uploads_per_key=2,
                                        upload_wait_s=0.05))
        async with uploads.slot("a"), uploads.slot("a"):
            with pytest.raises(RateLimited) as info:
                async with uploads.slot("a"):
                    pass
            assert info.value.code == "upload_limit_exceeded"
            async with uploads.slot("b"):  # another key still gets the replica's last slot
                with pytest.raises(RateLimited):
                    async with uploads.slot("c"):
                        pass
        async with uploads.slot("a"), uploads.slot("a"):  # all freed
            pass
        assert uploads.total == 0 and not uploads.by_key

    asyncio.run(scenario())


def test_a_slot_freed_as_the_wait_runs_out_is_taken_not_refused():
    """The wait's timeout and the slot's release can meet: the request then gets the slot (it
    was refused with the message "None; retry when one has finished")."""
    async def scenario():
        uploads = Uploads(LimitSettings(max_uploads=3, max_uploads_per_key=1,
                                        upload_wait_s=0.05))
        uploads.by_key["a"] = 1  # another body of this key, which frees its slot ...
        real_wait = uploads._freed.wait_for

        async def freed_too_late(predicate):
            await asyncio.sleep(0.2)  # ... only after the wait ran out
            return await real_wait(predicate)

        uploads._freed.wait_for = freed_too_late
        loop = asyncio.get_running_loop()
        loop.call_later(0.04, lambda: uploads.by_key.update({"a": -1}))
        async with uploads.slot("a"):
            return uploads.by_key["a"]

    assert asyncio.run(scenario()) == 1  # its own slot, taken


# --- the proxy callback, on a real uvicorn server ----------------------------------------

FLOODS: list[dict] = []  # what each /flood response got to send before it ended


async def _flood(receive, send) -> None:
    """An event stream written as fast as the socket takes it, until 256 MB or the client
    goes: what Serve's proxy does with an answer, the disconnect (its cue to cancel the
    request) heard on `receive` beside the writes."""
    seen = {"sent": 0, "ended": None}
    FLOODS.append(seen)

    async def write() -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        chunk = b"data: " + b"x" * 65536 + b"\n\n"
        while seen["sent"] < 256 * 1024 * 1024:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            seen["sent"] += len(chunk)
            await asyncio.sleep(0)  # the next message from upstream (the ingress replica)
        seen["ended"] = "complete"

    async def listen() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        seen["ended"] = seen["ended"] or "disconnected"

    tasks = [asyncio.ensure_future(write()), asyncio.ensure_future(listen())]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()


EDGE: dict = {}  # the edge middleware the module's server runs
HELD = {"now": 0, "seen": [], "take": threading.Event(),  # what /hold saw; when its replica
        "release": threading.Event()}  # takes the body; when it answers


async def _hold(receive, send, own_answer: bool = False) -> None:
    """A request waiting for an ingress replica, as Serve's proxy keeps it: its body read whole
    into the proxy's queue (Serve's own `MessageQueue`), taken from there once the test lets
    "the replica" have it, the answer not started until the test releases it."""
    from ray.serve._private.http_util import MessageQueue

    queue, size = MessageQueue(), 0
    while (message := await receive())["type"] == "http.request":
        await queue(message)
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    else:
        HELD["seen"].append("disconnect")  # the proxy's cue to cancel the request
        if own_answer:  # an app that reads the body itself (a direct ingress) answers it
            await send({"type": "http.response.start", "status": 499,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"error": "client gone"}'})
        return
    HELD["now"] += 1
    try:
        deadline = time.monotonic() + 20
        while not HELD["take"].is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        queue.get_messages_nowait()  # what `receive_asgi_messages` hands the replica
        while not HELD["release"].is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        HELD["now"] -= 1
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps({"read": size}).encode()})


async def _app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] in ("/hold", "/own"):
        return await _hold(receive, send, own_answer=scope["path"] == "/own")
    if scope["path"] == "/flood":
        return await _flood(receive, send)
    if scope["path"] == "/boom":
        raise RuntimeError("the replica died")
    if scope["path"] == "/cut":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        raise RuntimeError("the replica died mid-stream")
    if scope["path"] == "/nowhere":  # Serve's proxy when no app has the route (a redeploy)
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
        await send({"type": "http.response.body", "body": b"Path '/nowhere' not found."})
        return
    if scope["path"] == "/busy":
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
        await send({"type": "http.response.body", "body": b"Too many requests"})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"status": "ok"}'})


@pytest.fixture(scope="module")
def edge_server():
    import uvicorn
    from uvicorn import config as uvicorn_config

    from services.guard import http_edge

    saved = dict(uvicorn_config.HTTP_PROTOCOLS)
    middleware = http_edge.install()
    http_edge.watch_pulls()
    app = middleware[0].cls(_app, proxy=True)  # as in Serve's proxy
    EDGE["app"] = app
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off",
                                           log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", port
    server.should_exit = True
    thread.join(10)
    uvicorn_config.HTTP_PROTOCOLS.clear()
    uvicorn_config.HTTP_PROTOCOLS.update(saved)


def test_a_huge_header_is_431_before_it_is_read_whole(edge_server):
    _, port = edge_server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nx-junk: ")
        sent = 0
        try:
            while sent < 8 * 1024 * 1024:
                sock.sendall(b"a" * 65536)
                sent += 65536
        except OSError:
            pass
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert sent < 8 * 1024 * 1024  # the server stopped reading long before the end
    assert b'"headers_too_large"' in answer


@pytest.mark.parametrize("first", [b"", b"G"], ids=["silent", "one-byte"])
def test_a_connection_that_sends_no_head_is_closed_with_408(edge_server, monkeypatch, first):
    """A connection that never sends a byte held a socket (and a file descriptor) for ever."""
    from services.guard import http_edge

    monkeypatch.setattr(http_edge, "HEAD_TIMEOUT_S", 0.5)
    _, port = edge_server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(first)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"request_timeout"' in answer


def test_a_response_its_client_stops_reading_is_cut_after_the_write_stall(edge_server,
                                                                          monkeypatch):
    """A client whose TCP window stays shut: the proxy's writes wait on the socket, so what
    the ingress behind it streams piles up unread. After `WRITE_STALL_S` without the socket
    taking a byte the edge closes the connection (the proxy then cancels the request)."""
    from services.guard import http_edge

    monkeypatch.setattr(http_edge, "WRITE_STALL_S", 0.5)
    _, port = edge_server
    FLOODS.clear()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    try:
        sock.sendall(b"GET /flood HTTP/1.1\r\nhost: x\r\n\r\n")
        deadline = time.time() + 20
        while not (FLOODS and FLOODS[0]["ended"]) and time.time() < deadline:
            time.sleep(0.05)  # reading nothing
        (flood,) = FLOODS
        ended = dict(flood)  # while the client still holds its end open
    finally:
        sock.close()
    assert ended["ended"] == "disconnected", ended
    assert ended["sent"] < 64 * 1024 * 1024  # stopped by the stall, not by the end


def test_a_slow_reader_that_keeps_reading_gets_another_period():
    """The stall is a period without progress: when the timer fires and the transport's
    buffer has shrunk since it was armed (the client read some), it is armed again; only a
    period in which nothing left the buffer closes the connection. (The kernel's send buffer
    sits between: how soon a slow reader's progress shows depends on it, so the mixin is
    driven here with a transport whose buffer the test sets.)"""
    from services.guard import http_edge

    class Base:
        def pause_writing(self):
            pass

        def resume_writing(self):
            pass

    class Edge(http_edge._HeadLimit, Base):
        pass

    class Transport:
        buffered, aborted = 65536, False

        def get_write_buffer_size(self):
            return self.buffered

        def is_closing(self):
            return self.aborted

        def abort(self):
            self.aborted = True

    class Loop:
        def __init__(self):
            self.timers = []

        def call_later(self, delay, callback):
            self.timers.append(callback)
            return type("Handle", (), {"cancel": lambda self: None})()

    edge = Edge()
    edge.transport, edge.loop = Transport(), Loop()
    edge.pause_writing()
    edge.transport.buffered = 40_000  # the client read some during the period
    edge.loop.timers.pop()()
    assert not edge.transport.aborted and len(edge.loop.timers) == 1  # armed again
    edge.loop.timers.pop()()  # a whole period with nothing read
    assert edge.transport.aborted
    calm = Edge()
    calm.transport, calm.loop = Transport(), Loop()
    calm.pause_writing()
    calm.resume_writing()  # drained below the low-water mark: the timer is stopped
    assert calm._stall_timer is None


def test_headers_under_the_limit_and_pipelined_requests_are_served(edge_server):
    url, _ = edge_server
    response = httpx.get(f"{url}/health", headers={"x-big": "a" * 30_000}, timeout=10)
    assert response.status_code == 200
    with httpx.Client(timeout=10) as client:
        for _ in range(3):
            assert client.post(f"{url}/health", content=b"x" * 200_000).status_code == 200


def _raw_post(port: int, body_parts: list[bytes], declared: int | None = None,
              path: str = "/hold", headers: dict[str, str] | None = None) -> bytes:
    """POST `path` on a raw socket (chunked unless `declared`), then whatever comes back."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{extra}"
            .encode()
            + (f"content-length: {declared}\r\n".encode() if declared is not None
               else b"transfer-encoding: chunked\r\n") + b"\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        try:
            for part in body_parts:
                sock.sendall(part if declared is not None
                             else f"{len(part):x}\r\n".encode() + part + b"\r\n")
                time.sleep(0.02)
            if declared is None:
                sock.sendall(b"0\r\n\r\n")
        except OSError:  # answered and closed before the body ended
            pass
        return _read_all(sock)


def _read_all(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection (or the read fails)."""
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except OSError:
        pass
    return answer


def test_a_body_over_the_limit_is_413_at_the_edge_declared_or_streamed(edge_server,
                                                                       monkeypatch):
    """Serve's proxy reads a body whole into an unbounded queue while the request waits for an
    ingress replica, before the key is checked: the ingress's limits came too late to bound
    its memory."""
    from services.guard import http_edge

    _, port = edge_server
    monkeypatch.setattr(http_edge, "MAX_BODY_BYTES", 1000)
    HELD["take"].set()
    HELD["release"].set()
    HELD["seen"].clear()
    declared = _raw_post(port, [], declared=5000)
    assert declared.startswith(b"HTTP/1.1 413") and b'"payload_too_large"' in declared
    assert b"connection: close" in declared.lower()
    assert HELD["seen"] == []  # refused from its headers: the app never ran
    streamed = _raw_post(port, [b"x" * 400] * 5)
    assert streamed.startswith(b"HTTP/1.1 413") and b"limits.max_body_bytes" in streamed
    assert HELD["seen"] == ["disconnect"]  # the request was cancelled, its body dropped
    own = _raw_post(port, [b"x" * 400] * 5, path="/own")
    assert own.startswith(b"HTTP/1.1 413"), own[:200]  # not the app's answer to "gone"
    fits = _raw_post(port, [b"x" * 400] * 2)
    assert fits.startswith(b"HTTP/1.1 200") and b'{"read": 800}' in fits


def test_a_request_without_a_valid_key_is_401_at_the_edge_before_its_body(edge_server,
                                                                          tmp_path, monkeypatch):
    """Where auth is on, a request with no key, an unknown one or another scheme is answered
    401 from its headers: its body was read whole into the proxy's queue (its budget shared by
    every client) and handed to an ingress replica before the ingress refused it. A valid key
    goes on; probes and CORS preflights need none, as at the ingress."""
    from services.guard import http_edge

    url, port = edge_server
    key = "sk-edge-test"
    keys = tmp_path / "keys.yaml"
    write_keys(keys, {key: {"name": "a", "tenant": "t"}})
    monkeypatch.setattr(EDGE["app"], "keys", KeyRing(keys))
    HELD["take"].set()
    HELD["release"].set()
    HELD["seen"].clear()
    before = EDGE_ANSWERS.value(status="401", code="invalid_api_key")
    for auth in ({}, {"authorization": "Bearer sk-wrong"}, {"authorization": f"Basic {key}"}):
        for declared in (50_000_000, None):  # declared, and chunked: nothing of it sent
            answer = _raw_post(port, [], declared=declared, headers=auth)
            assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
            error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
            assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
            assert b"connection: close" in answer.lower()  # its body unread
    assert HELD["seen"] == []  # the app never ran
    assert EDGE_ANSWERS.value(status="401", code="invalid_api_key") == before + 6
    fits = _raw_post(port, [b"x" * 400] * 2, headers={"authorization": f"Bearer {key}"})
    assert fits.startswith(b"HTTP/1.1 200") and b'{"read": 800}' in fits
    monkeypatch.setattr(http_edge, "CORS_ORIGINS", frozenset({"https://app.example"}))
    for origin, allowed in [("https://app.example", "https://app.example"),
                            ("https://evil.example", None)]:
        models = httpx.get(f"{url}/v1/models", headers={"origin": origin}, timeout=10)
        assert models.status_code == 401  # read by a browser only where CORS allows it
        assert models.headers.get("access-control-allow-origin") == allowed
    for method, path in [("GET", "/health"), ("HEAD", "/ready"), ("GET", "/-/healthz"),
                         ("OPTIONS", "/v1/chat/completions")]:
        assert httpx.request(method, f"{url}{path}", timeout=10).status_code == 200, path
    # ... but nothing with a body, whatever its path or method, nor a path merely like a probe
    for method, path in [("POST", "/health"), ("POST", "/-/anything"), ("OPTIONS", "/ready"),
                         ("PUT", "/v1/chat/completions/health")]:
        assert httpx.request(method, f"{url}{path}", content=b"x" * 100,
                             timeout=10).status_code == 401, (method, path)
    assert httpx.get(f"{url}/v1/chat/completions/health", timeout=10).status_code == 401


def test_a_keys_file_the_edge_cannot_read_yet_is_read_once_it_can_be(tmp_path, monkeypatch):
    """A proxy that started before its keys file could be read checked no key for its whole
    life; it now tries again every reload period (letting requests through meanwhile: the
    ingress checks every key) and refuses keyless requests once it has the file."""
    from services.guard import http_edge

    path = tmp_path / "keys.yaml"
    monkeypatch.setattr(http_edge, "KEYS_FILE", str(path))
    monkeypatch.setattr(http_edge, "KEYS_RELOAD_S", 0.05)
    keys = http_edge.edge_keys()
    assert keys is not None
    keys.authenticate(None)  # not readable yet: no refusal here
    write_keys(path, {"sk-late": {"name": "a", "tenant": "t"}})
    time.sleep(0.1)
    with pytest.raises(Unauthorized):
        keys.authenticate(None)
    assert keys.authenticate("Bearer sk-late").tenant == "t"
    monkeypatch.setattr(http_edge, "KEYS_FILE", None)
    assert http_edge.edge_keys() is None


def test_a_client_still_sending_its_body_reads_the_edges_answer_not_a_reset(
        edge_server, tmp_path, monkeypatch):
    """The edge answers a keyless request from its headers; a client sending a body of
    megabytes is still writing when the answer comes. Closing a socket with unread bytes
    resets it, and the client saw a connection error, not the 401: the edge sends its answer,
    reads and drops the rest of the body, and closes once the client has it."""
    keys = tmp_path / "keys.yaml"
    write_keys(keys, {"sk-real": {"name": "a", "tenant": "t"}})
    monkeypatch.setattr(EDGE["app"], "keys", KeyRing(keys))
    _, port = edge_server
    body = b"x" * (8 * 1024 * 1024)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                     b"content-type: application/json\r\n"
                     + f"content-length: {len(body)}\r\n\r\n".encode())
        sock.sendall(body)  # whole: the server read (and dropped) it after answering
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b'"invalid_api_key"' in answer


def test_bodies_queued_for_replicas_are_bounded_and_freed_as_replicas_take_them(
        edge_server, monkeypatch):
    """The budget covers what Serve's proxy queues for replicas that have not taken it yet:
    freed as a replica takes a body, not when its answer starts (a non-streamed answer starts
    only once it is generated: its body counted for minutes, other requests refused)."""
    from services.guard import http_edge

    url, port = edge_server
    monkeypatch.setattr(http_edge, "BODY_BUDGET_BYTES", 1000)
    HELD["take"].clear()
    HELD["release"].clear()
    answers: list[httpx.Response] = []

    def post_in_background(body: bytes) -> threading.Thread:
        thread = threading.Thread(target=lambda: answers.append(
            httpx.post(f"{url}/hold", content=body, timeout=30)))
        thread.start()
        return thread

    def wait_held(n: int) -> None:
        deadline = time.monotonic() + 10
        while HELD["now"] < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert HELD["now"] == n

    waiting = [post_in_background(b"a" * 600)]
    try:
        wait_held(1)
        over = _raw_post(port, [b"b" * 600], declared=600)
        assert over.startswith(b"HTTP/1.1 503") and b'"overloaded"' in over
        assert b"retry-after: 1" in over.lower()
        HELD["take"].set()  # the replica takes the first body; its answer has not started
        deadline = time.monotonic() + 10
        while HELD["now"] and http_edge._QUEUED and time.monotonic() < deadline:
            time.sleep(0.01)
        waiting.append(post_in_background(b"c" * 600))  # room again
        wait_held(2)
    finally:
        HELD["take"].set()
        HELD["release"].set()
        for thread in waiting:
            thread.join(30)
    assert sorted(r.json()["read"] for r in answers) == [600, 600]
    assert not http_edge._QUEUED


def test_a_client_cannot_keep_a_refused_request_alive_with_serves_header(edge_server,
                                                                          monkeypatch):
    """Serve keeps a request whose client sent `x-request-disconnect-disabled: ?1` running
    after its client goes: a refused body would have stayed queued, its budget given back."""
    from services.guard import http_edge

    _, port = edge_server
    monkeypatch.setattr(http_edge, "MAX_BODY_BYTES", 1000)
    seen: list[list] = []

    async def app(scope, receive, send):
        seen.append([k for k, _ in scope["headers"]])
        await _app(scope, receive, send)

    edge = http_edge.EdgeErrors(app, proxy=True)
    scope = {"type": "http", "path": "/health", "headers": [
        (b"x-request-disconnect-disabled", b"?1"), (b"host", b"x")]}

    async def go():
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)
        await edge(scope, receive, send)
        return sent

    sent = asyncio.run(go())
    assert seen == [[b"host"]] and sent[0]["status"] == 200


def test_edge_failures_are_json_errors_and_cut_streams_end_with_an_error_event(edge_server):
    url, _ = edge_server
    boom = httpx.get(f"{url}/boom", timeout=10)
    assert boom.status_code == 500 and boom.json()["error"]["type"] == "internal_error"
    busy = httpx.get(f"{url}/busy", timeout=10)
    assert busy.status_code == 503
    assert busy.json()["error"] == {"message": "Too many requests", "type": "overloaded_error",
                                    "param": None, "code": "overloaded"}
    nowhere = httpx.get(f"{url}/nowhere", timeout=10)
    assert nowhere.status_code == 404 and nowhere.json()["error"]["code"] == "not_found"
    cut = httpx.get(f"{url}/cut", timeout=10)
    events = [line[6:] for line in cut.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[-1])["error"]["code"] == "stream_interrupted"


def test_stack_errors_have_their_statuses():
    assert PayloadTooLarge("x").status == 413 and UnsupportedMediaType("x").status == 415


def test_installing_the_edge_outside_ray_starts_no_ray():
    """Outside Serve's proxy (a test, an in-process stack) the edge asked Ray for its runtime
    context to tell where it runs, which started a local Ray in that process."""
    import subprocess
    import sys

    probe = ("from services.guard import http_edge; http_edge.install(); import ray; "
             "print(ray.is_initialized())")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__)))),
                         env=os.environ | {"RAY_USAGE_STATS_ENABLED": "0"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
