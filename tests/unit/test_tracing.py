"""Tracing settings: explicit settings win, the SDK's OTEL_* environment fills what they leave."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager

import pytest

SCRIPT = """
from services.settings import TracingSettings
from services.telemetry import tracing
tracing.configure(TracingSettings(enabled=True, exporter="none", **{kwargs}), role="ingress")
span = tracing.start("x", None)
print(span.resource.attributes["service.name"], span.resource.attributes["small4.role"])
"""


def service_name(kwargs: str, env: dict[str, str]) -> str:
    """Configure tracing in a fresh process (the provider is once per process)."""
    out = subprocess.run([sys.executable, "-c", SCRIPT.replace("{kwargs}", kwargs)],
                         capture_output=True, text=True, env=env, check=True)
    return out.stdout.split()


def test_settings_win_over_the_environment():
    import os

    env = dict(os.environ, OTEL_SERVICE_NAME="from-env")
    assert service_name("{'service_name': 'from-settings'}", env) == ["from-settings", "ingress"]
    assert service_name("{}", env) == ["from-env", "ingress"]
    env.pop("OTEL_SERVICE_NAME")
    assert service_name("{}", env) == ["small4", "ingress"]


# --- OTEL_* resolution: what an SRE sets in the environment decides, unless settings say ------

def resolved(env: dict[str, str], **settings):
    from services.settings import TracingSettings
    from services.telemetry.tracing import resolve

    return resolve(TracingSettings(**settings), env)


def test_an_otlp_endpoint_alone_turns_tracing_on_over_http():
    on = resolved({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert on is not None and on.exporter == "otlp_http"
    assert on.otlp_endpoint() == "http://collector:4318/v1/traces"
    assert resolved({}) is None
    assert resolved({"OTEL_TRACES_EXPORTER": "none"}) is None


def test_exporter_and_protocol_come_from_the_environment():
    grpc = resolved({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317",
                     "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert grpc.exporter == "otlp_grpc"
    assert resolved({"OTEL_TRACES_EXPORTER": "console"}).exporter == "console"
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER='zipkin'"):
        resolved({"OTEL_TRACES_EXPORTER": "zipkin"})


def test_settings_win_and_the_sdk_kill_switch_wins_over_both():
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert resolved(env, enabled=False) is None
    assert resolved({}, enabled=True).exporter == "otlp_http"
    assert resolved(env, exporter="console").exporter == "console"
    assert resolved(env | {"OTEL_SDK_DISABLED": "true"}, enabled=True) is None


def test_sglang_is_given_the_full_traces_url():
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}
    assert resolved(base).otlp_endpoint() == "http://collector:4318/v1/traces"
    assert resolved(base, exporter="otlp_grpc").otlp_endpoint() == "http://collector:4318/"
    assert resolved(base | {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4318/x"}) \
        .otlp_endpoint() == "http://t:4318/x"
    assert resolved(base, endpoint="http://mine:4318/v1/traces").otlp_endpoint() == \
        "http://mine:4318/v1/traces"
    assert resolved(base, exporter="console").otlp_endpoint() is None


EXPORT = """
from services.settings import TracingSettings
from services.telemetry import tracing
tracing.configure(TracingSettings(), role="ingress")
tracing.finish(tracing.start("probe", None))
tracing.flush()
"""


@contextmanager
def otlp_sink():
    """A real OTLP/HTTP receiver on loopback: (its base URL, the (path, headers, body) of each
    export it received)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    got = []

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self):
            got.append((self.path, dict(self.headers),
                        self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    sink = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{sink.server_address[1]}", got
    finally:
        sink.shutdown()
        sink.server_close()


def spans_received(env: dict[str, str]) -> int:
    """Run EXPORT in a fresh process with `env` added, against a real OTLP/HTTP sink on
    loopback; how many trace exports it received."""
    with otlp_sink() as (url, got):
        clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        subprocess.run([sys.executable, "-c", EXPORT], check=True, timeout=60,
                       env=clean | {"OTEL_EXPORTER_OTLP_ENDPOINT": url} | env,
                       capture_output=True)
    assert all(path == "/v1/traces" for path, _, _ in got)
    return sum(b"probe" in body for _, _, body in got)


def test_the_environment_alone_exports_and_its_sampler_and_kill_switch_are_obeyed():
    assert spans_received({}) == 1
    assert spans_received({"OTEL_TRACES_SAMPLER": "always_off"}) == 0
    assert spans_received({"OTEL_TRACES_SAMPLER": "traceidratio",
                           "OTEL_TRACES_SAMPLER_ARG": "0"}) == 0
    assert spans_received({"OTEL_SDK_DISABLED": "true"}) == 0


ENGINE_TRACE_SCRIPT = """
import asyncio, json
import httpx
from cluster.inprocess import build_inprocess
from cluster.settings import parse_settings

settings = parse_settings({"auth": {"enabled": False},
    "telemetry": {"tracing": {"enabled": True, "exporter": "none"}},
    "engine": {"kind": "simulated", "simulated": {"output": "counter"}}})
ingress = build_inprocess(settings)
seen = []
for name, decoder in ingress.service.pools.items():
    for worker, method in ((decoder, "decode"), (decoder.prefill, "prefill")):
        engine, original = worker.engine, getattr(worker.engine, method)
        def spy(request, *args, _original=original, _method=method):
            seen.append((_method, dict(request.trace_headers)))
            return _original(request, *args)
        setattr(engine, method, spy)

async def ask():
    transport = httpx.ASGITransport(app=ingress.build_asgi_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://small4") as client:
        return await client.post("/v1/chat/completions", timeout=30, headers={
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
            json={"model": "mistral-small-4", "max_tokens": 4,
                  "messages": [{"role": "user", "content": "hi"}]})

print(asyncio.run(ask()).status_code)
print(json.dumps(seen))
"""


def test_engines_get_the_requests_trace_header():
    """Each engine call carries a W3C header naming the worker's span in the request's trace
    (SGLang's `external_trace_header`): the engine's spans join the request's trace instead of
    each starting its own (sampled alone, 100 % by the SDK's default)."""
    import json
    import os

    out = subprocess.run([sys.executable, "-c", ENGINE_TRACE_SCRIPT], capture_output=True,
                         text=True, env=dict(os.environ), check=True, timeout=120)
    status, seen = out.stdout.strip().splitlines()[-2:]
    assert status == "200"
    calls = json.loads(seen)
    assert sorted(method for method, _ in calls) == ["decode", "prefill"]
    for _, headers in calls:
        version, trace, parent, flags = headers["traceparent"].split("-")
        assert trace == "4bf92f3577b34da6a3ce929d0e0e4736" and flags == "01"
        assert parent != "00f067aa0ba902b7"  # the worker's own span, under the client's
    assert calls[0][1]["traceparent"] != calls[1][1]["traceparent"]


def test_the_engines_sampler_follows_the_requests_and_samples_its_own_roots_at_our_ratio(
        monkeypatch):
    """SGLang builds its `TracerProvider` with no sampler: the SDK reads it from the
    environment the stack gives the engine. Checked with the SDK itself."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    from cluster.settings import parse_settings
    from services.engines.sglang_args import engine_env
    from services.settings import TracingSettings
    from services.telemetry.tracing import resolve

    stack = parse_settings({"auth": {"enabled": False}})
    traced = resolve(TracingSettings(sampling_ratio=0.1),
                     {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    for name, value in engine_env(stack.model, stack.kv_handoff, traced).items():
        monkeypatch.setenv(name, value)
    sampler = TracerProvider().sampler
    assert isinstance(sampler, ParentBased)
    assert isinstance(sampler._root, TraceIdRatioBased) and sampler._root.rate == 0.1
    unset = resolve(TracingSettings(), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert "OTEL_TRACES_SAMPLER" not in engine_env(stack.model, stack.kv_handoff, unset)


SAMPLED_BY_CLIENT = """
from services.settings import TracingSettings
from services.telemetry import tracing
tracing.configure(TracingSettings(enabled=True, exporter="none", sampling_ratio={ratio}),
                  role="{role}")
parent = {{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}"}}
span = tracing.start("x", parent)
print(span.is_recording(), format(span.get_span_context().trace_id, "032x"))
"""


@pytest.mark.parametrize("role, ratio, flags, recorded", [
    ("ingress", 0.0, "01", False),  # a client's flag does not get its requests traced
    ("ingress", 1.0, "00", True),  # nor keep them out of our sample
    ("decode", 0.0, "01", True),  # behind the ingress, a parent is ours: its decision holds
    ("decode", 1.0, "00", False),
])
def test_the_ingress_samples_by_our_ratio_whatever_the_clients_flag_says(role, ratio, flags,
                                                                         recorded):
    import os

    script = SAMPLED_BY_CLIENT.format(role=role, ratio=ratio, flags=flags)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=dict(os.environ), check=True, timeout=60).stdout.split()
    assert out == [str(recorded), "4bf92f3577b34da6a3ce929d0e0e4736"]  # the client's trace


CHOSEN_TRACE_ID = """
from services.settings import TracingSettings
from services.telemetry import tracing
tracing.configure(TracingSettings(enabled=True, exporter="none", sampling_ratio={ratio}),
                  role="ingress")
parent = {{"traceparent": "00-000000000000000000000000000000{tail}-00f067aa0ba902b7-{flags}"}}
print(sum(tracing.start("x", parent).is_recording() for _ in range(400)))
"""


@pytest.mark.parametrize("ratio, env, flags, low, high", [
    # a trace id whose low bits sit under any ratio's bound: decided by the id, every request
    # of the client choosing it was sampled, all into one trace
    (0.5, {}, "01", 100, 300),
    (0.5, {}, "00", 100, 300),
    # the ratio unset, the environment's sampler decides for the ingress, the client's flag
    # never (parent-based by default: a client's 00 hid its requests from the traces)
    (None, {}, "00", 400, 400),
    (None, {"OTEL_TRACES_SAMPLER": "always_off"}, "01", 0, 0),
    (None, {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.5"}, "01", 100, 300),
])
def test_a_client_chooses_neither_its_trace_id_nor_its_flag_into_our_sample(
        ratio, env, flags, low, high):
    import os

    script = CHOSEN_TRACE_ID.format(ratio=ratio, flags=flags, tail="01")
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_TRACES_SAMPLER")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=base | env, check=True, timeout=60).stdout.split()
    assert low <= int(out[-1]) <= high, out


@pytest.mark.parametrize("flags, recorded", [("01", True), ("00", False)])
def test_behind_the_ingress_the_environments_ratio_follows_the_ingresss_flag(flags, recorded):
    """With the ratio from `OTEL_TRACES_SAMPLER=traceidratio`, the SDK's own sampler (not
    parent-based) decided by the trace id in every worker, whatever the ingress had drawn:
    spans of traces the ingress dropped were kept, and traces it kept lost theirs."""
    import os

    script = SAMPLED_BY_CLIENT.format(role="decode", ratio=None, flags=flags)
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_TRACES_SAMPLER")}
    env = base | {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, check=True, timeout=60).stdout.split()
    assert out[0] == str(recorded)


def test_a_clients_mistake_or_leaving_is_no_span_error_the_stacks_failure_is():
    """OpenTelemetry's HTTP conventions leave a server span's status unset for a 4xx: error
    views counted every 400, 429 and client gone as the stack failing."""
    import asyncio

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    from services.errors import EngineUnavailable, InvalidRequest, RateLimited, RequestAborted
    from services.telemetry import tracing

    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    errors = [InvalidRequest("bad", param="n"), RateLimited("slow down", retry_after=1.0),
              RequestAborted("gone"), asyncio.CancelledError(), EngineUnavailable("down"),
              RuntimeError("bug")]
    for error in errors:
        tracing.finish(provider.get_tracer("t").start_span("s"), error)
    spans = exported.get_finished_spans()
    assert [s.status.status_code for s in spans] == [StatusCode.UNSET] * 4 + [
        StatusCode.ERROR] * 2
    assert all(len(s.events) == 1 for s in spans)  # each still recorded as an event


def test_a_span_records_an_error_quoting_client_input_clipped():
    """An error quoting a 4 MB field was recorded whole, twice (message and traceback), on
    every span it passed: tens of MB per request held until exported."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from services.errors import InvalidRequest
    from services.telemetry import tracing

    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    span = provider.get_tracer("test").start_span("preprocess")
    try:
        try:
            raise RuntimeError("CUDA error: an illegal memory access " + "y" * 10_000)
        except RuntimeError as cause:
            raise InvalidRequest("reasoning_effort must be one of high, none; got "
                                 + "x" * 4_000_000) from cause
    except InvalidRequest as error:
        tracing.finish(span, error)
    (event,) = exported.get_finished_spans()[0].events
    message = event.attributes["exception.message"]
    stack = event.attributes["exception.stacktrace"]
    assert len(message) < 2 * tracing.ERROR_MAX_CHARS and message.endswith("characters)")
    assert len(stack) < 6 * tracing.ERROR_MAX_CHARS
    assert "test_a_span_records_an_error_quoting_client_input_clipped" in stack  # its frames
    assert stack.rstrip().endswith(f"InvalidRequest: {message}")
    # and what it was raised from, as Python prints it (an engine's error under our wrapper)
    assert "RuntimeError: CUDA error: an illegal memory access" in stack
    assert "direct cause of the following exception" in stack


@pytest.mark.parametrize("header, valid", [
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", True),
    ("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later", True),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later", False),
    ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", False),
    ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", False),
])
def test_a_traceparent_is_kept_where_opentelemetry_would_read_it(header, valid):
    """Kept (and forwarded to every hop with tracing off) only where OpenTelemetry's own
    propagator reads it."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from services.telemetry.tracing import incoming_context

    read = TraceContextTextMapPropagator().extract({"traceparent": header})
    assert trace.get_current_span(read).get_span_context().is_valid is valid
    kept = incoming_context({"traceparent": header})
    assert bool(kept) is valid
    if valid:  # forwarded as version 00 writes it: a later version's own fields dropped
        assert kept["traceparent"] == "00" + header[2:55]


def test_a_later_versions_fields_of_any_length_never_ride_along():
    from services.telemetry.tracing import incoming_context

    header = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-" + "x" * 60_000
    assert incoming_context({"traceparent": header}) == {
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}


def test_the_engines_spans_reach_a_collector_with_its_headers_and_our_resource(monkeypatch):
    """SGLang builds its OTLP exporter from an endpoint alone and its resource from its own
    service name: the collector's headers (its key) and our resource attributes reach it only
    through the SDK's environment, which the stack gives the engine. The SDK's own classes, as
    SGLang calls them, export a span to a real OTLP/HTTP receiver on loopback."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest)
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from cluster.settings import parse_settings
    from services.engines.sglang_args import engine_env
    from services.settings import TracingSettings
    from services.telemetry.tracing import resolve

    stack = parse_settings({"auth": {"enabled": False}})
    with otlp_sink() as (url, got):
        endpoint = f"{url}/v1/traces"
        traced = resolve(TracingSettings(
            enabled=True, endpoint=endpoint, headers={"authorization": "Bearer k,e=y"},
            resource_attributes={"deployment.environment": "prod",
                                 "k8s.cluster.name": "h200"}), {})
        for name in [n for n in os.environ if n.startswith("OTEL_")]:
            monkeypatch.delenv(name)
        for name, value in engine_env(stack.model, stack.kv_handoff, traced).items():
            monkeypatch.setenv(name, value)
        # SGLang's name: otlp_service_name (not set by us), else OTEL_SERVICE_NAME, else its own
        named = os.environ.get("OTEL_SERVICE_NAME", "sglang")
        provider = TracerProvider(resource=Resource.create(attributes={SERVICE_NAME: named}))
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        try:
            provider.get_tracer("sglang server").start_span("engine step").end()
        finally:
            provider.shutdown()
    [(_, headers, body)] = got
    assert {k.lower(): v for k, v in headers.items()}["authorization"] == "Bearer k,e=y"
    [spans] = ExportTraceServiceRequest.FromString(body).resource_spans
    resource = {a.key: a.value.string_value for a in spans.resource.attributes}
    assert resource["deployment.environment"] == "prod" and resource["k8s.cluster.name"] == "h200"
    assert resource["service.name"] == "sglang"  # not the ingress's: its spans are its own
