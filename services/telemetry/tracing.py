"""OpenTelemetry tracing across Ray hops: one trace per request, from HTTP to the engine.

Each process configures its tracer provider once (`configure`), with the pool and role as resource
attributes. The W3C context travels inside `RequestContext.trace_headers`: every hop starts its
span as a child of the headers it received (`start`/`scope`) and hands its own on (`headers_of`).
Spans are passed explicitly, never attached to the current context, because a stream's span
outlives the call that started it. The standard `OTEL_*` variables apply as the SDK defines them; explicit
settings win. With tracing off, spans are no-ops but an incoming trace id is still reported.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Union

from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.settings import TracingSettings

_configured: dict[str, Any] = {}
TRACER_NAME = "small4"


def configure(settings: TracingSettings, *, role: str, pool: str | None = None) -> None:
    """Install this process's tracer provider (first call wins; later calls are ignored)."""
    if _configured or not settings.enabled:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    service = settings.service_name or os.environ.get("OTEL_SERVICE_NAME") or "small4"
    attributes = {"service.name": service, "small4.role": role, "process.pid": os.getpid(),
                  **settings.resource_attributes}
    if pool:
        attributes["small4.pool"] = pool
    provider = TracerProvider(resource=Resource.create(attributes),
                              sampler=ParentBased(TraceIdRatioBased(settings.sampling_ratio)))
    exporter = _exporter(settings)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(
            exporter, schedule_delay_millis=settings.export_interval_ms))
    _configured["provider"] = provider
    _configured["tracer"] = provider.get_tracer(TRACER_NAME)


def _exporter(settings: TracingSettings):
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
    if error is not None:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:200]))
    span.end()


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
    parts = (carrier or {}).get("traceparent", "").split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


def _clean(attributes: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attributes.items() if v is not None}
