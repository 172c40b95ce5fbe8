"""A request's images, encoded by mistral-common and packed by our adapter, through SGLang's own
Pixtral processor and its Mistral-native vision tower (scaled down, on the CPU): 1, 2 and 8
images of assorted sizes and modes, every `[IMG]` position where our encoding put it and one
embedding per `[IMG]`."""

from __future__ import annotations

import asyncio
import os
import types

import numpy as np
import pytest
from PIL import Image

from services.engines.sglang_args import image_payload
from services.multimodal.uniform import (ImageTokens, image_offsets, image_rows,
                                         uniform_image_sizes)
from tests.sglang.conftest import gpu_profiles
from tests.sglang.resolve import environment, profile_args, resolve

# Assorted sizes and modes, small enough for the vision tower's attention on a CPU (every image
# of a request is padded to the largest; the padding code is what scales, not the tower).
SIZES_MODES = [((100, 40), "RGB"), ((64, 300), "RGBA"), ((30, 30), "L"), ((280, 90), "RGB"),
               ((28, 28), "P"), ((213, 157), "CMYK"), ((9, 260), "LA"), ((1, 1), "RGB")]


@pytest.fixture(scope="module")
def sglang_side(checkpoint):
    """SGLang's multimodal processor for the prefill engine, as its tokenizer manager makes it,
    and a scaled-down copy of its Pixtral vision path."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.layers.layernorm import RMSNorm
    from sglang.srt.managers.multimodal_processor import get_mm_processor, import_processors
    from sglang.srt.managers.tokenizer_manager import get_processor_wrapper
    from sglang.srt.models.pixtral import (PatchMerger, VisionEncoderArgs, VisionLanguageAdapter,
                                           VisionTransformer)
    from sglang.srt.server_args import set_global_server_args_for_tokenizer

    args, env, _ = profile_args(gpu_profiles()["cluster/h200x16"], "fast", "prefill",
                                checkpoint, 8998)
    with environment(env):
        server_args = resolve(args, env)
        set_global_server_args_for_tokenizer(server_args)
        config = ModelConfig.from_server_args(server_args)
        import_processors("sglang.srt.multimodal.processors")
        processor = get_mm_processor(config.hf_config, server_args, get_processor_wrapper(),
                                     "default", model_config=config)
    vision = VisionEncoderArgs(hidden_size=32, num_channels=3, image_size=1540, patch_size=14,
                               intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               rope_theta=1e4, image_token_id=10, adapter_bias=False,
                               spatial_merge_size=2, add_pre_mm_projector_layer_norm=True,
                               mm_projector_id="patch_merge")
    tower = types.SimpleNamespace(
        vision_args=vision, vision_encoder=VisionTransformer(vision),
        pre_mm_projector_norm=RMSNorm(32, eps=1e-5),
        patch_merger=PatchMerger(vision_encoder_dim=32, spatial_merge_size=2),
        vision_language_adapter=VisionLanguageAdapter(vision, dim=64))
    return processor, tower


def encode(tokenizer, images):
    """Our prompt: one user turn with `images` then a question, as the ingress encodes it."""
    content = [{"type": "image_url", "image_url": {"url": f"img{i}"}} for i in range(len(images))]
    messages = [{"role": "user", "content": content + [{"type": "text", "text": "Describe."}]}]
    decoded = {(0, i): image.convert("RGB") if image.mode == "CMYK" else image
               for i, image in enumerate(images)}
    return tokenizer.encode_chat(messages, effort="none", images=decoded)


def through_sglang(sglang_side, ids, payload):
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.models.pixtral import PixtralForConditionalGeneration

    processor, tower = sglang_side
    request = GenerateReqInput(input_ids=ids, image_data=payload)
    out = asyncio.run(processor.process_mm_data_async(
        image_data=payload, input_text=ids, request_obj=request, max_req_input_len=1 << 20))
    embeddings = PixtralForConditionalGeneration.get_image_feature(tower, out.mm_items)
    return out, embeddings


ONE_ROW = [((100, 20), "RGB"), ((56, 28), "RGB")]  # SGLang splits these into an item each


@pytest.mark.parametrize("sizes", [SIZES_MODES[:1], SIZES_MODES[:2], SIZES_MODES, ONE_ROW],
                         ids=["1", "2", "8", "one-row"])
def test_images_reach_the_vision_tower_where_our_encoding_put_them(sizes, tokenizer,
                                                                    sglang_side):
    count = len(sizes)
    images = [Image.new(mode, size, 90) for size, mode in sizes]
    encoded = encode(tokenizer, images)
    tokens = ImageTokens.of(tokenizer)
    uniform = uniform_image_sizes(encoded, tokens)  # what the multimodal service sends
    ids, payload = uniform.ids, image_payload(uniform.ids, uniform.images, tokens)
    if len({p.shape for p in encoded.images}) == 1:
        assert ids == encoded.ids, "images of one size go exactly as mistral-common encoded them"
    out, embeddings = through_sglang(sglang_side, ids, payload)
    assert list(out.input_ids) == ids, "SGLang re-tokenised or re-laid-out our prompt"
    assert len(image_offsets(ids, tokens)) == count
    offsets = [o for it in out.mm_items for o in it.offsets]
    assert offsets == image_rows(ids, tokens), "SGLang kept the rows we sent, in order"
    assert embeddings.shape[0] == ids.count(tokens.img), "one embedding per [IMG]"
    # and through the forward pass's own embedding step, where placeholders meet embeddings
    # (an offset over a whole image padded its [IMG_BREAK]s too: more placeholders than
    # embeddings, an exception there, and the engine's scheduler gone)
    embedded, mask = forward_embedding(sglang_side, ids, out)
    assert int(mask.sum()) == embedded.shape[0] == ids.count(tokens.img)
    assert [i for i, on in enumerate(mask.flatten().tolist()) if on] == [
        i for i, t in enumerate(ids) if t == tokens.img]


def forward_embedding(sglang_side, ids, out):
    """What the prefill's forward pass does with the request's items: pad the placeholders,
    embed the items, match the two (`get_embedding_and_mask`)."""
    import functools
    from array import array

    import torch
    from sglang.srt.managers import mm_schedule
    from sglang.srt.managers.mm_utils import pad_mm_tokens
    from sglang.srt.managers.schedule_batch import MultimodalInputs
    from sglang.srt.models.pixtral import PixtralForConditionalGeneration

    _, tower = sglang_side
    mm_schedule.init_mm_embedding_cache(100 * 1024 * 1024)
    inputs = MultimodalInputs(mm_items=out.mm_items, im_token_id=out.im_token_id)
    padded = torch.tensor(list(pad_mm_tokens(array("q", ids), inputs)))
    pads = torch.tensor(sorted(v for it in out.mm_items for v in it.padding_values()))
    embedder = functools.partial(PixtralForConditionalGeneration.get_image_feature, tower)
    embedded, mask, _ = mm_schedule.get_embedding_and_mask(
        embedder, out.mm_items, pads, padded, [0, len(out.mm_items)], [0], [len(ids)],
        [[o for it in out.mm_items for o in it.offsets]])
    return embedded, mask


def test_the_old_payload_is_what_sglang_refused(tokenizer, sglang_side):
    """numpy arrays in a list (before the fix): SGLang cannot hash them, every image request
    failed and was retried as if the engine had died."""
    encoded = encode(tokenizer, [Image.new("RGB", (100, 40))])
    old = [{"format": "processor_output", "pixel_values": list(encoded.images),
            "image_sizes": [tuple(p.shape[-2:]) for p in encoded.images]}]
    with pytest.raises(TypeError, match="buffer API"):
        through_sglang(sglang_side, encoded.ids, old)
