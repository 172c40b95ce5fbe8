"""The request service: one chat completion from its body to its answer.

plan → encode → route → answer. Each request's accounting (its quota grant, metrics, server
span and log line) is one `_Record`, closed exactly once whether the request was refused,
failed, was cancelled or answered. The ingress (`services/ingress.py`) is only the HTTP adapter
around this: routes, the key check, and turning `Refused` and `Answer` into responses.

A request for `n` choices is `n` decode streams (each resumed on its own when a replica dies)
under that one record: one prompt, one quota charge, usage summed over the choices.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from opentelemetry.trace import SpanKind

from services.api import responses
from services.api.http_errors import as_stack_error, sse_error, sse_event
from services.api.middleware import new_trace_id
from services.api.output import OutputParser
from services.api.plan import (RequestPlan, admit, constrain, plan_request, prompt_budget,
                              prompt_floor, refuse_prefix_under, structured_request,
                              text_floor, tools_of)
from services.api.schemas import parse_chat_request
from services.context import RequestContext, new_request_id
from services.engines.protocol import EngineRequest
from services.engines.stops import OutputMarks, StopChecker
from services.errors import (ContextLengthExceeded, DeadlineExceeded, EngineError, InvalidRequest,
                             KVHandoffFailed, ReaderStalled, RequestAborted, StackError, clip,
                             retryable)
from services.grammar import warmed
from services.guard.keys import Principal
from services.guard.quotas import Grant, Quotas
from services.guard.uploads import Uploads
from services.kv.backends import SEQUENTIAL, build_handoff
from services.multimodal.preprocess import image_parts
from services.routing import PoolChoice, cache_salt, choose_pool
from services.settings import IngressSettings
from services.telemetry import metrics, tracing
from services.telemetry.logs import configure_logging, request_line
from services.tokenizer import EncodedPrompt, PromptTokenizer, load_tokenizer
from services.workers.decode import DecodeWorker, StreamChunk
from services.workers.multimodal import MultimodalWorker
from services.workers.peer import call, close_stream, in_background, stream
from services.workers.prefill_client import Prefilled, PrefillClient, timings


@dataclass
class Refused:
    """A request answered with an error before any of its answer was sent."""

    error: StackError
    request_id: str
    trace_id: str | None


# a prompt costing more to encode than this much text (bytes, `_encoding_size`) is encoded off
# the event loop (~10 ms of ASCII text inline)
INLINE_ENCODE_BYTES = 65536
# what one piece of text (a content part, a message, a call) costs to encode beyond its bytes,
# in bytes of text: measured ~2.8 µs a piece, ~150 ns a byte of ASCII (~280 of 4-byte CJK)
PIECE_BYTES = 16
# what a byte of a tool's definition costs to encode, in bytes of text: its schema is checked
TOOL_BYTE_COST = 8
ENCODE_GRACE_S = 2.0  # past the deadline, for the multimodal worker's own deadline answer
# a pixel release nobody waits for is tried at least this long, and until the request's
# deadline (when the pixels let themselves go): behind a replica's encodes it waits for a slot
RELEASE_S = 5.0
# a 504 within this of the client's own deadline is its deadline's (the replicas that raise it
# read their own wall clocks, which may run ahead of the ingress's)
CLOCK_SLACK_S = 0.5
# a pool whose prefill and decode handed this replica tokens this recently is serving, though
# its readiness call waits behind its streams (`RequestService.serving`)
SERVING_S = 5.0


def _texts(messages: list[dict], tools: list[dict] | None = None) -> Iterator[str]:
    """The text of a conversation that reaches its prompt: contents, call arguments, earlier
    turns' reasoning and the tools' definitions (as the prompt shows them, JSON)."""
    # as the prompt shows them: unescaped (an escaped CJK character is six bytes, ~5 tokens)
    yield from (json.dumps(tool, ensure_ascii=False) for tool in tools or ())
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            yield from (p.get("text") or "" for p in content if p.get("type") == "text")
        yield from (c["function"]["arguments"] for c in message.get("tool_calls") or ())
        if message.get("reasoning_content"):
            yield message["reasoning_content"]


def _encoding_size(messages: list[dict], tools: list[dict] | None = None) -> int:
    """What encoding the conversation costs, in bytes of text: its texts' UTF-8 bytes (the
    tokenizer's work grows with bytes, not characters: a 4-byte character costs ~8 of ASCII)
    and `PIECE_BYTES` a piece (thousands of empty parts are cheap to send, not to encode). An
    upper bound on its text's tokens too (a token is at least a byte)."""
    return sum((len(t) if t.isascii() else len(t.encode("utf-8", "surrogatepass")))
               + PIECE_BYTES for t in _texts(messages, tools))


class RequestService:
    """Chat completions over `pools` (pool name → that pool's decode peer) and `multimodal`
    (the image preprocessing peer; None: images are refused)."""

    def __init__(self, settings: IngressSettings, pools: dict[str, Any],
                 multimodal: Any = None, prefills: dict[str, Any] | None = None):
        self.settings = settings
        self.pools = pools
        self.multimodal = multimodal
        # with a sequential handoff the first leg's prefill is run from here: its first token
        # comes straight back, and decode receives the KV meanwhile (`_Choice.start`)
        kv = settings.kv_handoff
        self.prefill_clients = {
            name: PrefillClient(peer, build_handoff(kv), kv, name)
            for name, peer in (prefills or {}).items()
            if kv.ingress_prefill and kv.backend in SEQUENTIAL}
        self.tokenizer = load_tokenizer(settings.model.tokenizer_file())
        self.guidance = warmed(self.tokenizer)
        self.in_flight = {name: 0 for name in pools}  # decode streams, for spillover
        # when each pool's prefill and decode last handed this replica a token (`serving`)
        self.progress: dict[tuple[str, str], float] = {}
        self.overdue = {name: 0 for name in pools}  # past the TTFT SLO, no first token yet
        self._overdue_gauges: asyncio.Task | None = None
        self.log = configure_logging(settings.telemetry.json_logs)
        self.quotas = Quotas(settings.auth.default_quota)
        self.uploads = Uploads(settings.limits)
        self.token_bytes = _max_token_bytes(self.tokenizer)
        self.marks = OutputMarks.of(self.tokenizer)
        self._compiling = asyncio.Semaphore(settings.limits.max_concurrent_compiles)
        tracing.configure(settings.telemetry.tracing, role="ingress")

    def serving(self, pool: str) -> bool:
        """Whether the pool's prefill and decode both handed this replica a token within
        `SERVING_S`: a pool saturated with streams answers a readiness call only after them
        (it queues in Serve like any call), and is serving all the same."""
        now = time.monotonic()
        return all(now - self.progress.get((pool, role), float("-inf")) <= SERVING_S
                   for role in ("prefill", "decode"))

    def publish_overdue(self) -> None:
        """Keep `small4_first_token_overdue` published for every pool (`GAUGE_REPUBLISH_S`)
        from the first routed request on: Ray drops a gauge nobody sets again within ~20 s,
        and a stalled pool's count stays put (its page would lose its series)."""
        if self._overdue_gauges is None or self._overdue_gauges.done():
            self._overdue_gauges = asyncio.get_running_loop().create_task(self._overdue_loop())

    async def _overdue_loop(self) -> None:
        while True:
            for pool, n in self.overdue.items():
                metrics.FIRST_TOKEN_OVERDUE.set(n, pool=pool)
            await asyncio.sleep(metrics.GAUGE_REPUBLISH_S)

    async def chat(self, principal: Principal, headers: Mapping[str, str],
                   read_body: Callable[[], Awaitable[Any]]) -> Answer | Refused:
        """The answer to one chat completion by `principal`; `read_body` reads and checks the
        body (the ingress's guard), called only after the cheap checks passed."""
        incoming = tracing.incoming_context(headers)
        record = _Record.open(self, principal, incoming)
        limits = self.settings.limits
        try:
            # cheapest first: the deadline header, the key's request and stream quota, an
            # upload slot; only then is the body read (checked as it streams in), sized against
            # the context and token quota, and only then tokenised
            deadline = record.deadline = time.time() + self._timeout(headers)
            record.client_deadline = headers.get("x-request-timeout") is not None
            record.grant = self.quotas.admit_request(principal)
            with tracing.scope("preprocess", record.span) as pre:
                async with self.uploads.slot(principal.ident):
                    reading = time.perf_counter()
                    body = await read_body()
                # the body's transfer is the client's link; a wait for an upload slot is the
                # stack's own congestion and stays counted
                record.received = record.started + time.perf_counter() - reading
                req = parse_chat_request(body, limits.max_messages)
                effort = admit(req, model=self.settings.model, routing=self.settings.routing,
                               limits=limits, vocab_size=self.tokenizer.vocab_size,
                               max_images=self.settings.max_images if self.multimodal else None,
                               max_image_bytes=self.settings.max_image_bytes)
                # the least it can cost is charged now (settled once the prompt is known), so
                # what runs before that charge (images) is paid for, never only checked
                self.quotas.charge(record.grant, prompt_floor(
                    req, self.token_bytes, model=self.settings.model, limits=limits))
                # a pool with room, before the costly steps (tokenising, images, a grammar):
                # a saturated stack sheds with a 503 what it would shed after them anyway
                self.quotas.take_streams(principal, record.grant, req.n)
                choose_pool(effort, self.settings.pools, self.in_flight, self.settings.routing,
                            req.n)
                # encoding is paid for whatever comes of the request (below): the text's least
                # from here, the whole prompt once images were decoded for it
                record.encoded = max(text_floor(req, self.token_bytes), 1)
                prompt = await self._encode(req, effort, record, pre, deadline)
                record.pixels = prompt.pixels_owner
                if prompt.images:
                    record.encoded = len(prompt.ids)
                plan = plan_request(req, record.request_id, effort=effort, prompt=prompt,
                                    model=self.settings.model, limits=limits,
                                    marks=self.marks)
                # charged before a grammar compile (a key that cannot pay gets none); each
                # of the n choices is a prefill and a sequence of its own
                self.quotas.settle(record.grant, plan.n * (
                    plan.prompt_tokens + plan.engine_request.sampling.max_tokens))
                await self._constrain(plan, deadline, record)
                plan.forget_messages()
                del body, req  # (nor does this frame keep them while the first token comes)
                pre.set_attributes({"small4.prompt_tokens": plan.prompt_tokens,
                                    "small4.images": len(plan.engine_request.images)})
                plan.engine_request.cache_salt = cache_salt(principal.tenant,
                                                            self.settings.routing.prefix)
            with tracing.scope("route", record.span, **{"small4.effort": plan.effort}) as route:
                choice = choose_pool(plan.effort, self.settings.pools, self.in_flight,
                                     self.settings.routing, plan.n)
                if choice.spilled:
                    metrics.SPILLOVER.inc(from_pool=choice.home_pool, to_pool=choice.pool)
                route.set_attributes({"small4.pool": choice.pool,
                                      "small4.spillover": choice.spilled})
        except asyncio.CancelledError:  # the client left (a body half sent, an image encoding)
            record.close(RequestAborted("the client went away before the answer started"))
            raise
        except Exception as exc:
            return record.refuse(exc)
        ctx = RequestContext(record.request_id, deadline=deadline,
                             trace_headers=tracing.headers_of(record.span, incoming),
                             tenant=principal.tenant)
        record.pool = choice.pool
        answer = Answer(self, plan, choice, ctx, record)
        record.watch_first_token()  # (after the answer exists: it closes the record)
        record.dispatched = plan.n * plan.prompt_tokens  # prefills the engines will run
        try:
            await answer.start()
        except asyncio.CancelledError:
            await answer.close(RequestAborted("the client went away before the first token"))
            raise
        except Exception as exc:  # still a refusal: nothing of the answer was sent
            await answer.close(exc)
            return Refused(record.error, record.request_id, record.trace_id)
        record.plan, record.first_at = plan, time.perf_counter()  # the prompt counts from here
        record.unwatch()
        metrics.TTFT.observe(record.first_at - record.received, pool=choice.pool,
                             role="ingress")
        return answer

    def _timeout(self, headers: Mapping[str, str]) -> float:
        """Seconds this request may take: `x-request-timeout`, capped, or the default."""
        limits, raw = self.settings.limits, headers.get("x-request-timeout")
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

    async def _encode(self, req, effort: str, record: _Record, span,
                      deadline: float) -> EncodedPrompt:
        """Text stays here; a request with images is encoded by the multimodal deployment
        (its span a child of `span`, the preprocessing's), which checks the request's
        `prompt_budget` (the context, the key's token room) against its images' tokens before
        decoding them. Either way a text longer in bytes than the context in tokens is counted
        first, with an early stop (below)."""
        messages, tools = req.openai_messages(), tools_of(req)
        tool_size = _encoding_size([], tools)  # (dumped once: it is weighed below too)
        size = _encoding_size(messages) + tool_size
        images = image_parts(messages)
        if images and self.multimodal is None:
            raise InvalidRequest("this endpoint does not accept images", param="messages")
        if size > INLINE_ENCODE_BYTES:
            await self._refuse_overlong(messages, tools, size)
        if not images:
            # tools are validated against JSON Schema's metaschema as they are encoded, at
            # several times a text byte's cost (45 tools, 55 KB: 26 ms; 48 KB of `anyOf`:
            # 240 ms, measured with mistral-common's Python check, before the Rust one); a
            # thread hop is not free either (it waits for the GIL behind a busy loop)
            if size + (TOOL_BYTE_COST - 1) * tool_size <= INLINE_ENCODE_BYTES:
                return self.tokenizer.encode_chat(messages, effort=effort, tools=tools)
            return await asyncio.to_thread(self.tokenizer.encode_chat, messages,
                                           effort=effort, tools=tools)
        request_id = record.request_id
        # the most its images can take held now, as far as the key can pay: the image
        # service refuses from the headers what this request holds cannot pay
        most = req.n * len(images) * self.tokenizer.max_image_tokens
        budget = prompt_budget(req, self.token_bytes, model=self.settings.model,
                               limits=self.settings.limits,
                               quota=self.quotas.reserve(record.grant, most))
        ctx = RequestContext(request_id, deadline=deadline,
                             trace_headers=tracing.headers_of(span))
        # queued behind a busy multimodal deployment, a request still keeps its deadline (a
        # little after it: the worker's own deadline error, which says where it was, comes first)
        try:
            async with asyncio.timeout(max(0.0, ctx.remaining_s()) + ENCODE_GRACE_S):
                return await call(self.multimodal, MultimodalWorker.encode, ctx, messages,
                                  effort, tools, budget)
        except TimeoutError:
            raise DeadlineExceeded("the request's images were not encoded before its "
                                   "deadline", request_id=request_id) from None

    async def _refuse_overlong(self, messages: list[dict], tools: list[dict] | None,
                               size: int) -> None:
        """Refuse a prompt whose text alone is longer than the context: one longer in bytes
        than the context in tokens (each token is at least a byte) is counted piece by piece
        off the event loop, stopped once past the context, so a prompt of millions of tokens
        costs what counting to the context costs, not what encoding it whole would (here or
        in the image service, whose encoding cannot be stopped part-way)."""
        context = self.settings.model.context_length
        if size > context and await asyncio.to_thread(self.tokenizer.exceeds,
                                                      _texts(messages, tools), context):
            raise ContextLengthExceeded(f"this model's maximum context length is {context} "
                                        "tokens; the messages have more", param="messages")

    def release_pixels(self, owner: Any, deadline: float | None = None) -> None:
        """Let the multimodal replica that keeps a finished request's pixels free them, in the
        background (the answer is sent): tried until the request's `deadline`, when the
        replica lets them go itself, and for at least `RELEASE_S`. A release queues for a
        slot of that replica behind its encodes; given up sooner, it left the pixels held,
        and counted against `max_held_bytes`, until the deadline all the same."""
        left = 0.0 if deadline is None else deadline - time.time()
        in_background(call(self.multimodal, MultimodalWorker.release, owner),
                      timeout_s=max(RELEASE_S, left))

    async def _constrain(self, plan: RequestPlan, deadline: float, record: _Record) -> None:
        """The grammar of a structured answer (JSON format, forced or strict tools), waited
        for (a compile slot, the compile) no longer than the request's deadline. Its schemas
        are charged to the key first, as the prompt tokens their bytes are at least (a
        compile costs with the schema's size, and the schema is not in the prompt: a large
        one with `max_tokens: 1` cost seconds of compile for a few tokens of quota), and kept
        charged whatever the answer (the compile ran)."""
        limits = self.settings.limits
        structure = structured_request(plan, limits)
        if not structure.constrained:
            return
        refuse_prefix_under(plan, structure.cause)
        # a compile costs with the schema's size: bounded before it starts, and only a few
        # at once per replica (off the event loop; a thread cannot be stopped midway)
        sizes = [(len(json.dumps(schema)), param) for param, schema in structure.schemas()]
        if sum(size for size, _ in sizes) > limits.max_schema_bytes:
            size, param = max(sizes)
            raise InvalidRequest(f"{param}: {sum(s for s, _ in sizes)} bytes of JSON schema "
                                 f"(this one {size}); a structured answer's grammar is built from "
                                 f"at most {limits.max_schema_bytes} (limits.max_schema_bytes)",
                                 param=param)
        schema_tokens = -(-sum(size for size, _ in sizes) // self.token_bytes)
        self.quotas.charge(record.grant, schema_tokens)
        record.compiled = schema_tokens
        # a slot is held until its compile ends, even when the request left meanwhile (a
        # thread cannot be stopped: the slot bounds the compiles running, not the requests)
        try:
            left = deadline - time.time()
            if left <= 0:  # a free slot is taken without a pause the timeout could end
                raise TimeoutError
            async with asyncio.timeout(left):
                await self._compiling.acquire()
                compiling = asyncio.ensure_future(asyncio.to_thread(self.guidance.grammar,
                                                                    structure))
                compiling.add_done_callback(self._compiled)
                grammar = await asyncio.shield(compiling)
        except TimeoutError:
            raise DeadlineExceeded("the request's deadline passed while its grammar waited to "
                                   "be built (x-request-timeout or limits.request_timeout_s)",
                                   param="x-request-timeout") from None
        constrain(plan, grammar, structure.cause)

    def _compiled(self, task: asyncio.Future) -> None:
        self._compiling.release()
        if not task.cancelled():
            task.exception()  # retrieved here: a compile whose request left is not logged


class _Record:
    """One request's accounting: its server span, quota grant, metrics and log line, closed
    once by `close` for every outcome (refused, failed, cancelled, answered)."""

    def __init__(self, service: RequestService, principal: Principal, span, trace_id: str,
                 request_id: str, started: float):
        self.service, self.tenant, self.span, self.trace_id = (service, principal.tenant, span,
                                                               trace_id)
        self.request_id, self.started = request_id, started
        # where the stack's latencies (TTFT, its SLO's misses and overdue count) count from:
        # the head's arrival plus the body's transfer (a slow upload is the client's link,
        # not a late pool)
        self.received = started
        self.grant: Grant | None = None
        self.plan: RequestPlan | None = None  # set once its first token arrived
        self.dispatched = 0  # prompt tokens sent to be prefilled (all choices)
        # a prompt encoded: its text's least tokens (its whole prompt where images were
        # decoded for it) are spent whether or not it reaches an engine (a context it
        # overflows once counted exactly, a charge the key cannot pay, a deadline, a client
        # leaving), as far as the request held them: a refusal after that work refunded all
        self.encoded = 0
        self.compiled = 0  # the tokens a grammar's schemas were charged: kept whatever happens
        self.pool = "none"
        self.error: StackError | None = None
        self.pixels = None  # where its images' pixels are kept (a `PixelOwner`), if anywhere
        self.deadline: float | None = None
        self.client_deadline = False  # the deadline is the client's (x-request-timeout)
        self.first_at: float | None = None  # when its first token left (perf_counter)
        self._overdue: asyncio.TimerHandle | bool | None = None  # True once counted overdue
        self.closed = False

    @classmethod
    def open(cls, service: RequestService, principal: Principal,
             incoming: dict[str, str]) -> _Record:
        request_id, started = new_request_id(), time.perf_counter()
        span = tracing.start("POST /v1/chat/completions", incoming, kind=SpanKind.SERVER, **{
            "http.request.method": "POST", "url.path": "/v1/chat/completions",
            "small4.request_id": request_id, "small4.tenant": principal.tenant})
        trace_id = tracing.trace_id(span, incoming) or new_trace_id()
        return cls(service, principal, span, trace_id, request_id, started)

    def _alerting(self, status: int, completion: int) -> None:
        """What the alerts read of a failure beside its status.

        A 504 at the deadline the client chose, while the stack was keeping its SLOs, is the
        client's (`_on_schedule`: it asked for less time than the SLOs promise this request),
        and the error-rate alerts leave it out: one client's short x-request-timeout must not
        page anyone. A 504 at a deadline the stack was already late for is the stack's, client
        header or not. A request a pool was serving that ended without a first token after
        its pool's TTFT SLO missed that SLO, whether it timed out, failed or its client left:
        the TTFT histogram sees only first tokens, so a stalled prefill burnt no budget."""
        now = time.perf_counter()
        if isinstance(self.error, DeadlineExceeded) and self.client_deadline and (
                self.deadline is not None and time.time() >= self.deadline - CLOCK_SLACK_S
                ) and self._on_schedule(now, completion):
            metrics.CLIENT_DEADLINES.inc(pool=self.pool)
        pool = self.service.settings.pools.get(self.pool)
        if self.first_at is None and pool is not None and (status >= 500 or status == 499) \
                and now - self.received > metrics.slo_bucket(pool.slo.ttft_s):
            metrics.TTFT_MISSED.inc(pool=self.pool)

    def _on_schedule(self, now: float, completion: int) -> bool:
        """Whether the request was within its SLOs at `now`: no first token yet and within the
        TTFT SLO (its pool's; before routing, the strictest pool's), or, after the first
        token, its choices streamed no slower than the pool's ITL SLO. Within the SLO is what
        the TTFT alerts count as within: up to the latency bucket at or above it."""
        pools = self.service.settings.pools
        pool = pools.get(self.pool)
        if self.first_at is None:
            slo = pool.slo.ttft_s if pool else min(p.slo.ttft_s for p in pools.values())
            return now - self.received <= metrics.slo_bucket(slo)
        if pool is None or self.plan is None:
            return False
        tokens = completion / max(self.plan.n, 1)
        return now - self.first_at <= pool.slo.itl_s * (tokens + 1)

    def watch_first_token(self) -> None:
        """Count it overdue (`small4_first_token_overdue`) once its pool's TTFT SLO passes
        with no first token, until the token comes or it ends: a pool that stopped shows at
        once, where the TTFT histogram and the miss counter hear of a request only when it
        ends (at its deadline, minutes later)."""
        pool = self.service.settings.pools.get(self.pool)
        if pool is not None and self._overdue is None:
            due = metrics.slo_bucket(pool.slo.ttft_s) - (time.perf_counter() - self.received)
            self._overdue = asyncio.get_running_loop().call_later(max(due, 0.0), self._due)
            self.service.publish_overdue()

    def _due(self) -> None:
        if self.first_at is None and not self.closed:
            self._overdue = True
            self._count_overdue(+1)

    def unwatch(self) -> None:
        if isinstance(self._overdue, asyncio.TimerHandle):
            self._overdue.cancel()
        elif self._overdue is True:
            self._count_overdue(-1)
        self._overdue = False

    def _count_overdue(self, step: int) -> None:
        overdue = self.service.overdue
        overdue[self.pool] = max(overdue.get(self.pool, 0) + step, 0)
        metrics.FIRST_TOKEN_OVERDUE.set(overdue[self.pool], pool=self.pool)

    def refuse(self, exc: BaseException) -> Refused:
        self.close(exc)
        return Refused(self.error, self.request_id, self.trace_id)

    def close(self, exc: BaseException | None = None, *, finish_reason: str | None = None,
              completion: int = 0, reasoning: int = 0, resumes: int = 0) -> None:
        if self.closed:
            return
        self.closed = True
        self.unwatch()
        service, pool, tenant = self.service, self.pool, self.tenant
        if self.pixels is not None:
            service.release_pixels(self.pixels, self.deadline)
        self.error = None if exc is None else as_stack_error(exc)
        status, error_type = (200, None) if self.error is None else (self.error.status,
                                                                     self.error.type)
        prompt = self.plan.prompt_tokens if self.plan is not None else 0
        if self.grant is not None:
            # the prefills sent (or the images encoded) count against the key whether or not
            # a first token came: a client that leaves (or sets a deadline) just before it
            # spent them all the same;
            # only a failure of the stack's own (a 5xx but the deadline) gives back what the
            # client did not get: the prompt, and a whole answer never sent (non-streamed)
            spent = max(self.dispatched, self.encoded) + completion
            if self.error is not None and self.error.status >= 500 \
                    and not isinstance(self.error, DeadlineExceeded):
                streamed = self.plan is not None and bool(self.plan.request.stream)
                spent = completion if self.plan is None or streamed else 0
            spent += self.compiled  # the compile ran, whatever came of the request
            if isinstance(self.error, ReaderStalled):
                # the tokens it never read were decoded all the same, for up to write_stall_s
                # (the reader pulls them, so how many is not known here): the whole grant
                spent = self.grant.tokens
            service.quotas.release(self.grant, spent)
        metrics.REQUESTS.inc(tenant=tenant, pool=pool, status=str(status))
        if error_type is not None:
            metrics.ERRORS.inc(pool=pool, role="ingress", type=error_type)
            self._alerting(status, completion)
        if self.plan is not None:  # answered (its first token came)
            metrics.TENANT_TOKENS.inc(prompt, tenant=tenant, kind="prompt")
            metrics.TENANT_TOKENS.inc(completion, tenant=tenant, kind="completion")
            # what was sent, whether the answer finished or not (an error, a client leaving):
            # tokens streamed before an incident were missing from the pool's rates during it
            metrics.PROMPT_TOKENS.inc(prompt, pool=pool)
            metrics.COMPLETION_TOKENS.inc(completion, pool=pool)
            metrics.REASONING_TOKENS.inc(reasoning, pool=pool)
            metrics.E2E.observe(time.perf_counter() - self.received, pool=pool, role="ingress")
            # the status as the requests metric counts it (a streamed answer's HTTP status
            # was 200 before an error event ended it)
            tracing.finish(self.span, exc, **{
                "small4.finish_reason": finish_reason or "abort", "small4.status": status,
                "small4.completion_tokens": completion, "small4.resumes": resumes})
            request_line(service.log, "request done", request_id=self.request_id,
                         trace_id=self.trace_id, started=self.started, pool=pool,
                         status=status, finish_reason=finish_reason or "abort",
                         prompt_tokens=prompt, completion_tokens=completion,
                         resumes=resumes, error_type=error_type)
            return
        tracing.finish(self.span, exc, **{"http.response.status_code": status})
        request_line(service.log, "request refused", request_id=self.request_id,
                     trace_id=self.trace_id, started=self.started, status=status,
                     error_type=error_type)


class _Choice:
    """One choice's decode stream: resumed on another replica when one dies (from the prompt
    plus the tokens already received, so the client sees no gap and no repeat), within the
    request's deadline; its parser turns the tokens into content, reasoning and tool calls."""

    def __init__(self, answer: Answer, index: int, request: EngineRequest):
        # what it needs of the answer, not the answer itself: no cycle keeps a finished
        # request (its pixels' references, its streams) alive until the garbage collector runs
        self.service, self.pool, self.ctx, self.plan = (answer.service, answer.choice.pool,
                                                        answer.ctx, answer.plan)
        self.index, self.request = index, request
        plan = answer.plan
        self.parser = OutputParser(answer.service.tokenizer, tools_enabled=plan.tools_enabled,
                                   stop=plan.request.stop_strings,
                                   ignore_eos=bool(plan.request.ignore_eos))
        self.generated: list[int] = []
        self.cached_tokens = 0  # of the prompt, reused from a prefix cache (first leg's)
        self.resumes = 0
        self.finish_reason: str | None = None
        self.first = None
        self.chunks = None
        self.answered = False  # whether `chunks` has yielded (Serve had placed its call)
        self.prefilled: Prefilled | None = None  # a first leg's prefill run from here
        self.closed = False  # once closed, no leg opens (a resume that was pausing, say)

    def _open(self, request: EngineRequest):
        """A decode leg that prefills `request` itself: a resumed one makes one prefill
        attempt (this resume is its retry), so a choice reaches at most `prefill_attempts` +
        `max_resumes` prefills, whatever fails."""
        ctx = replace(self.ctx, attempts=1) if self.resumes else self.ctx
        return stream(self.service.pools[self.pool], DecodeWorker.generate, ctx, request)

    async def start(self) -> None:
        """Its first chunk. With a prefill client for the pool the prompt is prefilled from
        here: the first token comes back from the prefill replica and is the first chunk; the
        decode replica is asked to receive the KV and go on after it when the next chunk is
        wanted (`next_chunk`), so the decode call's routing and sending run after the first
        token was handed to the response, not before it."""
        client = self.service.prefill_clients.get(self.pool)
        if client is None:
            self.chunks = self._open(self.request)
            self.first = await self.next_chunk()
            return
        ctx = self.ctx
        try:
            async with asyncio.timeout(ctx.remaining_s()):
                self.prefilled = await client.run(ctx, self.request, receive=False)
        except TimeoutError:
            raise _deadline() from None
        reply = self.prefilled.reply
        self.service.progress[(self.pool, "prefill")] = time.monotonic()
        self.first = StreamChunk(
            [reply.first_token], prompt_tokens=reply.prompt_tokens,
            timings=timings(reply, self.prefilled.transfer, client.handoff.backend),
            logprobs=[reply.first_logprob] if reply.first_logprob is not None else None)
        self.cached_tokens = reply.cached_tokens
        self.generated.append(reply.first_token)
        # the first token may end the choice (max_tokens 1, an end of sequence, a stop): then
        # the KV goes nowhere and no decode replica is asked
        if (finish := self._finished()) is not None:
            self.first.finish_reason = finish
            await self._prefilled_close()

    async def next_chunk(self):
        """The next chunk within the deadline, resuming after a failed replica (or after a
        KV that the decode replica could not receive from a prefill run from here)."""
        limits = self.service.settings.limits
        if self.chunks is None:  # the first leg was prefilled from here: decode takes over
            self.chunks = stream(self.service.pools[self.pool],
                                 DecodeWorker.decode_handed, self.ctx, self.request,
                                 self.prefilled.reply)
        while True:
            try:
                async with asyncio.timeout(self.ctx.remaining_s()):
                    chunk = await self.chunks.__anext__()
                if chunk.kv_received:  # decode has the KV (before its first decoded chunk,
                    self.answered = True  # which may wait for a batch slot): the leg is on
                    await self._prefilled_close()
                    continue
                first_of_leg, self.answered = not self.answered, True
                now = time.monotonic()
                self.service.progress[(self.pool, "decode")] = now
                if first_of_leg:  # the leg's prefill ran (from decode, or from here)
                    self.service.progress[(self.pool, "prefill")] = now
                if not self.resumes and "cached_tokens" in chunk.timings:
                    # the first leg's: on the first chunk, or the last where the prefill's
                    # reply came after decoding started (the concurrent handoff)
                    self.cached_tokens = int(chunk.timings["cached_tokens"] or 0)
                self.generated.extend(chunk.token_ids)
                await self._prefilled_close()  # decode has the KV: the prefill may let go
                return chunk
            except StopAsyncIteration:
                raise EngineError("the decode stream ended without a finish reason") from None
            except TimeoutError:
                raise _deadline() from None
            except Exception as exc:
                # a failed handoff resumes where the leg had one try: a KV prefilled from
                # here that decode did not receive, or a resumed leg's one prefill (a first leg
                # that failed all its `prefill_attempts` is not given more)
                one_try = self.prefilled is not None or self.resumes > 0
                if not (retryable(exc) or (one_try and isinstance(exc, KVHandoffFailed))):
                    raise
                if (finish := self._finished()) is not None:
                    # the leg failed after its last token, before saying so: nothing to resume
                    await close_stream(self.chunks)
                    await self._prefilled_close()
                    return StreamChunk([], finish_reason=finish)
                if self.resumes >= limits.max_resumes:
                    raise
                await close_stream(self.chunks)
                await self._prefilled_close()
                pause = 0.1 * (self.resumes + 1)  # let Serve see the replica is gone
                left = self.ctx.remaining_s()
                if left is not None and left <= pause:  # no leg opened past the deadline
                    raise _deadline() from None
                await asyncio.sleep(pause)
                if self.closed:  # its answer closed it meanwhile (a reader that stalled): a
                    # leg opened now would run on, its KV held, until the request's deadline
                    raise RequestAborted("the answer closed while its stream was resuming")
                self.resumes += 1  # counted once a leg opens (the span and log count it too)
                metrics.RESUMES.inc(pool=self.pool)
                self.chunks, self.answered = self._open(self._resumed()), False

    async def _prefilled_close(self) -> None:
        if self.prefilled is not None:
            prefilled, self.prefilled = self.prefilled, None
            await prefilled.close()

    def _finished(self) -> str | None:
        """The finish reason the tokens received so far reached already, though no engine
        said so (a first token prefilled from here; a leg that failed before its finish)."""
        tokenizer = self.service.tokenizer
        stops = StopChecker(self.request.sampling, (tokenizer.eos_id,), tokenizer.decode,
                            self.service.marks)
        return stops.check(self.generated)

    def _resumed(self) -> EngineRequest:
        """The choice's request continued after the tokens already received."""
        request = self.request
        return replace(request, request_id=f"{request.request_id}-resume{self.resumes}",
                       prompt_ids=request.prompt_ids + self.generated,
                       sampling=replace(request.sampling, max_tokens=request.sampling.max_tokens
                                        - len(self.generated),
                                        stop_context=tuple(self.generated)))

    async def chunks_to_end(self) -> AsyncIterator[Any]:
        """Its chunks from the first, up to the one with the finish reason."""
        chunk = self.first
        while True:
            yield chunk
            if chunk.finish_reason:
                return
            chunk = await self.next_chunk()

    def logprobs(self, chunk) -> list[dict[str, Any]] | None:
        """The logprob entries of the chunk's content tokens when the request asked for
        logprobs, else None (call after the parser was fed the chunk)."""
        if self.request.sampling.logprobs is None:
            return None
        return responses.logprob_entries(chunk.logprobs or (), self.service.tokenizer,
                                         chunk.token_ids, self.parser.content_ids)

    async def collect(self) -> dict[str, Any]:
        """The whole choice, for a non-streamed answer."""
        content, reasoning, calls, finish = [], [], [], "stop"
        entries = [] if self.request.sampling.logprobs is not None else None
        async for chunk in self.chunks_to_end():
            delta = self.parser.feed(chunk.token_ids)
            if entries is not None:
                entries += self.logprobs(chunk)
            content.append(delta.content), reasoning.append(delta.reasoning)
            calls.extend(delta.tool_calls)
            finish = chunk.finish_reason or finish
        delta, finish = self.parser.finish(finish)
        content.append(delta.content), reasoning.append(delta.reasoning)
        calls.extend(delta.tool_calls)
        self.finish_reason = finish
        return responses.choice(self.index, content="".join(content),
                                reasoning="".join(reasoning), tool_calls=calls,
                                finish_reason=finish, logprob_list=entries,
                                legacy_functions=self.plan.request.legacy_functions)

    async def close(self) -> None:
        self.closed = True
        if self.chunks is not None:
            await close_stream(self.chunks, answered=self.answered)
        await self._prefilled_close()


class Answer:
    """A request's output: its choices' decode streams, parsed into the body or SSE events;
    closing it releases the pool slots and the streams and closes the request's record."""

    def __init__(self, service: RequestService, plan: RequestPlan, choice: PoolChoice,
                 ctx: RequestContext, record: _Record):
        self.service, self.plan, self.choice, self.ctx, self.record = (service, plan, choice,
                                                                       ctx, record)
        self.stream = bool(plan.request.stream)
        self.meta = {"id": ctx.request_id, "created": int(ctx.created),
                     "model": service.settings.model.name, "reasoning_effort": plan.effort,
                     "pool": choice.pool}
        self.headers = {"x-small4-request-id": ctx.request_id, "x-small4-pool": choice.pool,
                        "x-small4-reasoning-effort": plan.effort,
                        "x-small4-spillover": "1" if choice.spilled else "0",
                        "x-trace-id": record.trace_id}
        if self.stream:  # no cache or proxy may hold the events back
            self.headers |= {"cache-control": "no-cache", "x-accel-buffering": "no"}
        service.in_flight[choice.pool] += plan.n
        self.choices = [_Choice(self, i, request)
                        for i, request in enumerate(plan.engine_requests())]
        self.closed = False

    async def start(self) -> None:
        """Wait for every choice's first chunk (the time to first token)."""
        await _all(c.start() for c in self.choices)

    def usage(self) -> dict[str, Any]:
        return responses.usage(self.plan.prompt_tokens,
                               sum(c.parser.completion_tokens for c in self.choices),
                               sum(c.parser.reasoning_tokens for c in self.choices),
                               self.choices[0].cached_tokens)

    async def body(self) -> dict[str, Any]:
        """The non-streamed completion; a failure raises the `StackError` it was accounted as
        (an unexpected one is converted, and logged, once)."""
        try:
            choices = await _all(c.collect() for c in self.choices)
            return responses.completion(self.meta, choices, self.usage())
        except asyncio.CancelledError:
            await self.close(RequestAborted("the client went away before the answer was sent"))
            raise
        except Exception as exc:
            await self.close(exc)
            raise self.record.error from exc
        finally:
            await self.close()  # answered (a no-op once closed above)

    async def events(self) -> AsyncIterator[str]:
        """The SSE stream: a role chunk per choice, their deltas as they come, each choice's
        finish, then usage when asked, then `[DONE]`; an error after the start is an error
        event."""
        options = self.plan.request.stream_options
        # vLLM's `continuous_usage_stats`: every chunk carries the usage so far
        continuous = bool(options and options.continuous_usage_stats)
        include_usage = continuous or bool(options and options.include_usage)
        usage_now = self.usage if continuous else (lambda: None)
        legacy = self.plan.request.legacy_functions
        calls = [0] * len(self.choices)
        error: BaseException | None = None
        merged = self._merged()
        try:
            # with include_usage every chunk has `usage`: null until the last one, as OpenAI's
            for c in self.choices:
                yield sse_event(responses.chunk(self.meta, {"role": "assistant", "content": ""},
                                                usage_body=usage_now(), index=c.index,
                                                include_usage=include_usage))
            async for c, chunk in merged:
                delta = c.parser.feed(chunk.token_ids)
                body = _delta_dict(delta, calls[c.index], legacy)
                calls[c.index] += len(delta.tool_calls)
                entries = c.logprobs(chunk)
                if body or entries:
                    yield sse_event(responses.chunk(self.meta, body, usage_body=usage_now(),
                                                    index=c.index, logprob_list=entries,
                                                    include_usage=include_usage))
                if chunk.finish_reason:
                    delta, c.finish_reason = c.parser.finish(chunk.finish_reason)
                    finish = c.finish_reason
                    if legacy and finish == "tool_calls":
                        finish = "function_call"
                    yield sse_event(responses.chunk(
                        self.meta, _delta_dict(delta, calls[c.index], legacy), finish,
                        usage_body=usage_now(), index=c.index, include_usage=include_usage))
            if include_usage:
                yield sse_event(responses.usage_chunk(self.meta, self.usage()))
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            error = RequestAborted("the client went away during the stream")
            raise
        except Exception as exc:
            error = exc
            yield sse_error(exc, self.meta["id"], self.record.trace_id)
        finally:
            try:
                await merged.aclose()  # no read of a choice's stream is left running
            finally:  # even when that await was cancelled again (`close`)
                await self.close(error)

    async def _merged(self) -> AsyncIterator[tuple[_Choice, Any]]:
        """Every choice's chunks as they arrive (in choice order when several are ready)."""
        if len(self.choices) == 1:
            async for chunk in self.choices[0].chunks_to_end():
                yield self.choices[0], chunk
            return
        streams = {c.index: c.chunks_to_end() for c in self.choices}
        pending = {asyncio.ensure_future(anext(s)): i for i, s in streams.items()}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=pending.get):
                    index = pending.pop(task)
                    try:
                        chunk = task.result()
                    except StopAsyncIteration:
                        continue
                    yield self.choices[index], chunk
                    pending[asyncio.ensure_future(anext(streams[index]))] = index
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for s in streams.values():
                await s.aclose()

    async def close(self, exc: BaseException | None = None) -> None:
        """Release the pool slots, stop the streams, and account for the request once.

        A client leaving is a cancellation, and under Serve it is delivered through an anyio
        cancel scope (Starlette streams in a task group: uvicorn's ASGI spec 2.3), which
        cancels every later await of the cancelled task again. So the streams are closed in a
        task of their own, shielded (it runs to its end even when this await is cancelled),
        and the request's record is closed whatever happens to that await: a close cut at
        its first await would keep the key's stream slot, its metrics and its span forever."""
        if self.closed:
            return
        self.closed = True
        self.service.in_flight[self.choice.pool] -= self.plan.n
        try:
            await asyncio.shield(self._close_choices())
        finally:
            finished = all(c.finish_reason for c in self.choices)
            self.record.close(exc,
                              finish_reason=self.choices[0].finish_reason if finished else None,
                              completion=sum(c.parser.completion_tokens for c in self.choices),
                              reasoning=sum(c.parser.reasoning_tokens for c in self.choices),
                              resumes=sum(c.resumes for c in self.choices))

    async def _close_choices(self) -> None:
        for c in self.choices:
            await c.close()


def _deadline() -> DeadlineExceeded:
    return DeadlineExceeded("the request's deadline passed before it finished "
                            "(x-request-timeout or limits.request_timeout_s)",
                            param="x-request-timeout")


async def _all(coroutines) -> list[Any]:
    """Their results, run concurrently; when one fails the others are cancelled (and waited
    for) before its error is raised, so no stream is read after it is closed."""
    coroutines = list(coroutines)
    if len(coroutines) == 1:
        return [await coroutines[0]]
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _delta_dict(delta, first_index: int, legacy: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if delta.content:
        body["content"] = delta.content
    if delta.reasoning:
        body["reasoning_content"] = delta.reasoning
    if delta.tool_calls and legacy:  # deprecated `functions`: one call, as `function_call`
        if first_index == 0:
            call_ = delta.tool_calls[0]
            body["function_call"] = {"name": call_.name, "arguments": call_.arguments}
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
