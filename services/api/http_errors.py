"""The one place errors become HTTP responses or SSE error events."""

from __future__ import annotations

import json
import logging
import math

from starlette.responses import JSONResponse

from services.api import responses
from services.context import new_request_id
from services.errors import StackError, from_exception

log = logging.getLogger("small4.ingress")


def as_stack_error(exc: BaseException) -> StackError:
    """Our typed error for any exception; unexpected ones are logged, never leaked."""
    error = from_exception(exc)
    if error.status >= 500 and not isinstance(exc, StackError):
        # its type, and the traceback (which shows str(exc)): a repr may hold far more (a
        # UnicodeDecodeError's holds the whole object it failed to decode)
        log.error("unexpected error: %s", type(exc).__name__, exc_info=exc)
    return error


# Messages quote the caller's input (a model name, a union tag, a header): an error never echoes
# more than this many characters of it back.
MAX_MESSAGE_CHARS = 1000


def error_body(error: StackError, request_id: str | None = None,
               trace_id: str | None = None) -> dict:
    """`error.body` with its message and param clipped to a bounded size and encodable: a lone
    surrogate quoted from the caller's JSON (`"\\ud800"` is valid JSON, not valid UTF-8) is
    written as its escape, or the response could not be sent (a 500 for a 400)."""
    body = error.body(request_id, trace_id)
    inner = body["error"]
    message = _encodable(str(inner["message"]))
    inner["message"] = (message if len(message) <= MAX_MESSAGE_CHARS
                        else f"{message[:MAX_MESSAGE_CHARS]}… (clipped)")
    if isinstance(inner.get("param"), str):
        param = _encodable(inner["param"])
        inner["param"] = param if len(param) <= 200 else param[:200] + "…"
    return responses.error(body)


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(exc: BaseException, request_id: str | None = None,
                   trace_id: str | None = None) -> JSONResponse:
    """An OpenAI-style JSON error with the request and trace ids in the body and headers;
    an error outside a chat request (a probe, the model card, a bad route) gets its own id."""
    error = as_stack_error(exc)
    request_id = request_id or new_request_id()
    headers = {"x-small4-request-id": request_id} if request_id else {}
    if trace_id:
        headers["x-trace-id"] = trace_id
    if error.retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(error.retry_after)))
    return JSONResponse(error_body(error, request_id, trace_id), status_code=error.status,
                        headers=headers)


# Characters JSON leaves raw that `str.splitlines()` (and clients built on it) break lines at;
# SSE itself ends lines only at CR and LF, which JSON always escapes.
_LINE_BREAKERS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def sse_event(body: dict) -> str:
    """One SSE `data:` event: the body as JSON on one line for any client's line splitting."""
    return f"data: {json.dumps(body, ensure_ascii=False).translate(_LINE_BREAKERS)}\n\n"


def sse_error(exc: BaseException, request_id: str, trace_id: str | None = None) -> str:
    """An SSE `data:` event carrying the error body, for errors after the stream started."""
    return sse_event(error_body(as_stack_error(exc), request_id, trace_id))
