"""The HTTP edge in front of the ingress: Serve's proxy (and a direct-ingress replica's server).

Serve's proxy owns the client connection (uvicorn, httptools' parser), so two things can only be
done there. Serve runs `install` in each process that starts such a server when the environment
names it (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=services.guard.http_edge:install`, set by
`small4 up` and the tests before Ray starts):

- the request head (request line and headers) is limited to `MAX_HEAD_BYTES` while it is read,
  answered 431 beyond, and must arrive within `HEAD_TIMEOUT_S` of the connection opening or of
  its first byte after a response (408): uvicorn's httptools protocol has neither limit, so a
  64 MB header would be buffered whole before any check ran;
- a response whose client reads nothing of it for `WRITE_STALL_S` (the transport paused and
  its buffer not shrinking for a whole period; a slow reader that makes progress gets another
  period, once the kernel's send buffer lets it show) has its connection closed: the proxy's
  own writes wait on the socket, but the ingress behind it writes into Serve's unbounded
  queue and would decode the whole answer into memory, free the key's stream slot and be
  counted answered while the client holds the connection for ever.
  The proxy sees the close as the client leaving and cancels the request (the ingress's own
  `limits.write_stall_s` does this where it owns the socket: a direct-ingress replica);
- `EdgeErrors` bounds request bodies before any replica sees them: Serve's proxy reads a body
  whole into an unbounded queue as soon as the request arrives, while the request waits for an
  ingress replica (before its key is checked, where the edge checks none), so the ingress's
  own body limits came too late to bound the proxy's memory. A declared or streamed body over
  `MAX_BODY_BYTES` (the stack's `limits.max_body_bytes`) is answered 413; in Serve's proxy,
  body bytes queued for replicas that have not taken them yet may be at most
  `BODY_BUDGET_BYTES` (`limits.edge_body_budget_bytes`) per proxy: a body that would pass it
  is answered 503 (retry), never waited for. (A direct ingress reads its bodies itself,
  under its own upload limits: there is no queue to bound.) Serve's
  `x-request-disconnect-disabled` header is
  dropped: a refused request must be cancelled, its queued body with it;
- `EdgeErrors` answers a request without a valid API key 401 before any of its body is read,
  where auth is on (`SMALL4_KEYS_FILE`: the stack's `auth.keys_file`, re-read as the ingress
  re-reads it): the body would otherwise be read whole, queued and handed to an ingress replica
  before the ingress's own check refused it, so a client with no key could fill the proxy's
  body budget (503 for everyone) and the ingress replicas' memory. The ingress still checks
  every key (and its quota): this check only moves a refusal earlier. A probe's read (GET or
  HEAD of `/health`, `/ready`, Serve's `/-/healthz` and `/-/routes`) and a CORS preflight need
  no key, as at the ingress; nothing with a body is let through without one. The 401
  carries the CORS headers the ingress would add (`SMALL4_CORS_ORIGINS`: `auth.cors_origins`),
  so a browser shows it, not a CORS failure. An answer sent before the body was read (this
  401, a declared body's 413) is followed by a lingering close (`LINGER_S`): the rest of the
  body is read and dropped, so a client still sending it reads the answer, not a reset;
- `EdgeErrors` also makes every answer the proxy itself writes an OpenAI-style JSON error (its own
  503/408/429 texts, and uvicorn's plain-text 500 when the ingress died before answering), and
  ends an event stream that was cut (the ingress replica died or was stopped mid-stream) with
  an SSE error event instead of a bare connection close.

Every answer the edge writes itself is counted in `small4_edge_answers_total` (by status and
code): these requests never reach the ingress, whose request metrics do not see them (Serve's
503 for a full queue, `ingress.max_queued_requests`, among them).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from starlette.middleware import Middleware

from services.errors import Unauthorized
from services.guard.keys import KeyRing
from services.telemetry.metrics import EDGE_ANSWERS

log = logging.getLogger("small4.edge")

MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT_S = 30.0
# how long a connection answered before its body was read goes on reading (and dropping) it
LINGER_S = 5.0
# the stack's `limits.write_stall_s`: the proxy reads no settings, `small4 up` and the chart
# pass it in the environment
WRITE_STALL_S = float(os.environ.get("SMALL4_WRITE_STALL_S", "30"))
# the stack's `limits.max_body_bytes` and `limits.edge_body_budget_bytes`, passed the same way
MAX_BODY_BYTES = int(os.environ.get("SMALL4_MAX_BODY_BYTES", str(112 * 1024 * 1024)))
BODY_BUDGET_BYTES = int(os.environ.get("SMALL4_EDGE_BODY_BUDGET_BYTES", str(1024 ** 3)))
# the stack's `auth.keys_file` and `auth.reload_s` where auth is on; unset: keys are checked by
# the ingress alone
KEYS_FILE = os.environ.get("SMALL4_KEYS_FILE") or None
KEYS_RELOAD_S = float(os.environ.get("SMALL4_KEYS_RELOAD_S", "5"))
CORS_ORIGINS = frozenset(json.loads(os.environ.get("SMALL4_CORS_ORIGINS") or "[]"))
_STATUS_TYPES = {401: "authentication_error", 408: "invalid_request_error", 429: "rate_limit_error",
                 503: "overloaded_error", 504: "timeout_error"}


def install() -> list[Middleware]:
    """Serve's proxy callback: bound the request head in this process's uvicorn servers, and
    return the middleware that bounds bodies and keeps every edge answer in the OpenAI error
    shape."""
    from uvicorn import config

    config.HTTP_PROTOCOLS["auto"] = f"{__name__}:{_protocol_class().__name__}"
    proxy = _in_serve_proxy()
    if proxy:
        watch_pulls()
    return [Middleware(EdgeErrors, proxy=proxy, keys=edge_keys())]


def edge_keys() -> EdgeKeys | None:
    """The keys of `SMALL4_KEYS_FILE`, or None where no file is named."""
    return None if KEYS_FILE is None else EdgeKeys(KEYS_FILE, KEYS_RELOAD_S)


class EdgeKeys:
    """The edge's key ring. A file that cannot be read yet is read again at most every
    `reload_s`, no key refused here meanwhile (said in the log; the ingress, which refuses to
    start on such a file, still checks every key)."""

    def __init__(self, path: str, reload_s: float, clock=time.monotonic):
        self.path, self.reload_s, self.clock = path, reload_s, clock
        self.ring: KeyRing | None = None
        self.tried = float("-inf")
        self._try()

    def _try(self) -> None:
        self.tried = self.clock()
        try:
            self.ring = KeyRing(self.path, self.reload_s)
        except ValueError as exc:
            log.error("the edge checks no API keys until its keys file can be read: %s", exc)

    def authenticate(self, authorization: str | None):
        if self.ring is None and self.clock() - self.tried >= self.reload_s:
            self._try()
        if self.ring is not None:
            return self.ring.authenticate(authorization)
        return None


def _in_serve_proxy() -> bool:
    """Whether this process is Serve's HTTP proxy (not a replica serving its own HTTP)."""
    try:
        import ray
        from ray.serve._private.constants import SERVE_PROXY_NAME

        if not ray.is_initialized():  # asking for the runtime context would start a local Ray
            return False
        return (ray.get_runtime_context().get_actor_name() or "").startswith(SERVE_PROXY_NAME)
    except Exception:  # no Ray here
        return False


# The body messages a proxy queued for a replica, by identity, until the replica takes them:
# id -> (the middleware, the request's queued messages: id -> (message, bytes)). Those keep
# the messages alive meanwhile, so an id is never another object's.
_QUEUED: dict[int, tuple[Any, dict[int, tuple[dict, int]]]] = {}


def watch_pulls() -> None:
    """Release the budget of body bytes as the replica takes them from the proxy's queue (Serve
    2.60's `MessageQueue.get_messages_nowait`: what `receive_asgi_messages` hands the replica),
    not when the answer starts, which a non-streamed answer does only once it is generated."""
    from ray.serve._private.http_util import MessageQueue

    taken = MessageQueue.get_messages_nowait
    if getattr(taken, "small4_pulls", False):
        return

    def get_messages_nowait(self):
        messages = taken(self)
        for message in messages:
            entry = _QUEUED.pop(id(message), None)
            if entry is not None:
                edge, queued = entry
                edge.held -= queued.pop(id(message))[1]
        return messages

    get_messages_nowait.small4_pulls = True
    MessageQueue.get_messages_nowait = get_messages_nowait


def _protocol_class():
    try:
        import httptools  # noqa: F401
    except ImportError:  # uvicorn's h11 protocol has its own bound, set where it is built
        return LimitedH11Protocol
    return LimitedHttpToolsProtocol


def error_bytes(status: int, message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message[:1000],
                                 "type": _STATUS_TYPES.get(status, "internal_error"
                                                           if status >= 500 else
                                                           "invalid_request_error"),
                                 "param": None, "code": code}}).encode()


class _HeadLimit:
    """Mixin for a uvicorn HTTP protocol: count the bytes of each request head as they arrive
    and answer 431 past `MAX_HEAD_BYTES`; a head not complete within `HEAD_TIMEOUT_S` gets 408.
    Body bytes are not counted (the ingress bounds and times the body). A response whose
    client reads none of it for `WRITE_STALL_S` (the transport paused throughout) is cut."""

    _reading_head = True
    _head_bytes = 0
    _head_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.transport = _LingeringClose(transport, self)  # what the request cycles close
        self._await_head()
        # a connection that never sends a byte gets the head's deadline too (uvicorn times a
        # connection out only between requests, once one was answered)
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timed_out)

    def _await_head(self) -> None:
        self._reading_head, self._head_bytes = True, 0
        self._stop_head_timer()

    def _stop_head_timer(self) -> None:
        self._stop_timer("_head_timer")

    def _stop_timer(self, name: str) -> None:
        if (timer := getattr(self, name)) is not None:
            timer.cancel()
            setattr(self, name, None)

    def _head_timed_out(self) -> None:
        answering = self.cycle is not None and not self.cycle.response_complete
        if self._reading_head and not answering and not self.transport.is_closing():
            self._refuse(408, "Request Timeout", "the request headers did not arrive in "
                         f"{HEAD_TIMEOUT_S:g} s", "request_timeout")

    def _head_done(self) -> None:
        self._reading_head = False
        self._stop_head_timer()

    def _refuse(self, status: int, reason: str, message: str, code: str) -> None:
        EDGE_ANSWERS.inc(status=str(status), code=code)
        body = error_bytes(status, message, code)
        self.transport.write(b"".join([
            f"HTTP/1.1 {status} {reason}\r\n".encode(), b"content-type: application/json\r\n",
            b"content-length: ", str(len(body)).encode(), b"\r\n",
            b"connection: close\r\n\r\n", body]))
        self.transport.close()
        self._stop_head_timer()

    def _feed_head(self, data: bytes, feed) -> None:
        """Feed `data`, never more than the head's remaining room while the head is read."""
        if data and self._reading_head and self._head_timer is None:
            self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timed_out)
        while data and self._reading_head and not self.transport.is_closing():
            room = MAX_HEAD_BYTES - self._head_bytes
            if room <= 0:
                self._refuse(431, "Request Header Fields Too Large",
                             f"the request line and headers are over {MAX_HEAD_BYTES} bytes",
                             "headers_too_large")
                return
            piece, data = data[:room], data[room:]
            self._head_bytes += len(piece)
            feed(piece)
        if data and not self.transport.is_closing():
            feed(data)

    def connection_lost(self, exc) -> None:
        self._stop_head_timer()
        self._stop_stall_timer()
        self.transport.lost()
        super().connection_lost(exc)

    # ---- a response its client stopped reading ----------------------------------------
    _stall_timer = None

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall_timer is None:
            self._arm_stall_timer()

    def _arm_stall_timer(self) -> None:
        self._stall_buffered = self.transport.get_write_buffer_size()
        self._stall_timer = self.loop.call_later(WRITE_STALL_S, self._write_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._stop_stall_timer()

    def _stop_stall_timer(self) -> None:
        self._stop_timer("_stall_timer")

    def _write_stalled(self) -> None:
        self._stall_timer = None
        if self.transport.is_closing():
            return
        if self.transport.get_write_buffer_size() < self._stall_buffered:
            self._arm_stall_timer()  # a slow reader, still reading: another period
        else:
            log.warning("a client read nothing of its response for %g s: closing it",
                        WRITE_STALL_S)
            self.transport.abort()


class _LingeringClose:
    """A connection's transport whose `close` lingers while its request's body is unread (an
    answer sent from the headers alone: 401, 413): closing a socket with unread bytes makes
    the kernel reset the connection, and a client still sending its body sees the reset, not
    the answer. Instead the answer goes out with a FIN, what the client still sends is read
    and dropped, and the socket closes when the client closes it or after `LINGER_S`."""

    def __init__(self, transport, protocol):
        self._raw, self._protocol = transport, protocol
        self._timer = None

    def __getattr__(self, name):
        return getattr(self._raw, name)

    def is_closing(self) -> bool:
        return self._timer is not None or self._raw.is_closing()

    def close(self) -> None:
        cycle = getattr(self._protocol, "cycle", None)
        unread = cycle is not None and getattr(cycle, "more_body", False)
        if (self._timer is not None or self._raw.is_closing() or not unread
                or not self._raw.can_write_eof()):
            if self._timer is None:
                self._raw.close()
            return
        self._raw.write_eof()  # after the answer still buffered
        self._timer = self._protocol.loop.call_later(LINGER_S, self._raw.close)
        flow = getattr(self._protocol, "flow", None)
        if flow is not None:  # paused at uvicorn's buffer limit: read on, dropping it
            flow.resume_reading()

    def lost(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is an optional uvicorn extra
    HttpToolsProtocol = None

if HttpToolsProtocol is not None:
    class LimitedHttpToolsProtocol(_HeadLimit, HttpToolsProtocol):
        """uvicorn's httptools protocol with a bounded, timed request head."""

        def data_received(self, data: bytes) -> None:
            self._feed_head(data, super().data_received)

        def on_headers_complete(self) -> None:
            self._head_done()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._await_head()


from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: E402


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with h11's own bound on an incomplete head."""

    def __init__(self, config, *args, **kwargs):
        config.h11_max_incomplete_event_size = MAX_HEAD_BYTES
        super().__init__(config, *args, **kwargs)


class EdgeErrors:
    """ASGI middleware: request bodies bounded (each, and all those not yet answered), the
    edge's own answers as OpenAI-style JSON errors, and a cut event stream ended with an SSE
    error event."""

    def __init__(self, app, proxy: bool = False, keys: EdgeKeys | KeyRing | None = None):
        self.app = app
        self.proxy = proxy  # Serve's proxy: bodies wait in its queue, bounded by the budget
        self.keys = keys  # where auth is on: a request without a valid key is refused here
        self.held = 0  # body bytes queued for replicas that have not taken them

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state: dict[str, Any] = {"started": False, "done": False, "sse": False,
                                 "rewrite": None, "body": 0, "refused": None}
        queued: dict[int, tuple[dict, int]] = {}  # its body messages no replica took yet
        declared = _content_length(scope)
        if declared is not None and declared > MAX_BODY_BYTES:
            return await _send_json_error(send, 413, _too_large(declared), _CLOSE)
        body = _has_body(scope, declared)
        if self.keys is not None and _needs_key(scope, body):
            try:
                self.keys.authenticate(_header(scope, b"authorization"))
            except Unauthorized as exc:  # its body unread: the connection cannot go on
                extra = _cors(scope) | (_CLOSE if body else {})
                return await _send_json_error(send, exc.status, exc.message, extra,
                                              code=exc.code)
        scope["headers"] = [(k, v) for k, v in scope.get("headers", ())
                            if k.lower() != b"x-request-disconnect-disabled"]

        def release() -> None:  # the request ended: whatever it still had queued is gone
            for key, (_, size) in queued.items():
                _QUEUED.pop(key, None)
                self.held -= size
            queued.clear()

        async def bounded_receive():
            if state["refused"] is not None:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] != "http.request":
                return message
            size = len(message.get("body", b""))
            state["body"] += size
            if state["body"] > MAX_BODY_BYTES:
                state["refused"] = (413, _too_large(state["body"]))
            elif self.proxy and size:
                if self.held + size > BODY_BUDGET_BYTES:
                    state["refused"] = (503, "the server holds too many request bodies not "
                                        "yet taken by a replica; retry the request")
                else:  # queued by the proxy until its replica takes it (`watch_pulls`)
                    self.held += size
                    queued[id(message)] = (message, size)
                    _QUEUED[id(message)] = (self, queued)
            if state["refused"] is not None:  # the proxy hears a client gone: it cancels
                return {"type": "http.disconnect"}  # (what it queued goes when it ends)
            return message

        async def refuse() -> None:
            status, message = state["refused"]
            extra = _CLOSE | ({b"retry-after": b"1"} if status == 503 else {})
            await _send_json_error(send, status, message, extra)
            state["started"] = state["done"] = True

        async def guarded_send(message) -> None:
            if state["done"]:  # the app's answer to a body refused here: ours went instead
                return
            kind = message["type"]
            if kind == "http.response.start":
                if state["refused"] is not None:  # an app reading the body itself (a direct
                    return await refuse()         # ingress) answers the "client gone"
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                ctype = headers.get(b"content-type", b"")
                state["sse"] = ctype.startswith(b"text/event-stream")
                if message["status"] >= 400 and ctype.startswith(b"text/plain"):
                    state["rewrite"] = (message, [])  # the proxy's own text: rewrite as JSON
                    return
                state["started"] = True
            elif kind == "http.response.body":
                if state["rewrite"] is not None:
                    start, parts = state["rewrite"]
                    parts.append(message.get("body", b""))
                    if not message.get("more_body", False):
                        await _send_json_error(send, start["status"],
                                               b"".join(parts).decode("utf-8", "replace"),
                                               _extra_headers(start))
                        state["started"] = state["done"] = True
                    return
                if not message.get("more_body", False):
                    state["done"] = True
            await send(message)

        try:
            await self.app(scope, bounded_receive, guarded_send)
        except Exception as exc:
            log.warning("the edge's app failed: %r", exc)
        finally:
            release()
        if state["done"]:
            return
        if not state["started"] and state["refused"] is not None:
            await refuse()
        elif not state["started"]:
            await _send_json_error(send, 500 if state["rewrite"] is None else
                                   state["rewrite"][0]["status"],
                                   "the server failed before answering; retry the request", {})
        elif state["sse"]:
            EDGE_ANSWERS.inc(status="503", code="stream_interrupted")
            event = json.loads(error_bytes(
                503, "the stream was cut: the server serving it went away; retry the request",
                "stream_interrupted"))
            await send({"type": "http.response.body",
                        "body": f"data: {json.dumps(event)}\n\n".encode(), "more_body": False})


# an answer sent before the body was read whole: the connection cannot carry another request
_CLOSE = {b"connection": b"close"}


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _has_body(scope, declared: int | None) -> bool:
    chunked = "chunked" in (_header(scope, b"transfer-encoding") or "").lower()
    return chunked or bool(declared)


def _cors(scope) -> dict[bytes, bytes]:
    """The CORS headers the ingress's middleware gives an answer to an allowed origin."""
    origin = _header(scope, b"origin")
    if origin is None or not ({origin, "*"} & CORS_ORIGINS):
        return {}
    allowed = b"*" if "*" in CORS_ORIGINS else origin.encode("latin-1")
    return {b"access-control-allow-origin": allowed, b"vary": b"Origin"}


# what needs no key: the ingress's probes and Serve's own (its proxy answers `/-/` itself)
_PROBES = frozenset({"/health", "/ready", "/-/healthz", "/-/routes"})


def _needs_key(scope, has_body: bool) -> bool:
    """Whether this request must carry a valid key at the edge: all but a probe read (GET or
    HEAD of a probe's exact path) and a CORS preflight, and never one with a body (whatever
    its path or method, the proxy would queue that body for an ingress replica)."""
    if has_body:
        return True
    method = scope.get("method")
    if method == "OPTIONS":
        return False
    return not (method in ("GET", "HEAD") and scope.get("path", "") in _PROBES)


def _content_length(scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return None if value is None else int(value)
    except ValueError:  # the HTTP parser refuses it before an app is called
        return None


def _too_large(size: int) -> str:
    return (f"the request body is over {MAX_BODY_BYTES} bytes ({size} at least); "
            "limits.max_body_bytes bounds it")


def _extra_headers(start) -> dict[bytes, bytes]:
    keep = (b"retry-after", b"x-request-id")
    return {k.lower(): v for k, v in start.get("headers", []) if k.lower() in keep}


async def _send_json_error(send, status: int, message: str, extra: dict[bytes, bytes],
                           code: str | None = None) -> None:
    codes = {404: "not_found", 408: "request_timeout", 413: "payload_too_large",
             429: "rate_limit_exceeded", 503: "overloaded"}
    code = code or codes.get(status, "internal_error")
    EDGE_ANSWERS.inc(status=str(status), code=code)
    body = error_bytes(status, message.strip() or "error", code)
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), *extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
