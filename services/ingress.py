"""The OpenAI-compatible HTTP ingress: validates, encodes, picks a pool, streams the answer.

It owns the wire format: pools see token ids and sampling params, and send token ids back in
chunks, which the ingress parses into content, `reasoning_content` and `tool_calls`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI, Request
from opentelemetry.trace import SpanKind
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, StreamingResponse

from services.api import openapi, responses
from services.api.http_errors import as_stack_error, error_response, sse_error, sse_event
from services.api.middleware import CORS, ResponseHeaders, new_trace_id
from services.api.output import OutputParser
from services.api.plan import (RequestPlan, admit, constrain, plan_request, prompt_floor,
                               structured_request, tools_of)
from services.api.schemas import parse_chat_request
from services.context import RequestContext, new_request_id
from services.errors import (DeadlineExceeded, EngineError, InvalidRequest, MethodNotAllowed,
                             ModelNotFound, NotFound, RequestAborted, StackError, clip,
                             retryable)
from services.guard.body import read_json
from services.guard.keys import ANONYMOUS, KeyRing, Principal
from services.guard.quotas import Grant, Quotas
from services.guard.uploads import Uploads
from services.multimodal.preprocess import image_parts
from services.routing import PoolChoice, cache_salt, choose_pool
from services.settings import IngressSettings
from services.telemetry import metrics, tracing
from services.telemetry.logs import configure_logging, request_line
from services.grammar import field_of, warmed
from services.tokenizer import EncodedPrompt, PromptTokenizer, load_tokenizer
from services.workers.decode import DecodeWorker
from services.workers.multimodal import MultimodalWorker
from services.workers.peer import call, close_stream, stream


class Ingress:
    """HTTP front door; `pools` maps pool name to that pool's decode peer, `multimodal` is the
    image preprocessing peer (None: images are refused)."""

    def __init__(self, settings: IngressSettings, pools: dict[str, Any],
                 multimodal: Any = None):
        self.settings = settings
        self.pools = pools
        self.multimodal = multimodal
        self.tokenizer = load_tokenizer(settings.model.tokenizer_file())
        self.guidance = warmed(self.tokenizer)
        self.in_flight = {name: 0 for name in pools}
        self.created = int(time.time())
        self.spec = openapi.build(settings)
        tracing.configure(settings.telemetry.tracing, role="ingress")
        metrics.show_tenants(settings.telemetry.tenant_labels)
        self.log = configure_logging(settings.telemetry.json_logs)
        auth = settings.auth
        self.keys = KeyRing(auth.keys_file, auth.reload_s) if auth.enabled else None
        self.quotas = Quotas(auth.default_quota)
        self.uploads = Uploads(settings.limits)
        self.token_bytes = _max_token_bytes(self.tokenizer)
        if self.keys is None:
            self.log.warning("auth.enabled is false: requests are served without API keys")

    def build_asgi_app(self) -> FastAPI:
        """The FastAPI app of this replica (built after construction, routes bound to self)."""
        app = FastAPI(title="small4", docs_url=None, redoc_url=None, openapi_url=None)
        app.post("/v1/chat/completions")(self.chat_completions)
        read = ["GET", "HEAD"]  # HEAD answers like GET, without the body
        app.api_route("/v1/models", methods=read)(self.models)
        app.api_route("/v1/models/{model:path}", methods=read)(self.model)
        app.get("/openapi.json")(self.openapi_spec)
        app.api_route("/health", methods=read)(self.health)
        app.api_route("/ready", methods=read)(self.ready)
        app.add_exception_handler(StarletteHTTPException, _http_exception)
        app.add_exception_handler(Exception, lambda request, exc: error_response(exc))
        if self.settings.auth.cors_origins:
            app.add_middleware(CORS, origins=list(self.settings.auth.cors_origins))
        app.add_middleware(ResponseHeaders)  # outermost: every answer gets a trace id
        return app

    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    def authenticate(self, request: Request) -> Principal:
        """The caller (401 without a valid key); everyone is anonymous when auth is off."""
        if self.keys is None:
            return ANONYMOUS
        return self.keys.authenticate(request.headers.get("authorization"))

    async def openapi_spec(self, request: Request):
        """The OpenAPI spec of this deployment (keyed like every route but the probes)."""
        try:
            self.authenticate(request)
        except StackError as exc:
            return error_response(exc)
        return self.spec

    async def models(self, request: Request):
        try:
            self.authenticate(request)
        except StackError as exc:
            return error_response(exc)
        return responses.model_list([self._model_card()])

    async def model(self, model: str, request: Request):
        """The served model's card (`client.models.retrieve`); 404 for any other id."""
        try:
            self.authenticate(request)
            if model != self.settings.model.name:
                raise ModelNotFound(f"the model {clip(model)} does not exist; this endpoint "
                                    f"serves {self.settings.model.name!r}", param="model")
        except StackError as exc:
            return error_response(exc)
        return self._model_card()

    def _model_card(self) -> dict[str, Any]:
        model = self.settings.model
        return responses.model_card(
            id=model.name, created=self.created, owned_by="small4",
            engine=self.settings.engine_kind, context_length=model.context_length,
            pools={n: p.effort for n, p in self.settings.pools.items()})

    async def ready(self) -> JSONResponse:
        """200 when every pool has a live decode and prefill replica, else 503 with details."""
        report, ok = {}, True
        for name, peer in self.pools.items():
            try:
                legs = await asyncio.wait_for(call(peer, DecodeWorker.readiness), 5.0)
                report[name] = {role: s.healthy for role, s in legs.items()}
                ok &= all(report[name].values())
            except Exception as exc:
                report[name], ok = {"error": type(exc).__name__}, False
        return JSONResponse({"ready": ok, "pools": report}, status_code=200 if ok else 503)

    async def chat_completions(self, request: Request):
        request_id, started = new_request_id(), time.perf_counter()
        incoming = _trace_headers(request)
        span = tracing.start("POST /v1/chat/completions", incoming, kind=SpanKind.SERVER, **{
            "http.request.method": "POST", "url.path": "/v1/chat/completions",
            "small4.request_id": request_id})
        trace_id = tracing.trace_id(span, incoming) or new_trace_id()
        principal, grant = ANONYMOUS, None
        limits = self.settings.limits
        try:
            # cheapest first: the key, the deadline header, the key's request and stream
            # quota, an upload slot; only then is the body read (checked as it streams in),
            # sized against the context and token quota, and only then tokenised
            principal = self.authenticate(request)
            span.set_attribute("small4.tenant", principal.tenant)
            deadline = time.time() + self._timeout(request)
            grant = self.quotas.admit_request(principal)
            with tracing.scope("preprocess", span) as pre:
                async with self.uploads.slot(principal.ident):
                    body = await read_json(request, limits)
                req = parse_chat_request(body)
                effort = admit(req, model=self.settings.model, routing=self.settings.routing,
                               limits=limits)
                floor = prompt_floor(req, self.token_bytes, model=self.settings.model)
                self.quotas.check_tokens(grant, floor)
                prompt = await self._encode(req, effort, request_id, pre, deadline)
                plan = plan_request(req, request_id, effort=effort, prompt=prompt,
                                    model=self.settings.model, limits=limits,
                                    vocab_size=self.tokenizer.vocab_size)
                structure = structured_request(plan, limits)
                if structure.constrained:
                    if self.settings.engine_kind == "sglang":
                        raise InvalidRequest(
                            f"{field_of(structure)}: constrained decoding is not available on "
                            "this deployment's SGLang engines (their grammar backends cannot "
                            "take the Mistral tokenizer)", param=field_of(structure))
                    # compiled off the event loop: schemas vary in cost
                    constrain(plan, await asyncio.to_thread(self.guidance.grammar, structure))
                pre.set_attributes({"small4.prompt_tokens": plan.prompt_tokens,
                                    "small4.images": len(plan.engine_request.images)})
                plan.engine_request.cache_salt = cache_salt(principal.tenant,
                                                            self.settings.routing.prefix)
            self.quotas.charge(grant, plan.prompt_tokens + plan.engine_request.sampling.max_tokens)
            with tracing.scope("route", span, **{"small4.effort": plan.effort}) as route:
                choice = self._choose(plan.effort)
                route.set_attributes({"small4.pool": choice.pool,
                                      "small4.spillover": choice.spilled})
        except Exception as exc:
            if grant is not None:
                self.quotas.release(grant, 0)
            return self._refuse(exc, span, request_id, trace_id, started,
                                tenant=principal.tenant)
        ctx = RequestContext(request_id, deadline=deadline,
                             trace_headers=tracing.headers_of(span, incoming),
                             tenant=principal.tenant)
        return await self._serve(plan, choice, ctx, _Trace(span, trace_id, started), grant)

    def _timeout(self, request: Request) -> float:
        """Seconds this request may take: `x-request-timeout`, capped, or the default."""
        limits, raw = self.settings.limits, request.headers.get("x-request-timeout")
        if raw is None:
            return limits.request_timeout_s
        try:
            asked = float(raw)
        except ValueError:
            asked = float("nan")
        if not 0 < asked <= limits.max_request_timeout_s:
            raise InvalidRequest(f"x-request-timeout must be seconds in (0, "
                                 f"{limits.max_request_timeout_s:g}]; got {clip(raw)}",
                                 param="x-request-timeout")
        return asked

    async def _encode(self, req, effort: str, request_id: str, span,
                      deadline: float | None = None) -> EncodedPrompt:
        """Text stays here; a request with images is encoded by the multimodal deployment."""
        messages, tools = req.openai_messages(), tools_of(req)
        if not image_parts(messages):
            return self.tokenizer.encode_chat(messages, effort=effort, tools=tools)
        if self.multimodal is None:
            raise InvalidRequest("this endpoint does not accept images", param="messages")
        ctx = RequestContext(request_id, deadline=deadline,
                             trace_headers=tracing.headers_of(span))
        return await call(self.multimodal, MultimodalWorker.encode, ctx, messages, effort, tools)

    def _refuse(self, exc: BaseException, span, request_id: str, trace_id: str | None,
                started: float, pool: str = "none", tenant: str = "anonymous") -> JSONResponse:
        """The error response for a request that never streamed; counted, logged, traced."""
        error = as_stack_error(exc)
        response = error_response(error, request_id, trace_id)
        error_type = error.type
        metrics.ERRORS.inc(pool=pool, role="ingress", type=error_type)
        metrics.REQUESTS.inc(tenant=tenant, pool=pool, status=str(response.status_code))
        tracing.finish(span, exc, **{"http.response.status_code": response.status_code})
        request_line(self.log, "request refused", request_id=request_id, trace_id=trace_id,
                     started=started, status=response.status_code, error_type=error_type)
        return response

    def _choose(self, effort: str) -> PoolChoice:
        choice = choose_pool(effort, self.settings.pools, self.in_flight, self.settings.routing)
        if choice.spilled:
            metrics.SPILLOVER.inc(from_pool=choice.home_pool, to_pool=choice.pool)
        return choice

    async def _serve(self, plan: RequestPlan, choice: PoolChoice, ctx: RequestContext,
                     trace: _Trace, grant: Grant | None):
        self.in_flight[choice.pool] += 1
        answer = _Answer(self, plan, choice, ctx, trace, grant)
        try:
            first = await answer.next_chunk()
        except BaseException as exc:
            await self._release(choice, answer.chunks)
            self.quotas.release(grant, 0)
            if isinstance(exc, asyncio.CancelledError):
                metrics.ERRORS.inc(pool=choice.pool, role="ingress", type=RequestAborted.type)
                tracing.finish(trace.span, exc)
                raise
            return self._refuse(exc, trace.span, ctx.request_id, trace.trace_id, trace.started,
                                choice.pool, ctx.tenant)
        metrics.TTFT.observe(time.perf_counter() - trace.started, pool=choice.pool,
                             role="ingress")
        headers = {"x-small4-request-id": ctx.request_id, "x-small4-pool": choice.pool,
                   "x-small4-reasoning-effort": plan.effort,
                   "x-small4-spillover": "1" if choice.spilled else "0"}
        if trace.trace_id:
            headers["x-trace-id"] = trace.trace_id
        if plan.request.stream:
            # no cache or proxy may hold the events back
            headers |= {"cache-control": "no-cache", "x-accel-buffering": "no"}
            return StreamingResponse(answer.sse(first), headers=headers,
                                     media_type="text/event-stream")
        try:
            return JSONResponse(await answer.collect(first), headers=headers)
        except StackError as exc:
            answer.error = exc
            return error_response(exc, ctx.request_id, trace.trace_id)
        except asyncio.CancelledError:
            answer.error = RequestAborted("the client went away before the answer was sent")
            raise
        finally:
            await answer.close()

    async def _release(self, choice: PoolChoice, chunks) -> None:
        self.in_flight[choice.pool] -= 1
        if chunks is not None:
            await close_stream(chunks)


@dataclass
class _Trace:
    """The request's server span, its trace id, and when the request arrived."""

    span: Any
    trace_id: str | None
    started: float


class _Answer:
    """One request's output: owns the decode stream (resumed on another replica when one
    dies), enforces the deadline, parses chunks into the body or SSE events."""

    def __init__(self, ingress: Ingress, plan: RequestPlan, choice: PoolChoice,
                 ctx: RequestContext, trace: _Trace, grant: Grant | None):
        self.ingress, self.plan, self.choice, self.trace = ingress, plan, choice, trace
        self.ctx, self.grant = ctx, grant
        self.generated: list[int] = []
        self.cached_tokens = 0  # of the prompt, reused from a prefix cache (first leg's)
        self.resumes = 0
        self.chunks = self._open(plan.engine_request)
        self.error: BaseException | None = None
        self.finish_reason: str | None = None
        self.parser = OutputParser(ingress.tokenizer, tools_enabled=plan.tools_enabled,
                                   stop=plan.request.stop_strings)
        self.meta = {"id": ctx.request_id, "created": int(ctx.created),
                     "model": ingress.settings.model.name, "reasoning_effort": plan.effort,
                     "pool": choice.pool}

    def usage(self) -> dict[str, Any]:
        return responses.usage(self.plan.prompt_tokens, self.parser.completion_tokens,
                               self.parser.reasoning_tokens, self.cached_tokens)

    def _open(self, request):
        return stream(self.ingress.pools[self.choice.pool], DecodeWorker.generate, self.ctx,
                      request)

    async def next_chunk(self):
        """The next chunk within the deadline. When the decode replica (or an engine) fails,
        the stream resumes on another replica from the prompt plus the tokens already
        received, so the client sees no gap and no repeat (sampling is keyed by position)."""
        while True:
            try:
                async with asyncio.timeout(self.ctx.remaining_s()):
                    chunk = await self.chunks.__anext__()
                if not self.resumes and "cached_tokens" in chunk.timings:
                    # the first leg's: on the first chunk, or the last where the prefill's
                    # reply came after decoding started (the concurrent handoff)
                    self.cached_tokens = int(chunk.timings["cached_tokens"] or 0)
                self.generated.extend(chunk.token_ids)
                return chunk
            except StopAsyncIteration:
                raise EngineError("the decode stream ended without a finish reason") from None
            except TimeoutError:
                raise DeadlineExceeded("the request's deadline passed before it finished "
                                       "(x-request-timeout or limits.request_timeout_s)",
                                       param="x-request-timeout") from None
            except Exception as exc:
                if not retryable(exc) or self.resumes >= self.ingress.settings.limits.max_resumes:
                    raise
                self.resumes += 1
                metrics.RESUMES.inc(pool=self.choice.pool)
                await close_stream(self.chunks)
                await asyncio.sleep(0.1 * self.resumes)  # let Serve see the replica is gone
                self.chunks = self._open(self._resumed())

    def _resumed(self):
        """The original request continued after the tokens already received."""
        request = self.plan.engine_request
        return replace(request, request_id=f"{request.request_id}-resume{self.resumes}",
                       prompt_ids=request.prompt_ids + self.generated,
                       sampling=replace(request.sampling, max_tokens=request.sampling.max_tokens
                                        - len(self.generated),
                                        stop_context=tuple(self.generated)))

    async def _chunks(self, first):
        chunk = first
        while True:
            yield chunk
            if chunk.finish_reason:
                return
            chunk = await self.next_chunk()

    def _logprobs(self, chunk) -> list[dict[str, Any]] | None:
        """The chunk's logprob entries when the request asked for logprobs, else None."""
        if self.plan.engine_request.sampling.logprobs is None:
            return None
        return responses.logprob_entries(chunk.logprobs or (), self.ingress.tokenizer)

    async def collect(self, first) -> dict[str, Any]:
        content, reasoning, calls, finish = [], [], [], "stop"
        entries = [] if self.plan.engine_request.sampling.logprobs is not None else None
        async for chunk in self._chunks(first):
            if entries is not None:
                entries += self._logprobs(chunk)
            delta = self.parser.feed(chunk.token_ids)
            content.append(delta.content), reasoning.append(delta.reasoning)
            calls.extend(delta.tool_calls)
            finish = chunk.finish_reason or finish
        delta, finish = self.parser.finish(finish)
        content.append(delta.content), reasoning.append(delta.reasoning)
        calls.extend(delta.tool_calls)
        self.finish_reason = finish
        return responses.completion(self.meta, content="".join(content),
                                    reasoning="".join(reasoning), tool_calls=calls,
                                    finish_reason=finish, usage_body=self.usage(),
                                    logprob_list=entries,
                                    legacy_functions=self.plan.request.legacy_functions)

    async def close(self) -> None:
        """Release the pool slot, stop the stream, and account for the request once."""
        await self.ingress._release(self.choice, self.chunks)
        used = self.plan.prompt_tokens + self.parser.completion_tokens
        self.ingress.quotas.release(self.grant, used)
        pool, trace, tenant = self.choice.pool, self.trace, self.ctx.tenant
        status = "200" if self.error is None else str(as_stack_error(self.error).status)
        metrics.REQUESTS.inc(tenant=tenant, pool=pool, status=status)
        metrics.TENANT_TOKENS.inc(self.plan.prompt_tokens, tenant=tenant, kind="prompt")
        metrics.TENANT_TOKENS.inc(self.parser.completion_tokens, tenant=tenant,
                                  kind="completion")
        if self.finish_reason:
            metrics.PROMPT_TOKENS.inc(self.plan.prompt_tokens, pool=pool)
            metrics.COMPLETION_TOKENS.inc(self.parser.completion_tokens, pool=pool)
            metrics.REASONING_TOKENS.inc(self.parser.reasoning_tokens, pool=pool)
        if self.error is not None:
            metrics.ERRORS.inc(pool=pool, role="ingress",
                               type=getattr(self.error, "type", "internal_error"))
        metrics.E2E.observe(time.perf_counter() - trace.started, pool=pool, role="ingress")
        tracing.finish(trace.span, self.error, **{
            "small4.finish_reason": self.finish_reason or "abort",
            "small4.completion_tokens": self.parser.completion_tokens})
        request_line(self.ingress.log, "request done", request_id=self.meta["id"],
                     trace_id=trace.trace_id, started=trace.started, pool=pool,
                     finish_reason=self.finish_reason or "abort",
                     prompt_tokens=self.plan.prompt_tokens,
                     completion_tokens=self.parser.completion_tokens,
                     error_type=getattr(self.error, "type", None))

    async def sse(self, first):
        include_usage = bool(self.plan.request.stream_options
                             and self.plan.request.stream_options.include_usage)
        n_calls, legacy = 0, self.plan.request.legacy_functions
        try:
            # with include_usage every chunk has `usage`: null until the last one, as OpenAI's
            yield sse_event(responses.chunk(self.meta, {"role": "assistant", "content": ""},
                                            include_usage=include_usage))
            finish = None
            async for chunk in self._chunks(first):
                delta = self.parser.feed(chunk.token_ids)
                body = _delta_dict(delta, n_calls, legacy)
                n_calls += len(delta.tool_calls)
                entries = self._logprobs(chunk)
                if body or entries:
                    yield sse_event(responses.chunk(self.meta, body, logprob_list=entries,
                                                    include_usage=include_usage))
                finish = chunk.finish_reason
            delta, finish = self.parser.finish(finish)
            self.finish_reason = finish
            if legacy and finish == "tool_calls":
                finish = "function_call"
            yield sse_event(responses.chunk(self.meta, _delta_dict(delta, n_calls, legacy),
                                            finish, include_usage=include_usage))
            if include_usage:
                yield sse_event(responses.usage_chunk(self.meta, self.usage()))
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            self.error = RequestAborted("the client went away during the stream")
            raise
        except Exception as exc:
            self.error = exc
            yield sse_error(exc, self.meta["id"], self.trace.trace_id)
        finally:
            await self.close()


def _delta_dict(delta, first_index: int, legacy: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if delta.content:
        body["content"] = delta.content
    if delta.reasoning:
        body["reasoning_content"] = delta.reasoning
    if delta.tool_calls and legacy:  # deprecated `functions`: one call, as `function_call`
        if first_index == 0:
            call = delta.tool_calls[0]
            body["function_call"] = {"name": call.name, "arguments": call.arguments}
    elif delta.tool_calls:
        body["tool_calls"] = responses.tool_call_dicts(delta.tool_calls, first_index,
                                                       streaming=True)
    return body


def _max_token_bytes(tokenizer: PromptTokenizer) -> int:
    """The longest token of the vocabulary in bytes: text of N bytes is at least N / this
    many tokens."""
    raw = tokenizer._raw
    return max(len(raw.id_to_byte_piece(i, "keep"))
               for i in range(raw.num_special_tokens, raw.n_words))


def _trace_headers(request: Request) -> dict[str, str]:
    return {k: v for k in ("traceparent", "tracestate") if (v := request.headers.get(k))}


async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's routing errors in our error shape, keeping their headers (405's `Allow`)."""
    if exc.status_code == 404:
        return error_response(NotFound(f"no route {request.method} {request.url.path}"))
    if exc.status_code == 405:
        error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
    else:
        error = StackError(str(exc.detail))
        error.status, error.type = exc.status_code, "invalid_request_error"
    response = error_response(error)
    response.headers.update(exc.headers or {})
    return response
