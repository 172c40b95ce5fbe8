"""Images over HTTP: two images and text give transformers' own greedy output; bad images 400."""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.ray
MODEL = "mistral-small-4"


def png_url(size, seed) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_two_images_greedy_equals_transformers_generate(client, standin, tokenizer):
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Compare these two pictures."},
        {"type": "image_url", "image_url": {"url": png_url((120, 80), 1)}},
        {"type": "image_url", "image_url": {"url": png_url((60, 150), 2)}}]}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                           temperature=0)
    encoded = tokenizer.encode_chat(messages, effort="none")   # mistral-common decodes here
    sizes = [img.shape[-2:] for img in encoded.images]
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    pixels = torch.zeros(len(sizes), 3, height, width)
    for i, img in enumerate(encoded.images):
        pixels[i, :, :img.shape[1], :img.shape[2]] = torch.from_numpy(img)
    out = standin.model.generate(torch.tensor([encoded.ids]), pixel_values=pixels,
                                 image_sizes=torch.tensor([list(s) for s in sizes]),
                                 max_new_tokens=10, min_new_tokens=10, do_sample=False)
    expected = out[0, len(encoded.ids):].tolist()
    assert reply.usage.prompt_tokens == len(encoded.ids)
    from services.api.output import parse_completion

    content, *_ = parse_completion(tokenizer, expected, "length", tools_enabled=False)
    assert reply.choices[0].message.content == content
    assert reply.usage.completion_tokens == len(expected)


@pytest.mark.parametrize("url, fragment", [
    ("data:image/png;base64," + base64.b64encode(b"garbage").decode(), "not a readable image"),
    ("http://169.254.169.254/latest/meta-data/", "URLs are disabled"),
])
def test_bad_images_over_http_are_400_naming_the_part(client, url, fragment):
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert err.value.body["param"] == "messages.0.content.1.image_url"
    assert fragment in err.value.body["message"]


def test_an_image_of_several_megabytes_is_answered(client):
    """A 5 MB image, within `multimodal.images.max_bytes` (10 MB), reaches the image service:
    its request is larger than Serve's gRPC transport takes in one message between replicas
    (4 MiB, `RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH`), which `small4 up` turns on."""
    url = png_url((1300, 1300), 4)
    assert len(url) > 5 * 1024 * 1024
    reply = client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": url}}]}])
    assert reply.usage.prompt_tokens > 2000  # the image's tokens: it was encoded


def test_a_finished_requests_pixels_leave_the_object_store(client, ask):
    """The multimodal replica keeps a request's pixels until the request ends, not until its
    deadline (600 s): answered or refused after encoding, they are released."""
    image = {"type": "image_url", "image_url": {"url": png_url((64, 64), 3)}}
    # what other tests' requests still hold (released in the background, or at their own
    # deadlines): this test's requests must leave it as they found it
    before = ask("ref", "multimodal", "held_images")
    stream = client.chat.completions.create(model=MODEL, max_tokens=8, stream=True, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}])
    next(iter(stream))
    assert ask("ref", "multimodal", "held_images") >= 1  # kept while the request lives
    for _ in stream:
        pass
    with pytest.raises(openai.BadRequestError):  # refused once encoded: no room to answer
        client.chat.completions.create(model=MODEL, max_tokens=4090, messages=[
            {"role": "user", "content": [image, image]}])
    deadline = time.monotonic() + 20
    while (held := ask("ref", "multimodal", "held_images")) > before and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    assert held <= before, (held, before)


def test_a_client_that_leaves_mid_stream_leaves_no_pixels_held(stack, ask):
    """A request cancelled by its client (the connection closed mid-stream) still releases
    its pixels: the release is sent as Serve cancels the request, and must not be one of the
    request's own calls that Serve cancels with it (they would stay held to the deadline)."""
    image = {"type": "image_url", "image_url": {"url": png_url((64, 64), 4)}}
    body = {"model": MODEL, "max_tokens": 3000, "stream": True, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, image]}]}
    before = ask("ref", "multimodal", "held_images")
    for _ in range(3):  # the release races the cancellation: more than one chance to lose it
        with httpx.stream("POST", f"{stack['ref']}/v1/chat/completions", json=body,
                          timeout=60) as reply:
            lines = reply.iter_lines()
            for _ in range(3):
                next(lines)
            assert ask("ref", "multimodal", "held_images") >= 1  # kept while it lives
    deadline = time.monotonic() + 20
    while (held := ask("ref", "multimodal", "held_images")) > before and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    assert held <= before, (held, before)
