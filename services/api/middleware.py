"""ASGI layers around every route: the trace id header, HEAD without a body, CORS.

`ResponseHeaders` gives every response an `x-trace-id` (the route's, else the incoming
`traceparent`'s, else a new W3C trace id), so a caller can quote one for any answer, errors and
probes included, tracing on or off. It also drops the body of a `HEAD` answer whatever the server
below does. `CORS` is Starlette's, answering a refused preflight in our error shape and with no
`Access-Control-*` header at all, so a browser learns nothing it may not use.
"""

from __future__ import annotations

import secrets

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.http_errors import error_response
from services.errors import InvalidRequest
from services.telemetry import tracing

TRACE_HEADER = "x-trace-id"
# what a browser may send and read back, beyond the CORS-safelisted ones
EXPOSED = ("x-small4-request-id", "x-small4-pool", "x-small4-reasoning-effort",
           "x-small4-spillover", TRACE_HEADER, "retry-after")


def new_trace_id() -> str:
    """A W3C trace id: 16 random bytes in lowercase hex, never all zero."""
    while (trace_id := secrets.token_hex(16)) == "0" * 32:
        pass
    return trace_id


def incoming_trace_id(headers: Headers) -> str | None:
    """The trace id of a valid incoming `traceparent`, if any."""
    return tracing.traceparent_id(headers.get("traceparent", ""))


class ResponseHeaders:
    """Adds `x-trace-id` where the route set none; sends no body for `HEAD`."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head = scope["method"] == "HEAD"
        fallback = incoming_trace_id(Headers(scope=scope)) or new_trace_id()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if TRACE_HEADER not in headers:
                    headers[TRACE_HEADER] = fallback
            elif message["type"] == "http.response.body" and head:
                message = {**message, "body": b""}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class CORS(CORSMiddleware):
    """Starlette's CORS for `origins`; a refused preflight is our 400, without CORS headers."""

    def __init__(self, app: ASGIApp, origins: list[str]):
        super().__init__(app, allow_origins=origins, allow_methods=("GET", "HEAD", "POST"),
                         allow_headers=("*",), expose_headers=EXPOSED, max_age=600)

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        failed = bytes(response.body).decode().removeprefix("Disallowed CORS ").split(", ")
        param = "origin" if failed[0] == "origin" else f"access-control-request-{failed[0]}"
        return error_response(InvalidRequest(
            f"CORS preflight refused: this {', '.join(failed)} is not allowed", param=param))
