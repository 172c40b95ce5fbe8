"""A local checkpoint directory serves like the stand-in: the loader reads it with no hub
access, and the reference engine's prefill → handoff → decode reproduces `generate` on it."""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.engines.protocol import EngineRequest, SamplingParams
from services.errors import InvalidRequest
from services.model.loader import load_model
from services.settings import ModelSettings
from tests.unit.test_reference_engine import (GREEDY, disaggregated, make_engine, prompt_of,
                                              reference_ids)


def _greedy_equals_generate(bundle, tokenizer) -> None:
    prompt = prompt_of(tokenizer, 5, salt="ckpt")
    request = EngineRequest("ckpt", prompt, SamplingParams(max_tokens=8, **GREEDY))
    engines = make_engine(bundle, tokenizer, "prefill"), make_engine(bundle, tokenizer, "decode")
    assert asyncio.run(disaggregated(*engines, request)) == reference_ids(bundle, prompt, 8)


def test_a_saved_mistral3_checkpoint_loads_with_its_vision_tower(standin, tokenizer, tmp_path):
    standin.model.save_pretrained(tmp_path)
    bundle = load_model(ModelSettings(source="checkpoint", path=tmp_path))
    assert bundle.has_vision and bundle.image_token_id == standin.image_token_id
    assert bundle.vocab_size == standin.vocab_size
    loaded = bundle.model.state_dict()
    for name, tensor in standin.model.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
    _greedy_equals_generate(bundle, tokenizer)


def test_a_text_only_causal_lm_checkpoint_serves_text(tokenizer, tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(3)
    config = MistralConfig(vocab_size=131072, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=8, max_position_embeddings=4096)
    MistralForCausalLM(config).save_pretrained(tmp_path)
    bundle = load_model(ModelSettings(source="checkpoint", path=tmp_path))
    assert not bundle.has_vision and bundle.vocab_size == 131072
    _greedy_equals_generate(bundle, tokenizer)
    with pytest.raises(InvalidRequest, match="no vision tower"):
        bundle.embed(torch.tensor([[1, 2]]), [torch.zeros(3, 16, 16)])
