"""OpenTelemetry tracing across Ray hops: one trace per request, from HTTP to the engine.

Each process configures its tracer provider once (`configure`), with the pool and role as resource
attributes. The W3C context travels inside `RequestContext.trace_headers`: every hop starts its
span as a child of the headers it received (`start`/`scope`) and hands its own on (`headers_of`).
Spans are passed explicitly, never attached to the current context, because a stream's span
outlives the call that started it. `resolve` reads OpenTelemetry's `OTEL_*` variables as the
specification defines them (an endpoint or exporter in the environment turns tracing on,
`OTEL_SDK_DISABLED` turns it off, `OTEL_TRACES_SAMPLER(_ARG)` picks the sampler); explicit
settings win. With tracing off, spans are no-ops but an incoming trace id is still reported.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Union

from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.settings import TracingSettings

_configured: dict[str, Any] = {}
TRACER_NAME = "small4"
# an error's message often quotes the client's input (a 4 MB field, quoted whole, was 24 MB of
# span events per request, held until exported): what a span records of it is clipped here,
# and any attribute past ATTRIBUTE_MAX_CHARS by the SDK
ERROR_MAX_CHARS = 1000
ATTRIBUTE_MAX_CHARS = 8192


@dataclass(frozen=True)
class Tracing:
    """Tracing as it applies in one process: settings, then the environment, then defaults."""

    exporter: str  # otlp_http | otlp_grpc | console | none
    endpoint: str | None = None  # None: the OTLP exporter reads OTEL_EXPORTER_OTLP_* itself
    headers: dict[str, str] = field(default_factory=dict)
    sampling_ratio: float | None = None  # None: the SDK's OTEL_TRACES_SAMPLER(_ARG)
    service_name: str = "small4"
    resource_attributes: dict[str, str] = field(default_factory=dict)
    export_interval_ms: int = 5000

    traces_url: str | None = None  # where an OTLP exporter outside this SDK sends (SGLang's)

    def otlp_endpoint(self) -> str | None:
        return self.traces_url if self.exporter in ("otlp_http", "otlp_grpc") else None


def _traces_url(endpoint: str | None, exporter: str, env: Mapping[str, str]) -> str | None:
    """The settings' endpoint, else the environment's traces endpoint, else its base endpoint
    with the HTTP signal path the specification appends."""
    if endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return endpoint or env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not base:
        return None
    return base if exporter == "otlp_grpc" else base.rstrip("/") + "/v1/traces"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def resolve(settings: TracingSettings, env: Mapping[str, str] | None = None) -> Tracing | None:
    """How this process traces, or None for not at all.

    Off when `OTEL_SDK_DISABLED` is true, or settings say `enabled: false`. With `enabled`
    unset, on exactly when the environment asks for an exporter: an OTLP endpoint
    (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) or
    `OTEL_TRACES_EXPORTER` other than `none`. The exporter is the settings', else
    `OTEL_TRACES_EXPORTER` (`otlp` with `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`: `grpc` or the
    default `http/protobuf`; `console`; `none`).
    """
    env = os.environ if env is None else env
    if _truthy(env.get("OTEL_SDK_DISABLED")) or settings.enabled is False:
        return None
    named = (env.get("OTEL_TRACES_EXPORTER") or "").split(",")[0].strip().lower()
    asked = bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                 or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) or named not in ("", "none")
    if settings.enabled is None and not asked:
        return None
    exporter = settings.exporter
    if exporter is None:
        protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                    or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
        otlp = "otlp_grpc" if protocol == "grpc" else "otlp_http"
        exporter = {"": otlp, "otlp": otlp, "console": "console", "none": "none"}.get(named)
        if exporter is None:
            raise ValueError(f"OTEL_TRACES_EXPORTER={named!r}: small4 exports traces with otlp "
                             "or console (or none)")
    return Tracing(exporter=exporter, endpoint=settings.endpoint, headers=dict(settings.headers),
                   sampling_ratio=settings.sampling_ratio,
                   service_name=settings.service_name or env.get("OTEL_SERVICE_NAME") or "small4",
                   resource_attributes=dict(settings.resource_attributes),
                   export_interval_ms=settings.export_interval_ms,
                   traces_url=_traces_url(settings.endpoint, exporter, env))


def configure(settings: TracingSettings | Tracing | None, *, role: str,
              pool: str | None = None) -> None:
    """Install this process's tracer provider (first call wins; later calls are ignored)."""
    resolved = resolve(settings) if isinstance(settings, TracingSettings) else settings
    if _configured or resolved is None:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {"service.name": resolved.service_name, "small4.role": role,
                  "process.pid": os.getpid(), **resolved.resource_attributes}
    if pool:
        attributes["small4.pool"] = pool
    # The ratio set, else the one OTEL_TRACES_SAMPLER(_ARG) names, read here in every process:
    # the ingress draws by it (its clients get no say), the hops behind it follow its flag (a
    # plain `traceidratio` from the SDK would decide by the trace id on its own, keeping spans
    # of traces the ingress dropped). A sampler it does not name is the SDK's to build.
    ratio = resolved.sampling_ratio
    if ratio is None:
        ratio = _environment_ratio(os.environ)
    sampler = None if ratio is None else _sampler(ratio, from_clients=role == "ingress")
    provider = TracerProvider(resource=Resource.create(attributes), sampler=sampler,
                              span_limits=SpanLimits(max_attribute_length=ATTRIBUTE_MAX_CHARS))
    exporter = _exporter(resolved)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(
            exporter, schedule_delay_millis=resolved.export_interval_ms))
    _configured["provider"] = provider
    _configured["tracer"] = provider.get_tracer(TRACER_NAME)


def _sampler(ratio: float, *, from_clients: bool):
    """Our spans follow their parent's decision, made once at the ingress by `ratio`: there a
    remote parent is a client, whose `traceparent` keeps its trace id but not a say in the
    sampling. Neither its flag (set, any client could have every request of its traced: ten
    times the export at a ratio of 0.1; unset, hide its requests from the traces) nor its
    trace id (a ratio decided by the id is the client's to choose: one id under the ratio's
    bound had every request sampled, all into one trace) decides: the ingress draws its own.
    The hops behind it follow the ingress's flag."""
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    if not from_clients:
        return ParentBased(TraceIdRatioBased(ratio))
    drawn = _DrawnRatio(ratio)
    return ParentBased(drawn, remote_parent_sampled=drawn, remote_parent_not_sampled=drawn)


class _DrawnRatio(Sampler):
    """`ratio` of the spans it is asked about, by a draw of this process's own."""

    def __init__(self, ratio: float):
        self.ratio = ratio

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None,
                      links=None, trace_state=None):
        sampled = _draw() < self.ratio
        parent = trace.get_current_span(parent_context).get_span_context()
        return SamplingResult(Decision.RECORD_AND_SAMPLE if sampled else Decision.DROP,
                              attributes if sampled else None,
                              parent.trace_state if parent.is_valid else None)

    def get_description(self) -> str:
        return f"DrawnRatio{{{self.ratio}}}"


_draw = random.random


def _environment_ratio(env: Mapping[str, str]) -> float | None:
    """The share of requests `OTEL_TRACES_SAMPLER(_ARG)` asks for, as a ratio (its parent-based
    forms alike: the ingress's parent is a client); None for a sampler it does not name."""
    name = (env.get("OTEL_TRACES_SAMPLER") or "parentbased_always_on").strip().lower()
    name = name.removeprefix("parentbased_")
    if name == "always_on":
        return 1.0
    if name == "always_off":
        return 0.0
    if name == "traceidratio":
        try:
            ratio = float(env.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
        except ValueError:
            return 1.0  # as the SDK reads a bad argument
        return ratio if 0.0 <= ratio <= 1.0 else 1.0
    return None


def _exporter(settings: Tracing):
    headers = settings.headers or None
    if settings.exporter == "otlp_http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=settings.endpoint, headers=headers)
    if settings.exporter == "otlp_grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=settings.endpoint, headers=headers)
    if settings.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    return None


_NO_OP = trace.NoOpTracer()


def tracer() -> trace.Tracer:
    """This process's tracer (made once: `get_tracer` builds a new one on every call)."""
    return _configured.get("tracer", _NO_OP)


def flush(timeout_ms: int = 5000) -> None:
    """Export buffered spans now (tests, shutdown)."""
    provider = _configured.get("provider")
    if provider is not None:
        provider.force_flush(timeout_ms)


Parent = Union[dict, trace.Span, None]


def start(name: str, parent: Parent, *, kind: SpanKind = SpanKind.INTERNAL,
          **attributes: Any) -> trace.Span:
    """Start a span under `parent` (W3C headers from another hop, or a local span); never made
    current, so it can live across an async generator's yields. End it with `finish`."""
    if isinstance(parent, trace.Span):
        context = trace.set_span_in_context(parent)
    else:
        context = extract(parent or {})
    return tracer().start_span(name, context=context, kind=kind, attributes=_clean(attributes))


def finish(span: trace.Span, error: BaseException | None = None, **attributes: Any) -> None:
    """Set final attributes, record `error` if any, end the span."""
    span.set_attributes(_clean(attributes))
    if error is not None and span.is_recording():
        span.record_exception(error, attributes=_error_attributes(error))
        if _server_fault(error):  # a client's mistake or its leaving is no span error
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:200]))
    span.end()


def _server_fault(error: BaseException) -> bool:
    """Whether `error` is the stack's own failure (a 5xx, or anything not a `StackError`), as
    OpenTelemetry's HTTP conventions set a span's error status: a 4xx the client caused
    (and 499, a client gone; a cancellation) leaves it unset, so error-rate views of the
    traces count the stack's failures only."""
    if isinstance(error, asyncio.CancelledError):
        return False
    status = getattr(error, "status", None)
    return not isinstance(status, int) or status >= 500


def _error_attributes(error: BaseException) -> dict[str, str]:
    """What a span records of `error`: its message clipped to `ERROR_MAX_CHARS`, and its
    traceback as Python prints it, the errors it was raised from or during first (an
    `EngineError` wrapping CUDA's), each message clipped alike (the SDK's own would quote
    them whole again)."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen and len(chain) < 8:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    parts = []
    for i, exc in enumerate(reversed(chain)):
        if i:
            parts.append("\nThe above exception was the direct cause of the following "
                         "exception:\n\n" if exc.__cause__ is not None else
                         "\nDuring handling of the above exception, another exception "
                         "occurred:\n\n")
        parts.append("Traceback (most recent call last):\n"
                     + "".join(traceback.format_tb(exc.__traceback__))
                     + f"{type(exc).__qualname__}: {_clipped(str(exc))}\n")
    return {"exception.message": _clipped(str(chain[0])), "exception.stacktrace": "".join(parts)}


def _clipped(message: str) -> str:
    if len(message) <= ERROR_MAX_CHARS:
        return message
    return f"{message[:ERROR_MAX_CHARS]}… ({len(message)} characters)"


@contextmanager
def scope(name: str, parent: Parent, *, kind: SpanKind = SpanKind.INTERNAL,
          **attributes: Any) -> Iterator[trace.Span]:
    """`start` … `finish` around a block (not an async generator), errors recorded."""
    span = start(name, parent, kind=kind, **attributes)
    try:
        yield span
    except BaseException as exc:
        finish(span, exc)
        raise
    finish(span)


def headers_of(span: trace.Span, fallback: dict[str, str] | None = None) -> dict[str, str]:
    """W3C headers naming `span` as the parent, for the next hop (else `fallback`)."""
    out: dict[str, str] = {}
    if span.get_span_context().is_valid:
        inject(out, context=trace.set_span_in_context(span))
    return out or dict(fallback or {})


def trace_id(span: trace.Span | None, carrier: dict[str, str] | None = None) -> str | None:
    """The trace id in hex: the span's, else the one in `carrier`'s traceparent."""
    if span is not None and span.get_span_context().is_valid:
        return format(span.get_span_context().trace_id, "032x")
    return traceparent_id((carrier or {}).get("traceparent", ""))



# version-traceid-parentid-flags in lower-case hex, as W3C Trace Context writes them and
# OpenTelemetry's propagator reads them (a later version may append fields; 00 may not, ff is
# invalid, as are all-zero ids)
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")

TRACESTATE_MAX_CHARS = 512  # W3C: vendors may drop a longer one; we never forward it


def incoming_context(headers) -> dict[str, str]:
    """A client's W3C trace headers worth keeping: a valid `traceparent`, and its
    `tracestate` when that is of a sane length. With tracing off they are forwarded as they
    are to every hop, so nothing unchecked (or 64 KiB long) rides along."""
    parsed = _traceparent(headers.get("traceparent") or "")
    if parsed is None:
        return {}
    # forwarded in version 00's form, as W3C asks of a later version's reader (its own
    # fields after these four, of any length, never ride along)
    state = headers.get("tracestate") or ""
    return {"traceparent": "00-" + "-".join(parsed)} | (
        {"tracestate": state} if 0 < len(state) <= TRACESTATE_MAX_CHARS else {})


def traceparent_id(traceparent: str) -> str | None:
    """The trace id of a valid W3C `traceparent` (32 hex digits, not all zero), lower-case;
    None for anything else (a client's header is never echoed unchecked)."""
    parsed = _traceparent(traceparent)
    return None if parsed is None else parsed[0]


def _traceparent(traceparent: str) -> tuple[str, str, str] | None:
    """(trace id, parent id, flags) of a valid W3C `traceparent`, else None."""
    match = _TRACEPARENT.fullmatch(traceparent.strip())
    if match is None:
        return None
    version, trace_hex, parent_hex, flags, more = match.groups()
    if (version == "ff" or (version == "00" and more) or trace_hex == "0" * 32
            or parent_hex == "0" * 16):
        return None
    return trace_hex, parent_hex, flags


def _clean(attributes: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attributes.items() if v is not None}
