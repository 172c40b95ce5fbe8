"""One trace per request across Ray processes; metrics that move by exactly what was served."""

from __future__ import annotations

import base64
import io
import json
import re
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.ray
MODEL = "mistral-small-4"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def image_url() -> str:
    pixels = np.random.default_rng(3).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_one_streamed_image_request_is_one_trace_across_processes(stack, otlp):
    body = {"model": MODEL, "stream": True, "max_tokens": 6, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": image_url()}}]}]}
    headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
    with httpx.stream("POST", f"{stack['ref']}/v1/chat/completions", json=body, headers=headers,
                      timeout=60) as reply:
        assert reply.status_code == 200 and reply.headers["x-trace-id"] == CLIENT_TRACE
        request_id = reply.headers["x-small4-request-id"]
        assert list(reply.iter_lines())[-2] == "data: [DONE]"
    wanted = {"POST /v1/chat/completions", "preprocess", "multimodal", "route", "decode",
              "prefill", "kv_handoff"}
    deadline = time.time() + 20
    while time.time() < deadline and not wanted <= {s["name"] for s in otlp.trace(CLIENT_TRACE)}:
        time.sleep(0.3)
    spans = {s["name"]: s for s in otlp.trace(CLIENT_TRACE)}
    assert wanted <= set(spans), f"missing spans: {wanted - set(spans)}"
    server = spans["POST /v1/chat/completions"]
    assert server["parent_id"] == CLIENT_SPAN
    # the first leg's prefill is run from the ingress (kv_handoff.ingress_prefill), beside the
    # decode leg that receives its KV
    for child in ("preprocess", "route", "decode", "prefill"):
        assert spans[child]["parent_id"] == server["span_id"], child
    assert spans["multimodal"]["parent_id"] == spans["preprocess"]["span_id"]
    assert spans["kv_handoff"]["parent_id"] == spans["decode"]["span_id"]
    hops = ("route", "multimodal", "decode", "prefill")
    roles = {spans[n]["resource"]["small4.role"] for n in hops}
    pids = {spans[n]["resource"]["process.pid"] for n in hops}
    assert roles == {"ingress", "multimodal", "decode", "prefill"} and len(pids) == 4
    assert spans["multimodal"]["attributes"]["small4.images"] == 1
    assert spans["preprocess"]["attributes"]["small4.images"] == 1
    assert spans["route"]["attributes"]["small4.pool"] == "fast"
    assert spans["prefill"]["attributes"]["small4.prompt_tokens"] > 10
    assert spans["kv_handoff"]["attributes"]["small4.kv_bytes"] > 0
    assert spans["decode"]["attributes"]["small4.tokens_out"] == 6
    assert spans["decode"]["attributes"]["small4.finish_reason"] == "length"
    # every span of this request (by request id) belongs to the client's trace
    mine = [s for s in otlp.spans if s["attributes"].get("small4.request_id") == request_id]
    assert mine and {s["trace_id"] for s in mine} == {CLIENT_TRACE}


def test_errors_carry_the_trace_id_and_are_recorded_on_the_span(stack, otlp):
    trace = "0af7651916cd43dd8448eb211c80319c"
    reply = httpx.post(f"{stack['ref']}/v1/chat/completions",
                       json={"model": MODEL, "messages": [], "max_tokens": 1},
                       headers={"traceparent": f"00-{trace}-b7ad6b7169203331-01"})
    assert reply.status_code == 400
    assert reply.json()["error"]["trace_id"] == trace == reply.headers["x-trace-id"]
    deadline = time.time() + 10  # until the server span came (its children may come first)
    while time.time() < deadline and not any(s["name"].startswith("POST")
                                             for s in otlp.trace(trace)):
        time.sleep(0.2)
    # recorded as an event; the span's status stays unset for a client's 4xx (OpenTelemetry's
    # HTTP conventions: error views count the stack's failures, not clients' mistakes)
    (server,) = [s for s in otlp.trace(trace) if s["name"].startswith("POST")]
    assert server["status"] == 0 and "exception" in server["events"]


def log_lines(request_ids: set[str], timeout: float = 20.0) -> dict[str, dict]:
    """The JSON log lines of `request_ids`, by request id, from the Ray workers' own stderr
    (`logs/worker-*.err`, where a replica's `small4` lines go) within `timeout`."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    found: dict[str, dict] = {}
    deadline = time.time() + timeout
    while time.time() < deadline:
        for path in logs.glob("worker-*.err"):
            for line in path.read_text(errors="replace").splitlines():
                # a line is one JSON object and nothing else (other output shares the file)
                if line.startswith("{") and any(r in line for r in request_ids):
                    entry = json.loads(line)
                    if entry.get("request_id") in request_ids:
                        found[entry["request_id"]] = entry
        if set(found) == request_ids:
            break
        time.sleep(0.3)
    return found


def test_every_request_leaves_one_json_line_with_its_ids_and_replica(stack):
    """An SRE reads a request id off an answer or an error body and finds its log line, as
    JSON, naming the trace and the replica, as soon as the request ended (no buffer holds it
    back, no other format wraps it)."""
    trace = "5b8efff798038103d269b633813fc60c"
    headers = {"traceparent": f"00-{trace}-eee19b7ec3c1b174-01"}
    body = {"model": MODEL, "stream": True, "max_tokens": 3,
            "messages": [{"role": "user", "content": "Say hi."}]}
    with httpx.stream("POST", f"{stack['ref']}/v1/chat/completions", json=body,
                      headers=headers, timeout=60) as reply:
        assert reply.status_code == 200
        answered = reply.headers["x-small4-request-id"]
        assert list(reply.iter_lines())[-2] == "data: [DONE]"
    refused = httpx.post(f"{stack['ref']}/v1/chat/completions", headers=headers, timeout=60,
                         json={"model": MODEL, "messages": [], "max_tokens": 1})
    assert refused.status_code == 400
    refused_id = refused.headers["x-small4-request-id"]
    lines = log_lines({answered, refused_id})
    assert set(lines) == {answered, refused_id}, "a request's log line is missing"
    done, no = lines[answered], lines[refused_id]
    assert (done["message"], done["trace_id"], done["finish_reason"]) == (
        "request done", trace, "length")
    assert done["prompt_tokens"] > 0 and done["completion_tokens"] == 3
    assert (no["message"], no["trace_id"], no["status"], no["error_type"]) == (
        "request refused", trace, 400, "invalid_request_error")
    for entry in (done, no):
        assert (entry["app"], entry["deployment"]) == ("ref", "ingress") and entry["replica"]
        assert entry["elapsed_ms"] > 0


SAMPLE = re.compile(r'^(\w+)\{([^}]*)\} ([0-9.eE+-]+)$')


def scrape(url: str) -> dict[tuple[str, str, str], float]:
    """Sum of each (metric, pool, role) sample over every Ray worker exporting it."""
    totals: dict[tuple[str, str, str], float] = defaultdict(float)
    for line in httpx.get(url, timeout=10).text.splitlines():
        match = SAMPLE.match(line)
        if not match or not match.group(1).startswith("ray_small4_"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
        if "le" in labels:
            continue
        key = (match.group(1), labels.get("pool", ""), labels.get("role", ""))
        totals[key] += float(match.group(3))
    return totals


def settle_until(url: str, before: dict, expected: dict, timeout: float = 60.0) -> dict:
    """Scrape until every key in `expected` moved by its expected amount (or time runs out);
    each Ray worker exports on its own schedule."""
    deadline = time.time() + timeout
    while True:
        now = scrape(url)
        moved = {k: now.get(k, 0) - before.get(k, 0) for k in expected}
        if moved == expected or time.time() > deadline:
            return moved
        time.sleep(1.0)


def quiet(url: str, keys, timeout: float = 30.0) -> dict:
    """Scrape until `keys` stop moving: earlier tests' metrics have all arrived."""
    last, deadline = scrape(url), time.time() + timeout
    while time.time() < deadline:
        time.sleep(2.5)
        now = scrape(url)
        if all(now.get(k) == last.get(k) for k in keys):
            return now
        last = now
    return last


def test_metrics_move_by_exactly_the_requests_served(client, metrics_url):
    n = 5
    keys = [("ray_small4_ttft_seconds_count", "fast", role)
            for role in ("ingress", "decode", "prefill")]
    keys += [("ray_small4_e2e_seconds_count", "fast", "ingress"),
             ("ray_small4_completion_tokens_total", "fast", ""),
             ("ray_small4_itl_seconds_count", "fast", "decode")]
    before = quiet(metrics_url, keys)
    completion = sum(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"count {i}"}], max_tokens=4 + i,
        temperature=0).usage.completion_tokens for i in range(n))
    expected = dict.fromkeys(keys[:4], n)
    expected[keys[4]] = completion
    expected[keys[5]] = completion - n  # one ITL observation per token after the first
    assert settle_until(metrics_url, before, expected) == expected
    assert scrape(metrics_url)[("ray_small4_kv_tokens_capacity", "fast", "decode")] > 0
