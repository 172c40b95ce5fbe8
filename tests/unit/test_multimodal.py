"""Image preprocessing equals mistral-common's own encoding; bad images are refused with 400s
that name the message and part."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import zlib

import numpy as np
import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from PIL import Image

from services.errors import InvalidRequest
from services.multimodal.preprocess import MultimodalPreprocessor
from services.settings import ImageSettings

RNG = np.random.default_rng(11)


def noise(size, mode="RGB"):
    w, h = size
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "CMYK": 4}[mode]
    pixels = RNG.integers(0, 255, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def palette_with_transparency():
    image = noise((90, 60)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.info["transparency"] = 0
    return encoded(image, "PNG", transparency=0)


def animated_gif():
    frames = [noise((64, 48)).convert("P") for _ in range(2)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    return buf.getvalue()


CASES = {
    "rgb-png-1024x768": lambda: encoded(noise((1024, 768)), "PNG"),
    "rgb-jpeg-1920x1080": lambda: encoded(noise((1920, 1080)), "JPEG", quality=90),
    "rgba-png-transparent": lambda: encoded(noise((100, 40), "RGBA"), "PNG"),
    "p-png-transparent": palette_with_transparency,
    "l-png-tall": lambda: encoded(noise((30, 500), "L"), "PNG"),
    "cmyk-jpeg-wide": lambda: encoded(noise((2000, 300), "CMYK"), "JPEG"),
    "webp": lambda: encoded(noise((333, 222)), "WEBP", quality=80),
    "gif-first-frame": animated_gif,
    "tiny-png": lambda: encoded(noise((5, 3)), "PNG"),
}


@pytest.fixture(scope="module")
def pre(tokenizer):
    return MultimodalPreprocessor(tokenizer, ImageSettings())


def chat(*urls: str, text: str = "Describe both.") -> list[dict]:
    parts = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "system", "content": "Be exact."}, {"role": "user", "content": parts}]


@pytest.mark.parametrize("case", sorted(CASES))
def test_ids_and_pixels_equal_mistral_commons_own(tokenizer, pre, case):
    url = data_url(CASES[case]())
    messages = chat(url, data_url(CASES["tiny-png"]()))
    ours = asyncio.run(pre.encode(messages, effort="high"))
    theirs = tokenizer._mt.encode_chat_completion(
        ChatCompletionRequest.from_openai(messages, reasoning_effort="high"))
    assert ours.ids == theirs.tokens
    assert len(ours.images) == len(theirs.images) == 2
    for a, b in zip(ours.images, theirs.images):
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
        assert np.array_equal(a, b)
    img = tokenizer.special("[IMG]")
    assert ours.ids.count(img) == sum((a.shape[1] // 28) * (a.shape[2] // 28) for a in ours.images)


def png_header_bomb(width=30000, height=30000) -> bytes:
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def png_text_bomb(chunks=10) -> bytes:
    """A valid 8 x 8 PNG whose zTXt chunks inflate to 1 MB each (a few KB sent)."""
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    png = encoded(noise((8, 8)), "PNG")
    text = b"".join(chunk(b"zTXt", b"k%d\0\0" % i + zlib.compress(b" " * (1 << 20), 9))
                    for i in range(chunks))
    return png[:33] + text + png[33:]  # after the signature and IHDR


REFUSALS = {
    "corrupt": (lambda: data_url(b"this is not an image at all"), "not a readable image"),
    "truncated-png": (lambda: data_url(encoded(noise((200, 200)), "PNG")[:600]), "corrupt or truncated"),
    "header-bomb": (lambda: data_url(png_header_bomb()), "the limit is 40000000 pixels"),
    "over-pixel-limit": (lambda: data_url(png_header_bomb(9000, 9000)), "9000x9000 pixels"),
    # 10 MB of text chunks inflated on opening, before any limit: past 8 MiB it is refused
    "png-text-bomb": (lambda: data_url(png_text_bomb()), "corrupt or truncated"),
    # only the accepted formats' parsers ever read the bytes
    "bmp": (lambda: data_url(encoded(noise((20, 20)), "BMP"), "image/bmp"),
            r"not a readable image in an accepted format \(PNG, JPEG"),
    "tiff": (lambda: data_url(encoded(noise((20, 20)), "TIFF"), "image/tiff"),
             "accepted format"),
    "not-base64": (lambda: "data:image/png;base64,@@@@", "not valid base64"),
    "url-disabled": (lambda: "https://images.example.com/cat.png", "URLs are disabled"),
}


def test_a_camera_jpeg_with_a_preview_is_a_jpeg_and_exif_orientation_is_applied(pre):
    """A JPEG with an embedded preview (MPF: Pillow calls it MPO) is accepted and decoded
    as its first image; a photo stored sideways (EXIF orientation 6) reaches the model upright,
    as a viewer shows it."""
    from services.multimodal.decode import decode_image
    from services.multimodal.header import read_header

    settings = ImageSettings()
    camera = encoded(noise((64, 48)), "MPO", save_all=True, append_images=[noise((32, 24))])
    assert Image.open(io.BytesIO(camera)).format == "MPO"
    assert read_header(camera, settings, "p").format == "JPEG"
    assert decode_image(camera, settings, "p").size == (64, 48)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    sideways = encoded(noise((64, 48)), "JPEG", exif=exif.tobytes())
    assert decode_image(sideways, settings, "p").size == (48, 64)
    prompt = asyncio.run(pre.encode(chat(data_url(camera), data_url(sideways)), effort="none"))
    (h, w), upright = (a.shape[1:] for a in prompt.images)
    assert upright == (w, h) and w > h  # the landscape preview, the upright portrait


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_bad_images_are_refused_naming_the_part(pre, case):
    make, message = REFUSALS[case]
    messages = chat(data_url(CASES["tiny-png"]()), make())
    with pytest.raises(InvalidRequest, match=message) as err:
        asyncio.run(pre.encode(messages, effort="none"))
    assert err.value.param == "messages.1.content.2.image_url" and err.value.status == 400


@pytest.mark.parametrize("url, message", [
    ("http://127.0.0.1/x.png", "non-public address"),
    ("http://169.254.169.254/latest/meta-data", "non-public address"),
    ("http://[::1]/x.png", "non-public address"),
    ("http://10.1.2.3/x.png", "non-public address"),
    ("http://evil.example.net/x.png", "not allowed"),
    ("ftp://127.0.0.1/x.png", "must be http"),
    ("http://127.0.0.1/a\x01b.png", "control character"),
    ("http://a..b.example.com/x.png", "not a valid name"),
])
def test_urls_to_private_addresses_or_other_hosts_are_refused(tokenizer, url, message):
    policy = ImageSettings(allow_urls=True, url_allowlist=(
        "127.0.0.1", "169.254.169.254", "::1", "10.1.2.3", ".example.com"))
    with pytest.raises(InvalidRequest, match=message) as err:
        asyncio.run(MultimodalPreprocessor(tokenizer, policy).encode(chat(url), effort="none"))
    assert err.value.param == "messages.1.content.1.image_url"


def test_an_overlong_url_is_the_clients_400_never_a_500_and_costs_nothing_to_refuse(tokenizer):
    """httpx refuses a URL it cannot send (over 64 KB) with `InvalidURL`, which is not one of
    its `HTTPError`s: it reached the error mapping as the stack's own 500. And a URL may be as
    long as a body's string (16 MB), each checked character by character on the image
    service's event loop (~1 s): past 8 KB one is refused by its length alone, before it is
    parsed."""
    policy = ImageSettings(allow_urls=True, url_allowlist=("127.0.0.1",),
                           admit_loopback_for_tests=True)
    for length in (70_000, 16 << 20):
        url = "http://127.0.0.1:9/" + "a" * length + ".png"
        with pytest.raises(InvalidRequest, match="at most 8192 are taken") as err:
            asyncio.run(MultimodalPreprocessor(tokenizer, policy).encode(chat(url),
                                                                         effort="none"))
        assert err.value.param == "messages.1.content.1.image_url"


def test_a_data_url_is_read_whatever_the_case_of_its_scheme_and_encoding(tokenizer, pre):
    raw = CASES["tiny-png"]()
    plain = asyncio.run(pre.encode(chat(data_url(raw)), effort="none"))
    shouted = "DATA:image/png;BASE64," + data_url(raw).partition(",")[2]
    loud = asyncio.run(pre.encode(chat(shouted), effort="none"))
    assert loud.ids == plain.ids and np.array_equal(loud.images[0], plain.images[0])


def test_too_many_images_names_the_first_extra_part(tokenizer):
    tiny = data_url(CASES["tiny-png"]())
    pre = MultimodalPreprocessor(tokenizer, ImageSettings(max_images=2))
    with pytest.raises(InvalidRequest, match="at most 2 images") as err:
        asyncio.run(pre.encode(chat(tiny, tiny, tiny), effort="none"))
    assert err.value.param == "messages.1.content.3"


def test_oversized_bytes_are_refused_before_decoding(tokenizer):
    pre = MultimodalPreprocessor(tokenizer, ImageSettings(max_bytes=1000))
    with pytest.raises(InvalidRequest, match="larger than 1000 bytes"):
        asyncio.run(pre.encode(chat(data_url(encoded(noise((200, 200)), "PNG"))), effort="none"))


def test_a_release_goes_to_the_replica_that_keeps_the_pixels():
    from types import SimpleNamespace

    from services.multimodal.refs import PixelOwner
    from services.workers.owner_router import choose

    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=u)) for u in "abcd"]
    release = SimpleNamespace(args=[PixelOwner("c", "r1")])
    assert choose(replicas, release) == [[replicas[2]]]
    gone = SimpleNamespace(args=[PixelOwner("z", "r1")])  # its pixels went with it
    assert choose(replicas, gone) == [replicas]
    encode = SimpleNamespace(args=["ctx", [], "none", None])
    ranks = choose(replicas, encode)
    assert len(ranks) == 1 and len(ranks[0]) == 2 and all(r in replicas for r in ranks[0])
    assert choose([], encode) == []


def test_a_replica_going_away_keeps_its_pixels_until_released_and_a_loss_is_not_retried():
    """Serve awaits the replica's `__del__` once its calls drained: it waits while pixels are
    kept for requests in flight (a prefill retry or a resumed stream fetches them again).
    Pixels whose keeper went anyway are `PixelsLost`: a 503 the stack does not retry (every
    attempt would fail the same), where Ray's OwnerDiedError read as a replica to retry past."""
    from types import SimpleNamespace

    from services.errors import PixelsLost, from_exception, retryable
    from services.kv.held import KEEPER, Held
    from services.multimodal.refs import drain, resolve

    async def going_away():
        KEEPER.keep(SimpleNamespace(key=b"in-flight"), 60, "r1")
        waiting = asyncio.ensure_future(drain(30, poll_s=0.01))
        await asyncio.sleep(0.05)
        still = not waiting.done()
        KEEPER.release_group("r1")
        await asyncio.wait_for(waiting, 5)
        KEEPER.keep(SimpleNamespace(key=b"never-released"), 60, "r2")
        try:  # releases cannot reach a replica being stopped: the wait has its own end
            await asyncio.wait_for(drain(0.05, poll_s=0.01), 5)
        finally:
            KEEPER.release_group("r2")
        return still

    assert asyncio.run(going_away())

    class OwnerDiedError(Exception):  # Ray's, by name as `retryable` matches it
        pass

    class Gone(Held):
        def __init__(self):
            pass

        async def fetch(self):
            raise OwnerDiedError("the owner of this object died")

    with pytest.raises(PixelsLost) as err:
        asyncio.run(resolve([Gone()]))
    assert not retryable(err.value) and from_exception(err.value).status == 503
    assert retryable(OwnerDiedError())  # a call's own owner dying is still a replica gone


def test_an_image_service_keeping_its_limit_of_pixels_answers_503_before_decoding(tokenizer):
    """Slow streams of many large images pin their pixels for their whole life: past
    `multimodal.max_held_bytes` a replica refuses more (retry later) instead of filling the
    object store, and serves again once requests end."""
    from types import SimpleNamespace

    from cluster.settings import parse_settings
    from services.context import RequestContext
    from services.errors import Overloaded
    from services.kv.held import KEEPER
    from services.workers.multimodal import MultimodalWorker

    settings = parse_settings({"multimodal": {"max_held_bytes": 1_000_000},
                               "auth": {"enabled": False}}).multimodal_settings()
    worker = MultimodalWorker(settings)
    messages = chat(data_url(CASES["tiny-png"]()))

    async def run():
        KEEPER.keep(SimpleNamespace(key=b"other-request"), 60, "other", nbytes=1_000_001)
        try:
            with pytest.raises(Overloaded) as err:
                await worker.encode(RequestContext("r"), messages, "none", None)
            assert err.value.status == 503 and err.value.retry_after
        finally:
            KEEPER.release_group("other")
        return await worker.encode(RequestContext("r"), messages, "none", None)

    assert len(asyncio.run(run()).images) == 1


def test_a_request_whose_own_pixels_would_pass_the_held_limit_is_refused_from_its_headers(
        tokenizer, monkeypatch):
    """The limit was checked before decoding only against what the replica already kept: a
    request whose own pixels would pass it had its images decoded and encoded (seconds of CPU
    for 8 large images), then a 503. Its pixels are counted from its headers first (CHW
    float32 at the patch grid, exactly what decoding makes)."""
    from types import SimpleNamespace

    from cluster.settings import parse_settings
    from services.context import RequestContext
    from services.errors import Overloaded
    from services.kv.held import KEEPER
    from services.multimodal import preprocess
    from services.multimodal.header import read_header
    from services.workers.multimodal import MultimodalWorker

    image = encoded(noise((448, 448)), "PNG")
    settings = parse_settings({"multimodal": {"max_held_bytes": 3_000_000},
                               "auth": {"enabled": False}}).multimodal_settings()
    worker = MultimodalWorker(settings)
    header = read_header(image, settings.images, "p")
    assert worker.preprocessor.pixel_bytes([header]) == 3 * 448 * 448 * 4
    decoded, decode = [], preprocess.decode_image
    monkeypatch.setattr(preprocess, "decode_image",
                        lambda *a: decoded.append(a[2]) or decode(*a))
    messages = chat(data_url(image))

    async def run():
        KEEPER.keep(SimpleNamespace(key=b"other-request"), 60, "other", nbytes=1_000_000)
        try:
            with pytest.raises(Overloaded) as err:  # 1 MB kept + 2.4 MB of its own > 3 MB
                await worker.encode(RequestContext("r"), messages, "none", None)
            assert err.value.status == 503 and decoded == []
        finally:
            KEEPER.release_group("other")
        prompt = await worker.encode(RequestContext("r2"), messages, "none", None)
        KEEPER.release_group("r2")
        return prompt

    prompt = asyncio.run(run())
    assert sum(a.nbytes for a in prompt.images) == 3 * 448 * 448 * 4 and len(decoded) == 1


@pytest.mark.parametrize("size", [(1, 1), (28, 28), (29, 29), (640, 480), (1540, 1540),
                                  (2449, 2449), (3000, 100), (100, 3000), (5000, 3)])
def test_an_images_tokens_follow_from_its_size_as_mistral_common_encodes_it(tokenizer, size):
    """The count the budget is checked with, from a header alone, is the count the encoded
    prompt has (resized past 1540 px, extreme aspect ratios included)."""
    text = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
    with_image = [{"role": "user", "content": text[0]["content"] + [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]
    encoded_ids = tokenizer.encode_chat(with_image, effort="none",
                                        images={(0, 1): Image.new("RGB", size)}).ids
    assert tokenizer.image_tokens(*size) == (
        len(encoded_ids) - len(tokenizer.encode_chat(text, effort="none").ids))


def declared_png(width: int, height: int) -> str:
    """A PNG of a few hundred bytes whose header declares `width` x `height` and whose data
    cannot be decoded: a request refused from the header never reaches the decoder."""
    return data_url(png_header_bomb(width, height))


def test_an_image_prompt_over_the_context_is_refused_from_its_headers(pre):
    from services.errors import ContextLengthExceeded
    from services.multimodal.budget import PromptBudget

    messages = chat(declared_png(3000, 3000))  # 3080 tokens once resized
    with pytest.raises(InvalidRequest, match="corrupt or truncated"):
        asyncio.run(pre.encode(messages, effort="none"))  # without a budget: decoded
    budget = PromptBudget(text_tokens=10, context_length=3000)
    with pytest.raises(ContextLengthExceeded, match="images take 3080") as err:
        asyncio.run(pre.encode(messages, effort="none", budget=budget))
    assert err.value.param == "messages" and err.value.status == 400
    asked = PromptBudget(text_tokens=10, context_length=4096, max_tokens=1010)
    with pytest.raises(ContextLengthExceeded, match="max_tokens asks for 1010"):
        asyncio.run(pre.encode(messages, effort="none", budget=asked))


def test_an_image_prompt_its_key_cannot_pay_is_refused_from_its_headers(pre):
    from services.errors import RateLimited
    from services.multimodal.budget import PromptBudget, TokenRoom

    messages = chat(declared_png(1540, 1540))  # 3080 tokens
    room = TokenRoom("k", tokens_per_min=6000, available=2000, capacity=6000)
    budget = PromptBudget(text_tokens=10, context_length=8192, max_tokens=16, quota=room)
    with pytest.raises(RateLimited) as err:
        asyncio.run(pre.encode(messages, effort="none", budget=budget))
    # 3106 tokens: more than the key has now, within what it refills to in 11 s
    assert err.value.status == 429 and err.value.code == "tokens_per_min_exceeded"
    assert err.value.retry_after == pytest.approx((3106 - 2000) / 100, abs=0.5)
    never = PromptBudget(text_tokens=10, context_length=8192, max_tokens=16, choices=2,
                         quota=TokenRoom("k", 6000, available=6000, capacity=6000))
    with pytest.raises(RateLimited, match="needs 6212 tokens") as err:
        asyncio.run(pre.encode(messages, effort="none", budget=never))
    assert err.value.retry_after == 60.0
    # the default max_tokens is charged as it will be set: what the context leaves, at most
    # the default
    fits = PromptBudget(text_tokens=10, context_length=3200, default_max_tokens=4096,
                        quota=TokenRoom("k", 6000, available=3200, capacity=6000))
    with pytest.raises(InvalidRequest, match="corrupt or truncated"):  # passed: decoded
        asyncio.run(pre.encode(messages, effort="none", budget=fits))


def test_concurrent_image_requests_of_one_key_are_decoded_only_as_far_as_it_can_pay(
        monkeypatch):
    """The token check before decoding held nothing and counted what the key's requests in
    flight might refund: three image requests at once on a minute that pays for two each
    passed it, had their images decoded, and the exact charge after refused one. Each now
    holds what it may cost before its images are read: the third is refused from its header."""
    import threading
    import time

    import httpx

    from cluster.inprocess import build_inprocess
    from cluster.settings import parse_settings
    from services.multimodal import preprocess

    decoded, lock = [], threading.Lock()

    def slow_decode(data, settings, param, stop):  # the image reached the decoder
        with lock:
            decoded.append(param)
        time.sleep(0.5)
        raise InvalidRequest("image data could not be read", param=param)

    monkeypatch.setattr(preprocess, "decode_image", slow_decode)
    ingress = build_inprocess(parse_settings({
        "auth": {"enabled": False, "default_quota": {"tokens_per_min": 7000}},
        "model": {"context_length": 8192}}))
    ingress.service.quotas.clock = lambda: 1000.0  # no refill
    body = {"model": "mistral-small-4", "max_tokens": 16,
            "messages": chat(declared_png(1540, 1540))}  # 3080 tokens from its header

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(
                app=ingress.build_asgi_app()), base_url="http://small4") as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=body,
                                                      timeout=60) for _ in range(3)))

    replies = asyncio.run(go())
    statuses = sorted(r.status_code for r in replies)
    assert statuses == [400, 400, 429], [r.text for r in replies]
    assert len(decoded) == 2  # the one refused never reached the decoder
    limited = next(r for r in replies if r.status_code == 429).json()["error"]
    assert limited["code"] == "tokens_per_min_exceeded"
    state, = ingress.service.quotas.keys.values()
    # nothing held after; each paid its text's least (its encoding started: the two decoded,
    # the one refused from its header), never its max_tokens nor what its images would take
    from services.api.plan import text_floor
    from services.api.schemas import parse_chat_request

    service = ingress.service
    floor = text_floor(parse_chat_request(body, service.settings.limits.max_messages),
                       service.token_bytes)
    assert state.charged == 0 and state.tokens.level == 7000 - 3 * max(floor, 1)


def test_a_request_refused_after_its_images_were_decoded_still_pays_for_them(tokenizer):
    """Text whose bytes undercount its tokens passes the checks made before decoding (the
    floor counts its bytes over the longest token's); once its images are decoded and the
    prompt encoded, it overflows the context: a 400. That 400 refunded every token, so a key
    could have images decoded again and again for nothing. The encoded prompt is spent, as far
    as the request held tokens."""
    import random
    import string

    from cluster.inprocess import build_inprocess
    from cluster.settings import parse_settings
    from tests.asgi import post_chat

    quota = 50_000
    text = "".join(random.Random(5).choices(string.ascii_letters + string.punctuation,
                                            k=5500))
    text_tokens = len(tokenizer.encode_chat([{"role": "user", "content": text}],
                                            effort="none").ids)
    image = data_url(encoded(noise((448, 448)), "PNG"))  # 256 tokens
    context = text_tokens + 128  # it fits as text, not with its image
    ingress = build_inprocess(parse_settings({
        "auth": {"enabled": False, "default_quota": {"tokens_per_min": quota}},
        "model": {"context_length": context}}))
    ingress.service.quotas.clock = lambda: 1000.0  # no refill
    body = {"model": "mistral-small-4", "max_tokens": 16, "messages": [{"role": "user",
            "content": [{"type": "text", "text": text},
                        {"type": "image_url", "image_url": {"url": image}}]}]}

    reply = post_chat(ingress, body, timeout=60)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages", reply.text
    state, = ingress.service.quotas.keys.values()
    assert state.charged == 0  # nothing held after the request
    # spent: the encoded prompt, as far as the request held tokens (its text's floor, and the
    # most its image could take): its image's tokens at least
    assert quota - state.tokens.level > 256


@pytest.mark.parametrize("sizes", [((1540, 28), (28, 1540)), ((640, 480), (300, 900), (33, 33))])
def test_with_one_image_size_the_headers_count_the_padded_layout_exactly(tokenizer, sizes):
    """With one image size per request (SGLang's Pixtral), every image is laid out at the
    largest columns and rows among them; counted from the headers as each image alone, two
    thin images of 166 tokens became 6,160 once padded, past any check made before decoding."""
    from services.multimodal.header import read_header
    from services.multimodal.uniform import ImageTokens, uniform_image_sizes

    settings = ImageSettings()
    images = [encoded(noise(size), "PNG") for size in sizes]
    uniform = MultimodalPreprocessor(tokenizer, settings, one_image_size=True)
    headers = [read_header(data, settings, "p") for data in images]
    marks = ImageTokens.of(tokenizer)
    prompt = asyncio.run(uniform.encode(chat(*map(data_url, images)), effort="none"))
    laid_out = uniform_image_sizes(prompt, marks)
    padded = sum(t in (marks.img, marks.brk, marks.end) for t in laid_out.ids)
    alone = sum(t in (marks.img, marks.brk, marks.end) for t in prompt.ids)
    assert uniform._prompt_tokens(headers) == padded
    assert MultimodalPreprocessor(tokenizer, settings)._prompt_tokens(headers) == alone
    if sizes[0] == (1540, 28):
        assert padded > 30 * alone  # the premise: padding is most of such a prompt


def test_a_jpegs_exif_orientation_is_read_from_its_header():
    from services.multimodal.header import read_header

    turned = noise((60, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: decoded 20 x 60
    data = encoded(turned, "JPEG", exif=exif.tobytes())
    header = read_header(data, ImageSettings(), "p")
    assert (header.width, header.height, header.turned) == (60, 20, True)
    assert read_header(encoded(turned, "JPEG"), ImageSettings(), "p").turned is False
    # a PNG's EXIF may follow its pixels, or be ImageMagick's text chunk: not known from the
    # header, counted both ways; a TIFF's tags are not read here: not known either
    from PIL.PngImagePlugin import PngInfo

    text = PngInfo()
    text.add_text("Raw profile type exif", "exif\n 8\n4d4d002a00000008")
    for data in (encoded(turned, "PNG", exif=exif.tobytes()), encoded(turned, "PNG",
                                                                       pnginfo=text),
                 encoded(turned, "TIFF")):
        settings = ImageSettings(formats=("PNG", "TIFF"))
        assert read_header(data, settings, "p").turned is None
    assert read_header(encoded(turned, "PNG"), ImageSettings(), "p").turned is False


def test_a_thin_image_costing_far_more_to_decode_than_its_tokens_is_refused_from_its_header(
        pre):
    """A 78 KB PNG of 1 x 40M pixels took 3.5 s and 2 GB to decode, for 110 prompt tokens: a
    key paid nothing like what it cost. Refused from its header; a 40 MP photo is not."""
    with pytest.raises(InvalidRequest, match="pixels per token") as err:
        asyncio.run(pre.encode(chat(declared_png(1, 39_999_999)), effort="none"))
    assert err.value.param == "messages.1.content.1.image_url"
    with pytest.raises(InvalidRequest, match="corrupt or truncated"):  # passed: decoded
        asyncio.run(pre.encode(chat(declared_png(6324, 6324)), effort="none"))


def test_a_16_bit_greyscale_png_keeps_its_greys(pre):
    """Pillow opens a 16-bit greyscale PNG as `I;16`; mistral-common's RGB conversion would
    clip every value above 255 to white. It is scaled to 8 bits first: a mid grey stays the
    mid grey an 8-bit image of it gives."""
    for grey in (128, 0):  # a mid grey; a dark image (every value under 256) stays dark
        deep = Image.fromarray(np.full((40, 60), grey * 256 + 200, np.uint16))
        assert deep.mode == "I;16"
        shallow = Image.fromarray(np.full((40, 60), grey, np.uint8))
        ours, theirs = (asyncio.run(pre.encode(chat(data_url(encoded(i, "PNG"))),
                                               effort="none")) for i in (deep, shallow))
        assert np.array_equal(ours.images[0], theirs.images[0])
