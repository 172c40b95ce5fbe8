"""Image bytes from a `data:` URL or, when enabled, an allow-listed http(s) URL.

No server-side request forgery: a URL is fetched only when URLs are enabled, its host is on the
allowlist, and every address the host resolves to is public (`services.multimodal.addresses`).
The connection goes to the address that was checked (no second DNS lookup to rebind), with the
host alone in `Host` (credentials in the URL are dropped, never sent); redirects are followed by
hand, each target checked again, up to `max_redirects`. The whole fetch, every hop and every
byte of the body, runs under one deadline (`url_timeout_s`, or sooner the request's own), and
the body is read up to the byte limit as it streams.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import socket
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from services.errors import DeadlineExceeded, InvalidRequest
from services.multimodal.addresses import public_address
from services.settings import ImageSettings


def check_data_url_size(url: str, max_bytes: int, param: str) -> None:
    """Refuse a `data:` URL whose payload decodes to more than `max_bytes`, from its length
    alone (no decoding): the ingress checks it before sending a request on, the image service
    before decoding."""
    if url[:5].lower() == "data:" and (len(url) - url.find(",") - 1) * 3 // 4 > max_bytes + 3:
        raise InvalidRequest(f"image is larger than {max_bytes} bytes", param=param)


def data_url_bytes(url: str, settings: ImageSettings, param: str) -> bytes:
    """Decode a base64 `data:` URL, refusing it before decoding when it is too large."""
    header, _, payload = url.partition(",")
    if ";base64" not in header.lower():  # MIME parameters are case-insensitive (RFC 2397)
        raise InvalidRequest("data: image URLs must be base64-encoded", param=param)
    check_data_url_size(url, settings.max_bytes, param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("image data is not valid base64", param=param) from None


def _shown(text: str, limit: int = 80) -> str:
    """`text` quoted for an error message, cut to `limit` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def host_allowed(host: str, allowlist: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == entry or (entry.startswith(".") and host.endswith(entry))
               for entry in (_ascii_name(e.lower()) for e in allowlist))


def _ascii_name(name: str) -> str:
    """An allow-list entry as hosts are compared: an internationalised name in its IDNA form
    (a leading dot, for a domain's subdomains, kept)."""
    dot, bare = ("." if name.startswith(".") else ""), name.lstrip(".")
    try:
        return dot + bare.encode("idna").decode("ascii")
    except UnicodeError:
        return name


@dataclass(frozen=True)
class Target:
    """Where one hop of a fetch goes: the URL's parts without its credentials."""

    scheme: str
    host: str
    port: int
    path: str

    @property
    def host_header(self) -> str:
        name = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return name if self.port == default else f"{name}:{self.port}"

    def url_at(self, address: str) -> str:
        """This target's URL with `address` in place of the host name."""
        literal = f"[{address}]" if ":" in address else address
        return f"{self.scheme}://{literal}:{self.port}{self.path}"


# the longest image URL taken (servers and CDNs take ~8 KB request lines): a longer one is
# refused by its length alone, before any parsing on the image service's event loop (a URL
# may otherwise be as long as a string of the body: 16 MB cost ~1 s to check here)
MAX_URL_CHARS = 8192
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def parse_target(url: str, param: str) -> Target:
    """`url`'s scheme, host, port and path, or a 400 naming `param` when it is malformed."""
    if len(url) > MAX_URL_CHARS:
        raise InvalidRequest(f"image URL is {len(url)} characters; at most {MAX_URL_CHARS} are "
                             "taken (send a long one as a data: URL)", param=param)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidRequest(f"image URL is malformed ({_shown(str(exc))})", param=param) from None
    if parts.scheme not in ("http", "https"):
        raise InvalidRequest("image URLs must be http(s) or data:", param=param)
    if not parts.hostname:
        raise InvalidRequest("image URL has no host", param=param)
    try:  # sent as it is looked up: an internationalised name in its ASCII (IDNA) form
        host = parts.hostname.encode("idna").decode("ascii")
    except UnicodeError:
        raise InvalidRequest(f"image URL's host {_shown(parts.hostname)} is not a valid "
                             "name", param=param) from None
    if _CONTROL.search(url):
        raise InvalidRequest("image URL has a control character", param=param)
    if port == 0:
        raise InvalidRequest("image URL has port 0", param=param)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    default = 443 if parts.scheme == "https" else 80
    return Target(parts.scheme, host, default if port is None else port, path)


async def resolve_public(target: Target, settings: ImageSettings, param: str) -> str:
    """Check `target` against the policy; return a public address of its host to connect to."""
    if not host_allowed(target.host, settings.url_allowlist):
        raise InvalidRequest(f"image host {_shown(target.host)} is not allowed", param=param)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(target.host, target.port,
                                                             type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        raise InvalidRequest(f"image host {_shown(target.host)} does not resolve",
                             param=param) from None
    addresses = sorted({info[4][0] for info in infos})
    admit = settings.admit_loopback_for_tests
    if not addresses or not all(public_address(a, admit) for a in addresses):
        raise InvalidRequest(f"image host {_shown(target.host)} resolves to a non-public "
                             "address",
                             param=param)
    return addresses[0]


async def fetch_url_bytes(url: str, settings: ImageSettings, param: str,
                          deadline: float | None = None) -> bytes:
    """GET an image URL under the policy, the whole fetch within `url_timeout_s` (or the
    request's `deadline`, epoch seconds, when that comes first)."""
    if not settings.allow_urls:
        raise InvalidRequest("image URLs are disabled on this endpoint; send the image as a "
                             "data: URL", param=param)
    budget = settings.url_timeout_s
    request_left = None if deadline is None else deadline - time.time()
    try:
        async with asyncio.timeout(budget if request_left is None
                                   else min(budget, request_left)):
            return await _fetch(url, settings, param)
    except TimeoutError:
        if request_left is not None and request_left < budget:
            raise DeadlineExceeded("the request's deadline passed while an image URL was "
                                   "fetched", param="x-request-timeout") from None
        raise InvalidRequest(f"image URL did not send the whole image within "
                             f"{budget:g} s", param=param) from None


async def _fetch(url: str, settings: ImageSettings, param: str) -> bytes:
    import httpx

    async with httpx.AsyncClient(timeout=settings.url_timeout_s, follow_redirects=False,
                                 trust_env=False) as client:
        for _ in range(settings.max_redirects + 1):
            target = parse_target(url, param)
            address = await resolve_public(target, settings, param)
            try:
                async with client.stream("GET", target.url_at(address),
                                         # a compressed body would be inflated before
                                         # its size is known (a gzip bomb): none asked for
                                         headers={"Host": target.host_header,
                                                  "Accept-Encoding": "identity"},
                                         extensions={"sni_hostname": target.host}) as response:
                    if response.is_redirect:
                        url = _next_hop(url, response, param)
                        continue
                    if response.status_code != 200:
                        raise InvalidRequest(f"image URL answered {response.status_code}",
                                             param=param)
                    encoding = response.headers.get("content-encoding", "").strip().lower()
                    if encoding not in ("", "identity"):
                        raise InvalidRequest(f"image URL sent a {encoding}-encoded body; the "
                                             "image must be sent as it is", param=param)
                    return await _read_limited(response, settings.max_bytes, param)
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise InvalidRequest(f"image URL could not be fetched: {type(exc).__name__}",
                                     param=param) from None
    raise InvalidRequest(f"image URL redirected more than {settings.max_redirects} times",
                         param=param)


def _next_hop(url: str, response, param: str) -> str:
    location = response.headers.get("location")
    if not location:
        raise InvalidRequest(f"image URL answered {response.status_code} without a Location",
                             param=param)
    return urljoin(url, location)


async def _read_limited(response, limit: int, param: str) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise InvalidRequest(f"image is larger than {limit} bytes", param=param)
    body = bytearray()
    async for piece in response.aiter_raw():  # as sent: never inflated here
        body += piece
        if len(body) > limit:
            raise InvalidRequest(f"image is larger than {limit} bytes", param=param)
    return bytes(body)

