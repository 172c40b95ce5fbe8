"""Hostile images and a real image server on loopback, for the image tiers.

Images are built here, byte by byte where an encoder would not write them: a progressive JPEG
with as many scans as asked (its last scan repeated), a JPEG whose header declares any size over
almost no data. The server is `http.server` on 127.0.0.1 with the routes the URL tests need,
recording every request's headers.
"""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

MODEL = "mistral-small-4"
EFFORTS = ("none", "minimal", "low", "medium", "high")


def images_profile(**images) -> dict:
    """A small stack on the reference engine (one pool) whose image policy is `images`."""
    return {
        "profile": "adversarial-images", "auth": {"enabled": False},
        "model": {"context_length": 8192},
        "routing": {"effort_map": {e: "none" for e in EFFORTS}},
        "pools": {"fast": {"effort": "none", "max_queue": 32,
                           "prefill": {"num_cpus": 0.1}, "decode": {"num_cpus": 0.1}}},
        "ingress": {"num_cpus": 0.1},
        "multimodal": {"num_cpus": 0.1, "images": images},
    }


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of a JPEG's segments; a scan's segment includes its coded data."""
    i, out = 2, []
    while i < len(data):
        marker = data[i + 1]
        if marker == 0xD9:
            out.append((marker, i, i + 2))
            break
        end = i + 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
        while marker == 0xDA:  # coded data runs to the next marker that is not a restart
            end = data.index(b"\xff", end)
            if data[end + 1] != 0 and not 0xD0 <= data[end + 1] <= 0xD7:
                break
            end += 2
        out.append((marker, i, end))
        i = end
    return out


def many_scan_jpeg(width: int, height: int, scans: int) -> bytes:
    """A valid progressive JPEG of one colour with `scans` scans (decoders accept repeats)."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    found = [(s, e) for m, s, e in jpeg_segments(data) if m == 0xDA]
    start, end = found[-1]
    return data[:end] + data[start:end] * (scans - len(found)) + data[end:]


def declared_size_jpeg(width: int, height: int) -> bytes:
    """A few hundred bytes of baseline RGB JPEG whose header declares `width` x `height`: its
    coded data ends at once, which decoders fill in (grey) at the full declared size."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(buf, "JPEG", quality=50)
    data, out = buf.getvalue(), b"\xff\xd8"
    for marker, start, end in jpeg_segments(data):
        if marker == 0xC0:
            segment = bytearray(data[start:end])
            struct.pack_into(">HH", segment, 5, height, width)
            out += bytes(segment)
        elif marker == 0xDA:
            out += data[start:start + 2 + struct.unpack(">H", data[start + 2:start + 4])[0]]
        elif marker in (0xDB, 0xC4):
            out += data[start:end]
    return out + b"\xff\xd9"


def png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def chat(*urls: str, text: str = "What is this?") -> list[dict]:
    """One user turn: the text part (index 0), then one part per image (indices 1...)."""
    parts = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts}]


class _QuietServer(ThreadingHTTPServer):
    """Clients that hang up mid-answer (a fetch cut at its deadline) are expected here."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass


class ImageServer:
    """A threading HTTP server on 127.0.0.1 serving the URL tests' routes:

    `/cat.png` an image; `/hop/N` redirects N more times, then to `/cat.png`; `/loop` redirects
    to itself; `/redirect?to=URL` redirects to URL; `/drip` sends a byte every `drip_s`;
    `/huge` streams `huge_bytes` without a Content-Length; `/declared-huge` declares a large
    Content-Length. `requests` holds (path, headers) of everything asked.
    """

    def __init__(self, drip_s: float = 2.0, huge_bytes: int = 3 * 1024 * 1024):
        self.image = png(40, 30, seed=3)
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.drip_s, self.huge_bytes = drip_s, huge_bytes
        self.stopping = threading.Event()
        self.server = _QuietServer(("127.0.0.1", 0), self._handler())
        self.port = self.server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                owner.requests.append((self.path, dict(self.headers.items())))
                owner.route(self)

            def log_message(self, *args):
                pass

        return Handler

    def route(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path
        if path == "/cat.png":
            return self._send(h, 200, self.image)
        if path.startswith("/hop/"):
            left = int(path.rsplit("/", 1)[1])
            return self._redirect(h, f"/hop/{left - 1}" if left > 1 else "/cat.png")
        if path == "/loop":
            return self._redirect(h, "/loop")
        if path.startswith("/redirect?to="):
            return self._redirect(h, path.split("=", 1)[1])
        if path == "/drip":
            return self._drip(h)
        if path == "/huge":
            return self._chunked(h, self.huge_bytes)
        if path == "/gzip-bomb":  # 64 MiB of zeros in ~64 KiB, sent compressed anyway
            import gzip

            body = gzip.compress(bytes(64 * 1024 * 1024), compresslevel=1)
            h.send_response(200)
            h.send_header("Content-Encoding", "gzip")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return None
        if path == "/declared-huge":
            h.send_response(200)
            h.send_header("Content-Length", str(self.huge_bytes))
            h.end_headers()
            return None
        return self._send(h, 404, b"no such image")

    @staticmethod
    def _send(h, status: int, body: bytes) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    @staticmethod
    def _redirect(h, location: str) -> None:
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _drip(self, h) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(self.image)))
        h.end_headers()
        deadline = time.monotonic() + 60
        for byte in self.image:
            if self.stopping.wait(self.drip_s) or time.monotonic() > deadline:
                return
            try:
                h.wfile.write(bytes([byte]))
                h.wfile.flush()
            except OSError:
                return

    def _chunked(self, h, total: int) -> None:
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        piece = b"\0" * 65536
        try:
            for _ in range(total // len(piece) + 1):
                h.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            h.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass
