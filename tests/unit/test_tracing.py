"""Tracing settings: explicit settings win, the SDK's OTEL_* environment fills what they leave."""

from __future__ import annotations

import subprocess
import sys

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


def spans_received(env: dict[str, str]) -> int:
    """Run EXPORT in a fresh process with `env` added, against a real OTLP/HTTP sink on
    loopback; how many trace exports it received."""
    import os
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    got = []

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self):
            got.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    sink = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    try:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        base = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_address[1]}"}
        subprocess.run([sys.executable, "-c", EXPORT], env=clean | base | env, check=True,
                       timeout=60, capture_output=True)
    finally:
        sink.shutdown()
        sink.server_close()
    assert all(path == "/v1/traces" for path, _ in got)
    return sum(b"probe" in body for _, body in got)


def test_the_environment_alone_exports_and_its_sampler_and_kill_switch_are_obeyed():
    assert spans_received({}) == 1
    assert spans_received({"OTEL_TRACES_SAMPLER": "always_off"}) == 0
    assert spans_received({"OTEL_TRACES_SAMPLER": "traceidratio",
                           "OTEL_TRACES_SAMPLER_ARG": "0"}) == 0
    assert spans_received({"OTEL_SDK_DISABLED": "true"}) == 0
