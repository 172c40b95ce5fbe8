"""Image bytes from a `data:` URL or, when enabled, an allow-listed http(s) URL.

No server-side request forgery: a URL is fetched only when URLs are enabled, its host is on the
allowlist, and every address the host resolves to is public (no private, loopback, link-local,
reserved or multicast ranges). The connection goes to the address that was checked (no second
DNS lookup to rebind), redirects are followed by hand and each target re-checked, and the body
is read up to the byte limit within the timeout.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from urllib.parse import urljoin, urlsplit

from services.errors import InvalidRequest
from services.settings import ImageSettings


def data_url_bytes(url: str, settings: ImageSettings, param: str) -> bytes:
    """Decode a base64 `data:` URL, refusing it before decoding when it is too large."""
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise InvalidRequest("data: image URLs must be base64-encoded", param=param)
    if len(payload) * 3 // 4 > settings.max_bytes + 3:
        raise InvalidRequest(f"image is larger than {settings.max_bytes} bytes", param=param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("image data is not valid base64", param=param) from None


def host_allowed(host: str, allowlist: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == entry or (entry.startswith(".") and host.endswith(entry))
               for entry in (e.lower() for e in allowlist))


def public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local
                                 or ip.is_reserved or ip.is_multicast or ip.is_unspecified)


async def resolve_public(url: str, settings: ImageSettings, param: str) -> tuple[str, str, int]:
    """Check `url` against the policy; return (host, a public address, port) to connect to."""
    if not settings.allow_urls:
        raise InvalidRequest("image URLs are disabled on this endpoint; send the image as a "
                             "data: URL", param=param)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest("image URLs must be http(s) or data:", param=param)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if not host_allowed(host, settings.url_allowlist):
        raise InvalidRequest(f"image host {host!r} is not allowed", param=param)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise InvalidRequest(f"image host {host!r} does not resolve", param=param) from None
    addresses = sorted({info[4][0] for info in infos})
    if not addresses or not all(public_address(a) for a in addresses):
        raise InvalidRequest(f"image host {host!r} resolves to a non-public address",
                             param=param)
    return host, addresses[0], port


async def fetch_url_bytes(url: str, settings: ImageSettings, param: str) -> bytes:
    """GET an image URL under the policy, following at most `max_redirects` checked hops."""
    import httpx

    async with httpx.AsyncClient(timeout=settings.url_timeout_s, follow_redirects=False,
                                 trust_env=False) as client:
        for _ in range(settings.max_redirects + 1):
            host, address, port = await resolve_public(url, settings, param)
            parts = urlsplit(url)
            pinned = parts._replace(netloc=f"[{address}]:{port}" if ":" in address
                                    else f"{address}:{port}").geturl()
            request = client.build_request("GET", pinned, headers={"Host": parts.netloc},
                                           extensions={"sni_hostname": host})
            try:
                response = await client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise InvalidRequest(f"image URL could not be fetched: {type(exc).__name__}",
                                     param=param) from None
            async with response:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("location", ""))
                    continue
                if response.status_code != 200:
                    raise InvalidRequest(f"image URL answered {response.status_code}",
                                         param=param)
                return await _read_limited(response, settings.max_bytes, param)
    raise InvalidRequest(f"image URL redirected more than {settings.max_redirects} times",
                         param=param)


async def _read_limited(response, limit: int, param: str) -> bytes:
    body = bytearray()
    async for piece in response.aiter_bytes():
        body += piece
        if len(body) > limit:
            raise InvalidRequest(f"image is larger than {limit} bytes", param=param)
    return bytes(body)


async def image_bytes(url: str, settings: ImageSettings, param: str) -> bytes:
    """The bytes behind an `image_url`, under the settings' policy."""
    if url.startswith("data:"):
        return data_url_bytes(url, settings, param)
    return await fetch_url_bytes(url, settings, param)
