"""What an image may cost the preprocessor: scans and pixels refused from headers (per image and
summed per request) before anything is decoded, decoding stopped at the request's deadline, and
tiny or extreme-aspect images served by the reference model's vision tower."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from _images_fixtures import chat, data_url, declared_size_jpeg, many_scan_jpeg, png
from mistral_common.protocol.instruct.request import ChatCompletionRequest

from services.errors import DeadlineExceeded, InvalidRequest
from services.multimodal.preprocess import MultimodalPreprocessor
from services.settings import ImageSettings

JPEG = "image/jpeg"


def encode(pre: MultimodalPreprocessor, *urls: str, deadline: float | None = None):
    return asyncio.run(pre.encode(chat(*urls), effort="none", deadline=deadline))


def test_a_jpeg_with_thousands_of_scans_is_refused_from_its_bytes(tokenizer):
    pre = MultimodalPreprocessor(tokenizer, ImageSettings())
    url = data_url(many_scan_jpeg(2000, 2000, 2000), JPEG)
    with pytest.raises(InvalidRequest, match="2000 start-of-scan markers; the limit is 32") as err:
        encode(pre, data_url(png(8, 8)), url)
    assert err.value.param == "messages.0.content.2.image_url"


def test_an_ordinary_progressive_jpeg_passes(tokenizer):
    pre = MultimodalPreprocessor(tokenizer, ImageSettings())
    prompt = encode(pre, data_url(many_scan_jpeg(300, 200, 10), JPEG))
    assert prompt.images[0].shape == (3, 224, 308)


def test_pixels_are_limited_per_request_from_headers_before_any_image_is_decoded(tokenizer):
    # the first image's header is fine but its data is not: decoding it first would fail
    # naming it; every header is checked first, so the sum over seven tiny files that declare
    # 6000x6000 is what is refused, naming the image that crosses the limit
    pre = MultimodalPreprocessor(tokenizer, ImageSettings())
    broken, bomb = png(200, 200)[:400], declared_size_jpeg(6000, 6000)
    assert len(bomb) < 1024
    bombs = [data_url(bomb, JPEG)] * 7
    with pytest.raises(InvalidRequest, match="more than 48000000 pixels together") as err:
        encode(pre, data_url(broken), *bombs)
    assert err.value.param == "messages.0.content.3.image_url"


def test_one_image_declaring_more_than_the_request_limit_is_refused(tokenizer):
    pre = MultimodalPreprocessor(tokenizer, ImageSettings(max_request_pixels=1_000_000))
    with pytest.raises(InvalidRequest, match="more than 1000000 pixels together") as err:
        encode(pre, data_url(declared_size_jpeg(1200, 1000), JPEG))
    assert err.value.param == "messages.0.content.1.image_url"


def test_decoding_stops_at_the_deadline_and_frees_its_thread(tokenizer):
    settings = ImageSettings(max_jpeg_scans=100_000, decode_threads=1)
    pre = MultimodalPreprocessor(tokenizer, settings)
    slow = data_url(many_scan_jpeg(3000, 3000, 6000), JPEG)    # about a minute of decoding
    with pytest.raises(DeadlineExceeded, match="images were being fetched or decoded") as err:
        encode(pre, slow, deadline=time.time() + 1.0)
    assert err.value.status == 504 and err.value.param == "x-request-timeout"
    # the one decoding thread was handed back: a later request is decoded, within a deadline
    # far shorter than the stopped decode would have taken to finish
    prompt = encode(pre, data_url(png(30, 20)), deadline=time.time() + 20)
    assert len(prompt.images) == 1


def test_a_request_past_its_deadline_is_not_decoded(tokenizer):
    pre = MultimodalPreprocessor(tokenizer, ImageSettings())
    with pytest.raises(DeadlineExceeded):
        encode(pre, data_url(png(30, 20)), deadline=time.time() - 1)


SHAPES = [(1, 1), (1, 4000), (4000, 1), (28, 28), (5, 3), (29, 1)]


@pytest.mark.parametrize("size", SHAPES, ids=[f"{w}x{h}" for w, h in SHAPES])
def test_tiny_and_extreme_images_reach_the_vision_tower(tokenizer, standin, size):
    pre = MultimodalPreprocessor(tokenizer, ImageSettings())
    messages = chat(data_url(png(*size)))
    ours = asyncio.run(pre.encode(messages, effort="none"))
    theirs = tokenizer._mt.encode_chat_completion(
        ChatCompletionRequest.from_openai(messages, reasoning_effort="none"))
    assert ours.ids == theirs.tokens        # the prompt mistral-common itself encodes
    ids = torch.tensor([ours.ids])
    embeds = standin.embed(ids, [torch.as_tensor(p) for p in ours.images])
    slots = ids[0] == standin.image_token_id
    assert embeds.shape[1] == len(ours.ids) and bool(slots.any())
    assert not torch.equal(embeds[0, slots], standin.model.get_input_embeddings()(ids)[0, slots])


def test_a_one_slot_images_features_are_the_towers_own(standin):
    # the tower attends within each image: a one-slot image's row, computed beside a copy of
    # itself, is what a two-slot image's rows show the tower gives an image alone
    core, pixels = standin.model.model, torch.randn(2, 3, 28, 56, generator=torch.Generator()
                                                     .manual_seed(5))
    alone = core.get_image_features(pixel_values=pixels[:1], image_sizes=torch.tensor(
        [[28, 56]]), return_dict=True).pooler_output[0]
    paired = core.get_image_features(pixel_values=torch.cat([pixels[:1], pixels[:1]]),
                                     image_sizes=torch.tensor([[28, 56]] * 2),
                                     return_dict=True).pooler_output[0]
    assert torch.allclose(alone, paired, atol=1e-6)
    ids = torch.tensor([[1, standin.image_token_id, 2]])
    one = standin.embed(ids, [pixels[0, :, :, :28]])
    assert one.shape == (1, 3, standin.model.config.text_config.hidden_size)
