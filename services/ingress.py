"""The OpenAI-compatible HTTP ingress: the FastAPI adapter around the request service.

Routes, the key check (one dependency for every keyed route), and HTTP's side of answers:
`Refused` becomes an error response, an `Answer` a JSON body or an SSE stream. What a chat
request goes through (plan, encode, route, answer, accounting) is `services/api/service.py`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import Depends, FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, StreamingResponse

from services.api import openapi, responses
from services.api.http_errors import error_response
from services.api.middleware import CORS, ResponseHeaders, incoming_trace_id, new_trace_id
from services.api.service import Answer, Refused, RequestService
from services.errors import (MethodNotAllowed, ModelNotFound, NotFound, ReaderStalled,
                             RequestAborted, StackError, clip)
from services.guard.body import read_json
from services.guard.keys import ANONYMOUS, KeyRing, Principal
from services.settings import IngressSettings
from services.telemetry import metrics
from services.telemetry.logs import LOGGER, request_line
from services.workers.decode import DecodeWorker
from services.workers.peer import call

MAX_LOGGED_PATH = 200  # characters of a refused request's path that its log line keeps
# what a send may take past the deadline: the event saying the deadline passed is sent after
# it (with none, a send that waited at all cut the stream without it, charged as a stall)
FINAL_EVENT_GRACE_S = 1.0
READY_CALL_S = 5.0  # how long /ready waits for a pool's answer


class Ingress:
    """HTTP front door; `pools` maps pool name to that pool's decode peer, `multimodal` is the
    image preprocessing peer (None: images are refused), `prefills` each pool's prefill peer
    (the request service runs first legs itself when given)."""

    def __init__(self, settings: IngressSettings, pools: dict[str, Any],
                 multimodal: Any = None, prefills: dict[str, Any] | None = None):
        self.settings = settings
        self.service = RequestService(settings, pools, multimodal, prefills)
        self.created = int(time.time())
        self.spec = openapi.build(settings)
        metrics.show_tenants(settings.telemetry.tenant_labels)
        auth = settings.auth
        self.keys = KeyRing(auth.keys_file, auth.reload_s) if auth.enabled else None
        if self.keys is None:
            self.service.log.warning("auth.enabled is false: requests are served without API "
                                     "keys")

    def build_asgi_app(self) -> FastAPI:
        """The FastAPI app of this replica (built after construction, routes bound to self)."""
        app = FastAPI(title="small4", docs_url=None, redoc_url=None, openapi_url=None)
        keyed = [Depends(self.authenticate)]
        app.post("/v1/chat/completions", dependencies=keyed)(self.chat_completions)
        read = ["GET", "HEAD"]  # HEAD answers like GET, without the body
        app.api_route("/v1/models", methods=read, dependencies=keyed)(self.models)
        app.api_route("/v1/models/{model:path}", methods=read, dependencies=keyed)(self.model)
        app.get("/openapi.json", dependencies=keyed)(self.openapi_spec)
        app.api_route("/health", methods=read)(self.health)
        app.api_route("/ready", methods=read)(self.ready)
        app.add_exception_handler(StarletteHTTPException, _http_exception)
        app.add_exception_handler(StackError, _stack_error)
        app.add_exception_handler(Exception, lambda request, exc: error_response(exc))
        if self.settings.auth.cors_origins:
            app.add_middleware(CORS, origins=list(self.settings.auth.cors_origins))
        app.add_middleware(ResponseHeaders)  # outermost: every answer gets a trace id
        return app

    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    async def authenticate(self, request: Request) -> Principal:
        """The caller (401 without a valid key); everyone is anonymous when auth is off. Once
        per request: the routes read it back with `principal`. A coroutine so FastAPI runs it
        on the event loop: a plain function would be handed to its thread pool, a thread
        switch on every request's critical path (the key ring's lookup is in memory; its
        reload is a `stat` every `reload_s`)."""
        principal = ANONYMOUS if self.keys is None else self.keys.authenticate(
            request.headers.get("authorization"))
        request.state.principal = principal
        return principal

    async def openapi_spec(self):
        """The OpenAPI spec of this deployment (keyed like every route but the probes)."""
        return self.spec

    async def models(self):
        return responses.model_list([self._model_card()])

    async def model(self, model: str):
        """The served model's card (`client.models.retrieve`); 404 for any other id."""
        if model != self.settings.model.name:
            raise ModelNotFound(f"the model {clip(model)} does not exist; this endpoint "
                                f"serves {self.settings.model.name!r}", param="model")
        return self._model_card()

    def _model_card(self) -> dict[str, Any]:
        model = self.settings.model
        return responses.model_card(
            id=model.name, created=self.created, owned_by="small4",
            engine=self.settings.engine_kind, context_length=model.context_length,
            pools={n: p.effort for n, p in self.settings.pools.items()})

    async def ready(self) -> JSONResponse:
        """200 when every pool has a live decode and prefill replica, else 503 with details.
        The pools are asked at once (one after another, a probe took up to 5 s per pool); a
        pool that does not answer within `READY_CALL_S` but handed this replica tokens from
        both roles within `SERVING_S` is ready (`busy`): saturated, not down."""
        async def pool(name: str) -> dict[str, Any]:
            try:
                legs = await asyncio.wait_for(call(self.service.pools[name],
                                                   DecodeWorker.readiness), READY_CALL_S)
                return {role: s.healthy for role, s in legs.items()}
            except Exception as exc:
                # a pool saturated with streams answers only after them (the call queues in
                # Serve like any other): tokens from both its roles just now say it serves
                if self.service.serving(name):
                    return {"prefill": True, "decode": True, "busy": True}
                return {"error": type(exc).__name__}

        names = list(self.service.pools)
        report = dict(zip(names, await asyncio.gather(*(pool(n) for n in names))))
        ok = all("error" not in legs and all(legs.values()) for legs in report.values())
        return JSONResponse({"ready": ok, "pools": report}, status_code=200 if ok else 503)

    async def chat_completions(self, request: Request):
        answer = await self.service.chat(request.state.principal, request.headers,
                                         lambda: read_json(request, self.settings.limits))
        if isinstance(answer, Refused):
            return error_response(answer.error, answer.request_id, answer.trace_id)
        if answer.stream:
            return _AnswerStream(answer, self.settings.limits.write_stall_s)
        try:
            return JSONResponse(await answer.body(), headers=answer.headers)
        except StackError as exc:
            return error_response(exc, answer.ctx.request_id, answer.record.trace_id)


class _AnswerStream(StreamingResponse):
    """An answer's SSE stream, which closes the answer however the response ends.

    The answer's events close it when they end, are cut, or are closed; but Starlette may
    cancel the stream before iterating them at all (the client left while the response's head
    was being sent, a cancelled call), and an async generator never started runs no clean-up:
    its request would keep its key's stream slot, its pool's in-flight count and its KV."""

    def __init__(self, answer: Answer, write_stall_s: float):
        super().__init__(answer.events(), headers=answer.headers,
                         media_type="text/event-stream")
        self.answer, self.write_stall_s = answer, write_stall_s

    async def __call__(self, scope, receive, send) -> None:
        async def bounded_send(message) -> None:
            """A client that stops reading (its TCP window closed) would hold the send, and
            with it the key's stream slot and the pool's place, for ever: each event must be
            taken within `limits.write_stall_s`, and never long after the request's deadline
            (`FINAL_EVENT_GRACE_S`)."""
            left = self.answer.ctx.remaining_s()
            async with asyncio.timeout(self.write_stall_s if left is None else min(
                    self.write_stall_s, max(left, FINAL_EVENT_GRACE_S))):
                await send(message)

        try:
            await super().__call__(scope, receive, bounded_send)
        except TimeoutError:  # returning unfinished, the server drops the connection
            await self.answer.close(ReaderStalled("the client stopped reading the stream"))
        finally:
            try:
                await self.body_iterator.aclose()  # its own clean-up, if it started
            finally:  # a no-op once that closed it
                await self.answer.close(
                    RequestAborted("the client went away before the stream started"))


async def _stack_error(request: Request, exc: StackError) -> JSONResponse:
    """A route's refusal outside the request service (the key check, an unknown model id):
    counted, in our error shape."""
    metrics.ERRORS.inc(pool="none", role="ingress", type=exc.type)
    return _refused(request, exc)


def _refused(request: Request, error: StackError) -> JSONResponse:
    """A refusal outside the request service, logged as the service logs its own (a run of
    401s is what an SRE looks for after a key rotation), under the trace id it reports."""
    trace_id = _trace_of(request)
    request_line(logging.getLogger(LOGGER), "request refused", request_id=None,
                 trace_id=trace_id, started=time.perf_counter(), status=error.status,
                 error_type=error.type, method=request.method,
                 path=request.url.path[:MAX_LOGGED_PATH])
    return error_response(error, trace_id=trace_id)


def _trace_of(request: Request) -> str:
    """The trace id a refusal outside the request service reports, in its body and its
    `x-trace-id` alike: the client's (a valid traceparent's), else a new one."""
    return incoming_trace_id(request.headers) or new_trace_id()


async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's routing errors in our error shape, keeping their headers (405's `Allow`)."""
    if exc.status_code == 404:
        return _refused(request, NotFound(f"no route {request.method} {request.url.path}"))
    if exc.status_code == 405:
        error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
    else:
        error = StackError(str(exc.detail))
        error.status, error.type = exc.status_code, "invalid_request_error"
    response = _refused(request, error)
    response.headers.update(exc.headers or {})
    return response
