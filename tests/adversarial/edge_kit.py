"""Helpers of the edge's adversarial tests: keys, request bodies, raw sockets, and the /health
watcher that measures how the ingress answers while an attack runs."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx

KEYS = {"alpha": "sk-edge-alpha", "alpha-twin": "sk-edge-alpha-twin", "beta": "sk-edge-beta",
        "slow": "sk-edge-slow"}
ROUTE = "/adv-edge"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def edge_profile(keys_file: str) -> dict:
    node = {"num_cpus": 0.1}
    return {
        "profile": "adv-edge",
        "auth": {"enabled": True, "keys_file": keys_file, "reload_s": 60},
        "model": {"context_length": 4096},
        "engine": {"kind": "simulated", "simulated": {"decode_step_ms": 5, "output": "echo"}},
        "pools": {"fast": {"effort": "none", "prefill": node, "decode": node},
                  "deep": {"effort": "high", "prefill": node, "decode": node}},
        "ingress": {"num_cpus": 0.1, "max_ongoing_requests": 10},
        # an image's data: URL within a string the limits allow (settings refuse it otherwise)
        "multimodal": node | {"images": {"max_bytes": 512 * 1024}},
        "limits": {"max_body_bytes": 4 * 1024 * 1024, "max_string_bytes": 1024 * 1024,
                   "body_idle_timeout_s": 1.0, "body_timeout_s": 20.0,
                   "max_uploads": 6, "max_uploads_per_key": 3, "upload_wait_s": 0.3},
        "stream": {"interval_tokens": 4, "interval_ms": 50},
    }


def wait_health(url: str, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy in {timeout}s")


def auth(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[name]}"}


def chat_body(**extra) -> dict:
    return {"model": "mistral-small-4", "max_tokens": 4,
            "messages": [{"role": "user", "content": "hello"}]} | extra


def raw_connection(url: str) -> socket.socket:
    """A plain TCP connection to the server of `url` (for requests httpx will not send)."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    return sock


def read_response(sock: socket.socket, timeout: float) -> tuple[int, bytes]:
    """The status and raw bytes of the answer on `sock` (until close or `timeout`)."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, socket.timeout):
            break
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep and b"content-length:" in head.lower():
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            if len(body) >= length:
                break
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data


@contextmanager
def health_watch(url: str, name: str):
    """Poll `url`/health every 50 ms in a thread while the block runs; yields the latencies
    (seconds, None for no answer within 10 s), printed with their maximum at the end."""
    latencies: list[float | None] = []
    stop = threading.Event()

    def poll():
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    ok = client.get(f"{url}/health").status_code == 200
                    latencies.append(time.perf_counter() - started if ok else None)
                except httpx.HTTPError:
                    latencies.append(None)
                stop.wait(0.05)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield latencies
    finally:
        deadline = time.time() + 10  # at least two polls, however short the attack
        while len(latencies) < 2 and time.time() < deadline:
            time.sleep(0.02)
        stop.set()
        thread.join(15)
        answered = [x for x in latencies if x is not None]
        print(f"\n/health during {name}: {len(answered)}/{len(latencies)} answered, "
              f"max {max(answered, default=float('nan')) * 1000:.1f} ms, "
              f"median {sorted(answered)[len(answered) // 2] * 1000 if answered else 0:.1f} ms")


def assert_health_answered(latencies: list[float | None], bound_s: float = 5.0) -> None:
    """Every poll answered, each within a generous bound (the figure is printed, not
    asserted tightly)."""
    assert latencies, "no /health poll completed"
    assert all(x is not None and x < bound_s for x in latencies), latencies
