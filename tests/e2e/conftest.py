"""Deploy the stack once per test run on a local Ray: the reference app at `/`, the simulated
app at `/sim` (echo output, so reasoning and tool calls come back deterministically)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

TEST_PROFILE = {
    "profile": "e2e",
    "auth": {"enabled": False},
    "model": {"context_length": 4096},
    "pools": {
        "fast": {"effort": "none", "max_queue": 8,
                 "prefill": {"num_cpus": 0.1}, "decode": {"num_cpus": 0.1}},
        "deep": {"effort": "high", "max_queue": 8,
                 "prefill": {"num_cpus": 0.1}, "decode": {"num_cpus": 0.1}},
    },
    "ingress": {"num_cpus": 0.1},
    "multimodal": {"num_cpus": 0.1},
    "stream": {"interval_tokens": 4, "interval_ms": 200},
}
SIM_PROFILE = TEST_PROFILE | {
    "engine": {"kind": "simulated", "simulated": {"decode_step_ms": 10, "output": "echo"}},
    "pools": {**TEST_PROFILE["pools"],
              "fast": TEST_PROFILE["pools"]["fast"] | {"max_queue": 1}},
}


def wait_ready(url: str, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready in {timeout}s")


def deploy(profile: dict, name: str, route_prefix: str, timeout: float = 240.0) -> None:
    """The app `profile` builds, running at `route_prefix` within `timeout` (`run_app`: one
    that is not is deleted, so it cannot keep its CPUs from every later module)."""
    from cluster.app import build_app, run_app

    run_app(build_app(profile), name, route_prefix, timeout)


@contextlib.contextmanager
def deployed(profile: dict, name: str, base_url: str):
    """The app `profile` builds, at `{base_url}/{name}`, ready; deleted on the way out."""
    deploy(profile, name, f"/{name}")
    try:
        url = f"{base_url}/{name}"
        wait_ready(url)
        yield url
    finally:
        undeploy(name)


# A replica may take its drain deadline (60 s) for open requests: more than Serve's own
# blocking delete waits (a fixed 60 s, where one slow teardown once failed CI).
UNDEPLOY_TIMEOUT_S = 150.0


def undeploy(name: str) -> None:
    """Delete the Serve app `name` and wait until it is gone, with a deadline."""
    from cluster.app import delete_app

    assert delete_app(name, UNDEPLOY_TIMEOUT_S), \
        f"Serve app {name!r} still there {UNDEPLOY_TIMEOUT_S:g} s after its delete"


class OTLPReceiver:
    """A real OTLP/HTTP trace receiver on loopback: decodes `ExportTraceServiceRequest`s."""

    def __init__(self):
        self.spans: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.ingest(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ingest(self, body: bytes) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest)

        request = ExportTraceServiceRequest.FromString(body)
        with self.lock:
            for resource_spans in request.resource_spans:
                resource = {a.key: _any_value(a.value)
                            for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append({
                            "name": span.name, "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_id": span.parent_span_id.hex(), "resource": resource,
                            "attributes": {a.key: _any_value(a.value) for a in span.attributes},
                            "status": span.status.code,
                            "events": [event.name for event in span.events]})

    def trace(self, trace_id: str) -> list[dict]:
        with self.lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]


def _any_value(value):
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


@pytest.fixture(scope="session")
def otlp():
    receiver = OTLPReceiver()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


@pytest.fixture(scope="session")
def stack(serve_url, otlp):
    """Base URLs of the deployed apps: {'ref': ..., 'sim': ...}; `ref` traces to `otlp`."""
    tracing = {"tracing": {"enabled": True, "endpoint": otlp.endpoint, "sampling_ratio": 1.0,
                           "export_interval_ms": 200}}
    deploy(TEST_PROFILE | {"telemetry": tracing}, "ref", "/")
    deploy(SIM_PROFILE, "sim", "/sim")
    urls = {"ref": serve_url, "sim": f"{serve_url}/sim"}
    for url in urls.values():
        wait_ready(url)
    yield urls


@pytest.fixture(scope="session")
def client(stack):
    from openai import OpenAI

    with OpenAI(base_url=f"{stack['ref']}/v1", api_key="unused", max_retries=0,
                timeout=60) as openai_client:
        yield openai_client


@pytest.fixture(scope="session")
def sim_client(stack):
    from openai import OpenAI

    with OpenAI(base_url=f"{stack['sim']}/v1", api_key="unused", max_retries=0,
                timeout=60) as openai_client:
        yield openai_client


@pytest.fixture(scope="session")
def ask(stack):
    """Call a deployment's method from the test driver: `ask(app, deployment, method)`.

    Handles bind their router to one event loop, so every call runs on one loop thread."""
    from ray import serve

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def call(app, deployment, method):
        return await getattr(serve.get_deployment_handle(deployment, app_name=app), method).remote()

    yield lambda *args: asyncio.run_coroutine_threadsafe(call(*args), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
