"""Typed, picklable errors with an HTTP status and an OpenAI-style body.

Every error that crosses a Ray hop is one of these (pydantic's own errors do not survive Ray's
exception wrapping), and the ingress maps them to HTTP or to an SSE error event in one place.
"""

from __future__ import annotations

import math


class StackError(Exception):
    """Base error: `status`, OpenAI `type`, the offending `param`, a machine `code`."""

    status = 500
    type = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 request_id: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.code
        self.request_id = request_id
        self.retry_after = retry_after

    def __reduce__(self):
        return (_rebuild, (type(self), self.message, self.param, self.code, self.request_id,
                           self.retry_after))

    def body(self, request_id: str | None = None, trace_id: str | None = None) -> dict:
        """The OpenAI error body: `{"error": {"message", "type", "param", "code", ...}}`."""
        error = {"message": self.message, "type": self.type, "param": self.param,
                 "code": self.code}
        rid = request_id or self.request_id
        if rid:
            error["request_id"] = rid
        if trace_id:
            error["trace_id"] = trace_id
        return {"error": error}


def clip(value: object, limit: int = 200) -> str:
    """`repr(value)` cut to `limit` characters, for quoting a caller's input in a message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _rebuild(cls, message, param, code, request_id, retry_after=None):
    return cls(message, param=param, code=code, request_id=request_id, retry_after=retry_after)


class InvalidRequest(StackError):
    """The client's request is malformed or out of range (400)."""

    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    """The prompt plus the requested output does not fit the model's context (400)."""

    code = "context_length_exceeded"


class InputRejected(InvalidRequest):
    """The engine could not process the request's input (400): deterministic, so it is answered
    once and never retried on another replica (each would fail the same way)."""

    code = "input_rejected"


class ModelNotFound(StackError):
    """The request names a model this endpoint does not serve (404)."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(StackError):
    """No such route (404)."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(StackError):
    """The route exists but not for this method (405, with `Allow`)."""

    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class Unauthorized(StackError):
    """No valid API key (401); the same answer for a missing, unknown or revoked key."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class RateLimited(StackError):
    """The key is over one of its quotas (429, with `retry_after`)."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


def over_token_quota(tokens: int, key: str, tokens_per_min: float,
                     wait_s: float) -> RateLimited:
    """The 429 of a request needing `tokens` its key cannot pay now: `wait_s` until it can
    (infinite: never, more than the key's bucket holds)."""
    if math.isinf(wait_s):
        return RateLimited(f"the request needs {tokens} tokens (prompt + max_tokens) or more; "
                           f"key {key!r} has {tokens_per_min:g} tokens/min", retry_after=60.0,
                           code="tokens_per_min_exceeded")
    return RateLimited(f"key {key!r} is over {tokens_per_min:g} tokens/min",
                       retry_after=wait_s, code="tokens_per_min_exceeded")


class PayloadTooLarge(InvalidRequest):
    """The request body, or a part of it, is larger than the endpoint accepts (413)."""

    status = 413
    code = "payload_too_large"


class RequestTimeout(InvalidRequest):
    """The client did not send its request (body) in time (408)."""

    status = 408
    code = "request_timeout"


class UnsupportedMediaType(InvalidRequest):
    """The body is not in a format the endpoint reads: JSON in UTF-8 (415)."""

    status = 415
    code = "unsupported_media_type"


class DeadlineExceeded(StackError):
    """The request's deadline passed before it finished (504)."""

    status = 504
    type = "timeout_error"
    code = "deadline_exceeded"


class Overloaded(StackError):
    """No capacity right now; retry later (503)."""

    status = 503
    type = "overloaded_error"
    code = "overloaded"


class RequestAborted(StackError):
    """The request was cancelled (client gone or aborted) before it finished (499-style)."""

    status = 499
    type = "request_aborted"
    code = "aborted"


class ReaderStalled(RequestAborted):
    """The client stopped reading its stream and the server cut it (its decode ran on)."""


class KVHandoffFailed(StackError):
    """The KV cache could not be handed from prefill to decode (502)."""

    status = 502
    type = "upstream_error"
    code = "kv_handoff_failed"


class EngineError(StackError):
    """An engine failed while serving the request (500)."""

    status = 500
    type = "internal_error"
    code = "engine_error"


class EngineUnavailable(StackError):
    """An engine (or its replica) is gone or not answering; another replica may serve (503)."""

    status = 503
    type = "overloaded_error"
    code = "engine_unavailable"


class DecodeStepFailed(EngineUnavailable):
    """A decode step failed its whole batch (500, not 503: nothing says capacity will come
    back). Resumed like a replica's failure, since no request of the batch is known to have
    caused it; a request that caused it (an input that breaks the step wherever it runs)
    fails each batch it is resumed into, up to `limits.max_resumes`, then gets this."""

    status = 500
    type = "internal_error"
    code = "decode_step_failed"


class PixelsLost(StackError):
    """The replica that kept a request's pixels went away (its store objects with it): no
    retry here can fetch them, the client's resend can (503, not retried by the stack)."""

    status = 503
    type = "overloaded_error"
    code = "pixels_lost"


# Ray's exceptions for a replica that died or cannot be reached (matched by name, anywhere in
# the exception's class hierarchy, so this module does not import Ray).
_REPLICA_GONE = {"RayActorError", "ActorDiedError", "ActorUnavailableError",
                 "WorkerCrashedError", "NodeDiedError", "OwnerDiedError"}


# Python's, Ray's object store's and worker OOM killer's, torch's (matched by name)
_OUT_OF_MEMORY = {"MemoryError", "ObjectStoreFullError", "OutOfMemoryError"}


def retryable(exc: BaseException | None) -> bool:
    """Whether `exc` means the replica failed, not the request: another replica may serve it."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, EngineUnavailable):
            return True
        if isinstance(exc, StackError):
            return False
        if any(c.__name__ in _REPLICA_GONE for c in type(exc).__mro__):
            return True
        exc, seen = getattr(exc, "cause", None) or exc.__cause__, seen + 1
    return False


def from_exception(exc: BaseException) -> StackError:
    """Unwrap Ray's exception wrappers to our typed error; anything else becomes `EngineError`."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, StackError):
            return exc
        cause = getattr(exc, "cause", None) or exc.__cause__
        if cause is None:
            break
        exc, seen = cause, seen + 1
    if type(exc).__name__ == "ClientDisconnect":  # starlette's, matched by name
        return RequestAborted("the client went away before the request was read")
    if any(c.__name__ in _OUT_OF_MEMORY for c in type(exc).__mro__):
        # a replica short of memory (an image decode, a full object store, an engine's
        # allocation): capacity, not a fault of the request or the code; try again later
        return Overloaded(f"the stack ran out of memory serving the request "
                          f"({type(exc).__name__}); try again later", retry_after=2.0)
    if retryable(exc):
        return EngineUnavailable(f"a replica failed while serving the request "
                                 f"({type(exc).__name__})")
    return EngineError(f"internal error: {type(exc).__name__}")
