"""`small4 up` as ops run it: a process of its own (its own Ray), its metrics endpoint on loopback
and printed, and SIGTERM draining an open stream to its end before exiting 0.

It runs with `ray.throughput_optimized: false`, Serve's default mode (user code on a thread of
its own, actor calls between deployments), which the rest of the suite, throughput-optimized
like the default profile, never reaches: a streamed reply serialized after the prefill worker
moved on once failed every request there."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml

from bench.ports import free_port
from tests.e2e.conftest import SIM_PROFILE
from tests.keyfiles import write_keys

pytestmark = pytest.mark.ray


def lines_of(process: subprocess.Popen) -> tuple[queue.Queue, threading.Thread]:
    """The process's output lines as they come (None at the end), and the thread reading them."""
    out: queue.Queue = queue.Queue()

    def pump():
        for line in process.stdout:
            out.put(line.rstrip("\n"))
        out.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    return out, reader


def wait_for(lines: queue.Queue, prefix: str, seen: list[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no line starting {prefix!r} in {timeout}s; output:\n"
                         + "\n".join(seen[-40:]))


KEY = "sk-cli-e2e"
KEYED = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    port, metrics_port = free_port(), free_port()
    folder = tmp_path_factory.mktemp("up")
    keys = folder / "keys.yaml"
    write_keys(keys, {KEY: {"name": "e2e", "tenant": "e2e"}})
    profile = SIM_PROFILE | {"profile": "cli-e2e",
                             "auth": {"enabled": True, "keys_file": str(keys)},
                             "ray": {"num_cpus": 2, "object_store_mb": 128,
                                     "metrics_port": metrics_port,
                                     "throughput_optimized": False}}
    path = folder / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_ADDRESS") and k != "RAY_SERVE_THROUGHPUT_OPTIMIZED"}
    process = subprocess.Popen([sys.executable, "-m", "cluster.cli", "up", "--config", str(path),
                                "--port", str(port)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)
    (lines, reader), seen = lines_of(process), []
    try:
        serving = wait_for(lines, "small4 (cli-e2e", seen, timeout=240)
        metrics = wait_for(lines, "metrics (Prometheus): ", seen, timeout=10)
        yield {"process": process, "lines": lines, "seen": seen, "serving": serving,
               "url": f"http://127.0.0.1:{port}", "metrics_port": metrics_port,
               "metrics": metrics.split(": ", 1)[1]}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
        reader.join(timeout=30)  # at the end of the output, then the pipe can close
        process.stdout.close()


def test_up_prints_a_loopback_metrics_url_that_serves_prometheus(up):
    assert up["metrics"] == f"http://127.0.0.1:{up['metrics_port']}/metrics"
    deadline = time.monotonic() + 60
    while True:  # the metrics agent starts a little after the node
        try:
            reply = httpx.get(up["metrics"], timeout=5)
            if reply.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "metrics endpoint never answered"
        time.sleep(1)
    assert listening_on(up["metrics_port"]) == {"127.0.0.1"}


def listening_on(port: int) -> set[str]:
    """The local addresses a listening TCP socket on `port` is bound to (from /proc/net)."""
    import ipaddress

    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.readlines()[1:]:
                local, state = row.split()[1], row.split()[3]
                address, hexport = local.split(":")
                if state != "0A" or int(hexport, 16) != port:  # 0A: LISTEN
                    continue
                raw = bytes.fromhex(address)
                # the kernel writes each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(str(ipaddress.ip_address(raw)))
    return found


@pytest.mark.parametrize("words", [2, 40])
def test_prompts_whose_kv_rides_in_the_reply_or_is_held_are_answered(up, words):
    """A short prompt's KV rides in the prefill reply, a long one's is held in the object store
    for decode to fetch: both handoffs, in Serve's default mode."""
    body = {"model": "mistral-small-4", "max_tokens": 4,
            "messages": [{"role": "user", "content": "count " * words}]}
    reply = httpx.post(f"{up['url']}/v1/chat/completions", json=body, headers=KEYED,
                       timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_serves_proxy_refuses_a_request_without_a_key_before_its_body(up):
    """`small4 up` hands its keys file to Serve's proxy: a request declaring a 100 MB body
    and sending none of it is answered 401 by the proxy itself (counted there, in Prometheus),
    not queued for an ingress replica to refuse once it has the body."""
    import re

    port = int(up["url"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                     b"content-type: application/json\r\ncontent-length: 100000000\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401"), answer[:300]
    assert b'"invalid_api_key"' in answer
    pattern = re.compile(r'^ray_small4_edge_answers_total\{[^}]*status="401"[^}]*\} (\S+)', re.M)
    deadline, counted = time.monotonic() + 60, 0.0
    while counted < 1 and time.monotonic() < deadline:  # Ray's exporter: within seconds
        time.sleep(1)
        counted = sum(float(v) for v in pattern.findall(httpx.get(up["metrics"], timeout=10)
                                                        .text))
    assert counted >= 1


def test_sigterm_drains_an_open_stream_then_exits_zero(up):
    body = {"model": "mistral-small-4", "stream": True, "max_tokens": 300,
            "messages": [{"role": "user", "content": "count " * 40}]}
    events: list[str] = []
    with httpx.Client(timeout=httpx.Timeout(60.0)) as client, \
            client.stream("POST", f"{up['url']}/v1/chat/completions", json=body,
                          headers=KEYED) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 2:  # the stream is open and producing: stop the stack
                up["process"].send_signal(signal.SIGTERM)
    assert events[-1] == "[DONE]", events[-3:]
    finished = [json.loads(e) for e in events[:-1]]
    assert finished[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert up["process"].wait(timeout=120) == 0
    wait_for(up["lines"], "stopped", up["seen"], timeout=5)
    assert any(line.startswith("draining") for line in up["seen"])
