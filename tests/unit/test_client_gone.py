"""A client leaving, mid-stream or mid-upload, the way the ingress sees it under Ray Serve.
Serve's proxy hands the replica uvicorn's ASGI scope (spec 2.3), so Starlette streams the answer
in an anyio task group, and a disconnect (or Serve cancelling the call) cancels that group's
scope, which cancels again every await of the stream's clean-up; a client gone before its answer
started is a cancelled call. The request is still accounted for in full: its key's stream slot
is given back, the pool's in-flight count drops, and the engines hold nothing."""

from __future__ import annotations

import asyncio
import json

import pytest

from cluster.inprocess import build_inprocess
from cluster.settings import parse_settings

PROFILE = {
    "profile": "client-gone",
    "auth": {"enabled": False, "default_quota": {"max_concurrent_streams": 1}},
    "model": {"context_length": 4096},
    "engine": {"kind": "simulated", "simulated": {"decode_step_ms": 20, "output": "counter"}},
    "pools": {"fast": {"effort": "none"}, "deep": {"effort": "high"}},
}
BODY = {"model": "mistral-small-4", "max_tokens": 400, "stream": True,
        "messages": [{"role": "user", "content": "count"}]}


async def given_back(ingress, timeout_s: float = 10.0) -> None:
    """Wait, with a deadline, until the request that left is closed: no stream in flight and
    no key holding a stream slot (a fixed sleep assumed how long its clean-up takes)."""
    service = ingress.service
    async with asyncio.timeout(timeout_s):
        while any(service.in_flight.values()) or any(
                state.streams for state in service.quotas.keys.values()):
            await asyncio.sleep(0.01)


async def asgi_post(app, body: dict, *, leave: str | None = None, upload: bool = False,
                    headers: tuple = ()) -> tuple[int, bytes]:
    """POST `body` to /v1/chat/completions as Serve's replica does (uvicorn's scope); with
    `leave`, the client goes once the first body chunk is sent: `disconnect` (http.disconnect
    received) or `cancel` (the call cancelled, as Serve does when its proxy's client left), or
    `start`: disconnected while the response's head is sent, or `stall`: it stops reading
    after the first event (its TCP window closed: the next write never completes);
    with `upload`, it goes instead while its body is still arriving (a slow client)."""
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "server": ("127.0.0.1", 8000),
             "client": ("127.0.0.1", 50000),
             "headers": [(b"host", b"small4"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(raw)).encode()), *headers]}
    inbox: asyncio.Queue = asyncio.Queue()
    inbox.put_nowait({"type": "http.request", "body": raw[:10] if upload else raw,
                      "more_body": upload})
    status, chunks, first = 0, [], asyncio.Event()
    if upload:  # the body stops coming: the app waits for the rest
        first.set()

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            if leave == "start":  # gone as the response starts, while its head is written
                inbox.put_nowait({"type": "http.disconnect"})
                await asyncio.sleep(0.05)  # (a slow or stalled connection: send waits)
        elif message.get("body"):
            if leave == "stall" and chunks:
                await asyncio.Event().wait()
            chunks.append(message["body"])
            first.set()

    call = asyncio.ensure_future(app(scope, inbox.get, send))
    if leave in ("disconnect", "cancel"):
        await asyncio.wait_for(first.wait(), 30)
        await asyncio.sleep(0.2 if upload else 0)
        if leave == "disconnect":
            inbox.put_nowait({"type": "http.disconnect"})
        else:
            call.cancel()
    await asyncio.wait_for(asyncio.gather(call, return_exceptions=True), 30)
    return status, b"".join(chunks)


def test_a_client_gone_before_its_stream_started_gives_everything_back():
    """The client left as its response started, while the response's head was being sent:
    Starlette cancels the stream before the answer's events were ever iterated, so no
    clean-up of theirs can run: the response closes the answer itself."""
    ingress = build_inprocess(parse_settings(PROFILE))
    app = ingress.build_asgi_app()

    async def scenario():
        gone = await asgi_post(app, BODY, leave="start")
        await given_back(ingress)  # the background closes (shielded from the cancel) ran
        return gone, await asgi_post(app, BODY | {"stream": False, "max_tokens": 3})

    (gone_status, gone_body), (status, answer) = asyncio.run(scenario())
    assert (gone_status, gone_body) == (200, b"")  # the head only
    _assert_all_given_back(ingress, status, answer)


@pytest.mark.parametrize("upload", [False, True], ids=["mid-stream", "mid-upload"])
@pytest.mark.parametrize("leave", ["disconnect", "cancel"])
def test_a_client_leaving_gives_everything_back(leave, upload):
    ingress = build_inprocess(parse_settings(PROFILE))
    app = ingress.build_asgi_app()

    async def scenario():
        gone = await asgi_post(app, BODY, leave=leave, upload=upload)
        await given_back(ingress)  # the background closes (shielded from the cancel) ran
        after = await asgi_post(app, BODY | {"stream": False, "max_tokens": 3})
        return gone, after

    (gone_status, _), (status, answer) = asyncio.run(scenario())
    # a stream was answered before the client left; a half-sent body never was (a cancelled
    # call sends nothing; a disconnect gets its error answer, which nobody reads)
    assert gone_status == (0 if upload and leave == "cancel" else 499 if upload else 200)
    _assert_all_given_back(ingress, status, answer)


@pytest.mark.parametrize("limits, headers", [
    ({"write_stall_s": 0.5}, ()),
    ({}, ((b"x-request-timeout", b"1"),)),  # the deadline bounds a stalled write too
], ids=["write-stall", "deadline"])
def test_a_client_that_stops_reading_gives_everything_back(limits, headers):
    """A reader that stopped reading holds the write of the next event: without a bound the
    request would keep its key's only stream slot and its pool's place for ever."""
    quota = {"max_concurrent_streams": 1, "tokens_per_min": 100_000}
    ingress = build_inprocess(parse_settings(PROFILE | {"limits": limits, "auth": {
        "enabled": False, "default_quota": quota}}))
    app = ingress.build_asgi_app()

    async def scenario():
        gone = await asgi_post(app, BODY, leave="stall", headers=headers)
        await given_back(ingress)  # the background closes (shielded from the cancel) ran
        return gone, await asgi_post(app, BODY | {"stream": False, "max_tokens": 3})

    ingress.service.quotas.clock = lambda: 1000.0  # no refill: what was spent stays spent
    (gone_status, gone_body), (status, answer) = asyncio.run(scenario())
    assert gone_status == 200 and gone_body.startswith(b"data: ")  # the first event only
    _assert_all_given_back(ingress, status, answer)
    # the stream the server cut for not being read (at the stall bound or its deadline) was
    # decoded on meanwhile, the reader pulls its tokens, so how many is unknown: its whole
    # grant stays spent (before, all but the few tokens it read came back)
    state, = ingress.service.quotas.keys.values()
    spent = state.tokens.capacity - state.tokens.level
    second = json.loads(answer)["usage"]["total_tokens"]
    assert spent - second > 400, spent  # the stalled one's max_tokens, and its prompt


def _assert_all_given_back(ingress, status: int, answer: bytes) -> None:
    # the key's only stream slot was given back: the next request is not a 429
    assert status == 200, answer
    assert ingress.service.in_flight == {"fast": 0, "deep": 0}
    for name in ("fast", "deep"):
        decode = ingress.service.pools[name]
        for stats in (decode.engine.stats(), decode.prefill.engine.stats()):
            assert (stats.running, stats.waiting, stats.kv_tokens) == (0, 0, 0)
