"""Hostile images over HTTP against a running stack (reference engine, stand-in model): refused
from their headers with a 400 naming the part, cut at the request's deadline with a 504, tiny
and extreme images answered, image URLs fetched from a loopback server; and `/health` measured
while all of it runs at once."""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from _images_fixtures import (MODEL, ImageServer, chat, data_url, declared_size_jpeg,
                              images_profile, many_scan_jpeg, png)

pytestmark = pytest.mark.ray
JPEG = "image/jpeg"
SCAN_LIMIT = 3000
# about 20 s of decoding on one core: within the scan limit, far over a 2 s deadline
SLOW_JPEG = data_url(many_scan_jpeg(3000, 3000, SCAN_LIMIT - 100), JPEG)


@pytest.fixture(scope="module")
def server():
    serving = ImageServer(drip_s=2.0)
    yield serving
    serving.close()


@pytest.fixture(scope="module")
def base(serve_url):
    from tests.e2e.conftest import deployed

    with deployed(images_profile(
            max_jpeg_scans=SCAN_LIMIT, allow_urls=True, admit_loopback_for_tests=True,
            url_allowlist=["127.0.0.1", "localhost"], url_timeout_s=3.0,
            max_bytes=2 * 1024 * 1024), "adv-images", serve_url) as url:
        yield url


def ask(base: str, *urls: str, timeout: float = 60.0, headers=None) -> httpx.Response:
    body = {"model": MODEL, "messages": chat(*urls), "max_tokens": 3, "temperature": 0}
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers,
                      timeout=timeout)


def refused(response: httpx.Response, status: int, param: str, fragment: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"], error


def test_a_jpeg_with_more_scans_than_the_limit_is_a_400(base):
    response = ask(base, data_url(png(8, 8)), data_url(many_scan_jpeg(2000, 2000, 5000), JPEG))
    refused(response, 400, "messages.0.content.2.image_url", "start-of-scan markers")


def test_tiny_files_declaring_huge_images_are_refused_by_their_sum(base):
    bombs = [data_url(declared_size_jpeg(6000, 6000), JPEG)] * 8
    refused(ask(base, *bombs), 400, "messages.0.content.2.image_url",
            "more than 48000000 pixels together")


def test_images_over_the_context_are_refused_from_their_headers(base):
    """Three tiny files declaring 1540 x 1540 (3,080 tokens each) cannot fit the 8,192-token
    context: the image service refuses them from their headers, before decoding, and its
    error crosses the Serve hop as the same 400."""
    images = [data_url(declared_size_jpeg(1540, 1540), JPEG)] * 3
    refused(ask(base, *images), 400, "messages", "images take 9240")
    assert ask(base, *images[:2]).status_code == 200  # 6,160 tokens fit


def test_decoding_is_cut_at_the_request_timeout(base):
    start = time.perf_counter()
    response = ask(base, SLOW_JPEG, headers={"x-request-timeout": "2"}, timeout=30)
    print(f"\nx-request-timeout 2 over a ~20 s decode: answered in "
          f"{time.perf_counter() - start:.2f} s")
    refused(response, 504, "x-request-timeout", "images were being fetched or decoded")


@pytest.mark.parametrize("size", [(1, 1), (1, 4000), (4000, 1)], ids=str)
def test_tiny_and_extreme_images_are_answered(base, size):
    response = ask(base, data_url(png(*size)))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3


def test_an_image_url_is_fetched_without_its_credentials(base, server):
    before = len(server.requests)
    response = ask(base, f"http://user:secret@127.0.0.1:{server.port}/hop/2")
    assert response.status_code == 200, response.text
    hops = server.requests[before:]
    assert [p for p, _ in hops] == ["/hop/2", "/hop/1", "/cat.png"]
    assert all(h["Host"] == f"127.0.0.1:{server.port}" and "Authorization" not in h
               and "secret" not in str(h) for _, h in hops)


@pytest.mark.parametrize("url, fragment", [
    ("http://localhost:99999/x.png", "malformed"),
    ("http://[::1/x.png", "malformed"),
    ("http://[2002:7f00:1::]/x.png", "not allowed"),
])
def test_malformed_image_urls_are_a_400(base, url, fragment):
    refused(ask(base, url), 400, "messages.0.content.1.image_url", fragment)


def test_a_dripping_image_url_is_cut_at_the_fetch_deadline(base, server):
    refused(ask(base, f"{server.base}/drip", timeout=30), 400,
            "messages.0.content.1.image_url", "within 3 s")


def test_health_answers_while_every_image_attack_runs_at_once(base, server):
    attacks = [
        lambda: ask(base, SLOW_JPEG, headers={"x-request-timeout": "2"}, timeout=60),
        lambda: ask(base, data_url(many_scan_jpeg(2000, 2000, 5000), JPEG)),
        lambda: ask(base, *[data_url(declared_size_jpeg(6000, 6000), JPEG)] * 8),
        lambda: ask(base, data_url(png(1, 1))),
        lambda: ask(base, f"{server.base}/drip", timeout=60),
        lambda: ask(base, f"{server.base}/huge"),
    ] * 3
    idle = health_latencies(base, threading.Event(), probes=20)
    stop = threading.Event()
    with ThreadPoolExecutor(len(attacks) + 1) as pool:
        prober = pool.submit(health_latencies, base, stop)
        statuses = [f.result().status_code for f in [pool.submit(a) for a in attacks]]
        stop.set()
        busy = prober.result()
    print(f"\n/health idle: {summary(idle)}\n/health under {len(attacks)} image attacks at "
          f"once: {summary(busy)}")
    assert sorted(set(statuses)) == [200, 400, 504], statuses


def health_latencies(base: str, stop: threading.Event, probes: int = 10_000) -> list[float]:
    """Seconds each `/health` took, probed every 50 ms until `stop` or `probes` probes."""
    latencies = []
    with httpx.Client(timeout=10) as client:
        while not stop.is_set() and len(latencies) < probes:
            start = time.perf_counter()
            assert client.get(f"{base}/health").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.05)
    return latencies


def summary(latencies: list[float]) -> str:
    ms = sorted(1e3 * s for s in latencies)
    return (f"{len(ms)} probes, p50 {statistics.median(ms):.1f} ms, "
            f"p90 {ms[int(0.9 * (len(ms) - 1))]:.1f} ms, max {ms[-1]:.1f} ms")
