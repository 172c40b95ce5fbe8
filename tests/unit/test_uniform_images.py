"""Images of one request made one size for engines that need it: pixels padded, blocks laid out
again, ids and pixels agreeing; single and same-size images untouched."""

from __future__ import annotations

import numpy as np
import pytest

from services.errors import InvalidRequest
from services.multimodal.uniform import (ImageTokens, image_offsets, image_rows, relayout,
                                         uniform_image_sizes)
from services.tokenizer import EncodedPrompt

TOKENS = ImageTokens(img=10, brk=12, end=13)


def block(rows: int, cols: int) -> list[int]:
    out = ([10] * cols + [12]) * rows
    return out[:-1] + [13]


def test_images_of_several_sizes_are_padded_to_one_and_laid_out_again():
    prompt = EncodedPrompt([1] + block(2, 4) + [5] + block(3, 1) + [6],
                           [np.ones((3, 56, 112), np.float32), np.ones((3, 84, 28), np.float32)],
                           "none")
    out = uniform_image_sizes(prompt, TOKENS)
    assert [p.shape for p in out.images] == [(3, 84, 112)] * 2
    assert out.ids == [1] + block(3, 4) + [5] + block(3, 4) + [6]
    assert image_offsets(out.ids, TOKENS) == [(1, 14), (17, 30)]
    # SGLang's placeholders: the [IMG] runs, one per row, never an [IMG_BREAK] between them
    assert image_rows(out.ids, TOKENS) == [(1, 4), (6, 9), (11, 14), (17, 20), (22, 25),
                                           (27, 30)]
    # an [IMG] sampled into a resumed leg's prompt is no image's row (it has no embedding)
    assert image_rows([10, 10, 5] + out.ids + [55, 10, 10], TOKENS) == [
        (a + 3, b + 3) for a, b in image_rows(out.ids, TOKENS)]
    assert float(out.images[1][:, :, :28].min()) == 1.0
    assert float(np.abs(out.images[1][:, :, 28:]).max()) == 0.0  # the mean colour


def test_single_and_same_size_images_are_left_as_encoded():
    same = EncodedPrompt([1] + block(2, 4) + block(2, 4),
                         [np.ones((3, 56, 112), np.float32)] * 2, "none")
    assert uniform_image_sizes(same, TOKENS) is same
    text = EncodedPrompt([1, 2, 3], [], "none")
    assert uniform_image_sizes(text, TOKENS) is text


def test_a_prompt_whose_blocks_do_not_match_its_images_is_refused():
    with pytest.raises(InvalidRequest, match="1 image blocks for 2 images"):
        relayout([1] + block(2, 2), 2, TOKENS, 3, 3)


def data_url(width: int, height: int) -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (20, 40, 60)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def pixels(images: list) -> list:
    """The arrays, also where the worker put them into Ray's object store (a Ray is up)."""
    import ray

    return [ray.get(i) if isinstance(i, ray.ObjectRef) else i for i in images]


@pytest.mark.parametrize("one_size", [False, True])
def test_the_multimodal_worker_makes_one_size_only_for_engines_that_need_it(one_size):
    import asyncio

    from services.context import RequestContext
    from services.settings import ImageSettings, ModelSettings
    from services.settings import MultimodalWorkerSettings
    from services.workers.multimodal import MultimodalWorker

    worker = MultimodalWorker(MultimodalWorkerSettings(
        model=ModelSettings(), images=ImageSettings(), one_image_size=one_size))
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(100, 40)}},
        {"type": "image_url", "image_url": {"url": data_url(30, 90)}},
        {"type": "text", "text": "Compare."}]}]
    prompt = asyncio.run(worker.encode(RequestContext("r"), messages, "none",
                                       None))
    shapes = {p.shape for p in pixels(prompt.images)}
    assert (shapes == {(3, 112, 112)}) if one_size else (len(shapes) == 2)
    assert len(image_offsets(prompt.ids, TOKENS)) == 2


def test_sglang_profiles_make_one_image_size():
    from cluster.settings import load_settings

    assert load_settings("cluster/profiles/h200x16.yaml").multimodal_settings().one_image_size
    assert not load_settings().multimodal_settings().one_image_size
