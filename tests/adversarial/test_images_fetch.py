"""Image URLs fetched from a real HTTP server on loopback, through the test-only policy that
admits loopback: redirects re-checked on every hop and bounded, a drip cut at the whole fetch's
deadline, bodies cut at the byte limit while they stream, credentials never sent; malformed URLs
and IPv6 forms of private IPv4 addresses refused with a 400 naming the part."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml
from _images_fixtures import ImageServer, chat

from services.errors import InvalidRequest
from services.multimodal.addresses import public_address
from services.multimodal.preprocess import MultimodalPreprocessor
from services.multimodal.sources import fetch_url_bytes
from services.settings import ImageSettings

PARAM = "messages.0.content.1.image_url"
PROFILES = Path(__file__).resolve().parents[2] / "cluster" / "profiles"


def policy(**changes) -> ImageSettings:
    return ImageSettings(**{"allow_urls": True, "admit_loopback_for_tests": True,
                            "url_allowlist": ("127.0.0.1", "localhost", "10.1.2.3"),
                            "url_timeout_s": 3.0, "max_bytes": 1024 * 1024, **changes})


@pytest.fixture(scope="module")
def server():
    serving = ImageServer(drip_s=2.0)
    yield serving
    serving.close()


def fetch(url: str, settings: ImageSettings | None = None) -> bytes:
    return asyncio.run(fetch_url_bytes(url, settings or policy(), PARAM))


def refused(url: str, fragment: str, settings: ImageSettings | None = None) -> InvalidRequest:
    with pytest.raises(InvalidRequest, match=fragment) as err:
        fetch(url, settings)
    assert err.value.param == PARAM and err.value.status == 400
    return err.value


def test_an_image_url_is_fetched_and_encoded(server, tokenizer):
    pre = MultimodalPreprocessor(tokenizer, policy())
    prompt = asyncio.run(pre.encode(chat(f"{server.base}/cat.png"), effort="none"))
    assert len(prompt.images) == 1 and prompt.images[0].shape == (3, 56, 56)


def test_the_requests_own_images_are_checked_before_any_url_is_fetched(server, tokenizer):
    """Cheapest first: a data-URL image that is refused (bad base64, a header over the
    limits) stops the request before the URLs beside it cost a fetch."""
    pre = MultimodalPreprocessor(tokenizer, policy())
    before = len(server.requests)
    urls = [f"{server.base}/cat.png?{i}" for i in range(3)]
    with pytest.raises(InvalidRequest, match="not valid base64") as err:
        asyncio.run(pre.encode(chat(*urls, "data:image/png;base64,@@@@"), effort="none"))
    assert err.value.param == "messages.0.content.4.image_url"
    assert server.requests[before:] == []


def test_credentials_in_the_url_are_never_sent(server):
    before = len(server.requests)
    assert fetch(f"http://user:secret@127.0.0.1:{server.port}/cat.png") == server.image
    (path, headers), = server.requests[before:]
    assert headers["Host"] == f"127.0.0.1:{server.port}"
    assert not any("secret" in v or "user" in v.lower().split(":")[0] for v in headers.values())
    assert "Authorization" not in headers


def test_redirects_are_followed_up_to_the_hop_limit(server):
    assert fetch(f"{server.base}/hop/3") == server.image
    refused(f"{server.base}/hop/4", "redirected more than 3 times")
    refused(f"{server.base}/loop", "redirected more than 3 times")


@pytest.mark.parametrize("target, fragment", [
    ("http://10.1.2.3/cat.png", "non-public address"),          # allow-listed, private
    ("http://[2002:7f00:1::]/cat.png", "not allowed"),           # off the allowlist
    ("file:///etc/passwd", "must be http"),
])
def test_every_redirect_hop_is_checked_again(server, target, fragment):
    refused(f"{server.base}/redirect?to={target}", fragment)


def test_a_dripping_server_is_cut_at_the_whole_fetchs_deadline(server):
    # a byte every 2 s never trips a 3 s timeout per read; the fetch as a whole gets 3 s
    refused(f"{server.base}/drip", "within 3 s")


@pytest.mark.parametrize("path", ["/huge", "/declared-huge"])
def test_bodies_over_the_byte_limit_are_cut_while_streaming(server, path):
    refused(f"{server.base}{path}", "larger than 1048576 bytes")


def test_a_compressed_body_is_neither_asked_for_nor_inflated(server):
    before = len(server.requests)
    fetch(f"{server.base}/cat.png")
    (_, headers), = server.requests[before:]
    assert headers["Accept-Encoding"] == "identity"
    refused(f"{server.base}/gzip-bomb", "gzip-encoded body")


@pytest.mark.parametrize("url, fragment", [
    ("http://localhost:99999/x.png", "malformed"),
    ("http://[::1/x.png", "malformed"),
    ("http://127.0.0.1:0/x.png", "port 0"),
    ("http:///x.png", "no host"),
    ("http://" + "a" * 300 + ".localhost/x.png", "not a valid name"),  # a label over 63
])
def test_malformed_urls_are_a_400_naming_the_part(tokenizer, url, fragment):
    pre = MultimodalPreprocessor(tokenizer, policy(url_allowlist=(".localhost", "localhost")))
    with pytest.raises(InvalidRequest, match=fragment) as err:
        asyncio.run(pre.encode(chat(url), effort="none"))
    assert err.value.param == PARAM


@pytest.mark.parametrize("address", [
    "2002:7f00:1::",                              # 6to4 of 127.0.0.1
    "2002:a00:1::1",                              # 6to4 of 10.0.0.1
    "2002:a9fe:a9fe::",                           # 6to4 of 169.254.169.254
    "64:ff9b::7f00:1",                            # NAT64 of 127.0.0.1
    "64:ff9b::a9fe:a9fe",                         # NAT64 of 169.254.169.254
    "64:ff9b:1::a00:1",                           # local-use NAT64
    "2001:0:4136:e378:8000:63bf:80ff:fffe",       # Teredo, client 127.0.0.1
    "2001:0:a00:1:0:0:f7f7:f7f6",                 # Teredo, server 10.0.0.1
    "::ffff:10.0.0.1", "fec0::1", "fe80::1", "::1", "127.0.0.1",
])
def test_ipv6_forms_of_private_ipv4_addresses_are_not_public(address):
    assert not public_address(address)
    assert public_address(address, admit_loopback=True) == (address in ("::1", "127.0.0.1"))


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_are_public(address):
    assert public_address(address)


def test_loopback_is_refused_without_the_test_switch(server):
    refused(f"{server.base}/cat.png", "non-public address",
            policy(admit_loopback_for_tests=False))


def test_the_test_switch_is_off_by_default_and_in_every_profile():
    assert ImageSettings().admit_loopback_for_tests is False
    for profile in PROFILES.glob("*.yaml"):
        images = ((yaml.safe_load(profile.read_text()) or {}).get("multimodal") or {}).get(
            "images") or {}
        assert not images.get("admit_loopback_for_tests"), profile.name
