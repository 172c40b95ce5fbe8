"""Why SGLang deployments refuse constrained decoding, pinned against the real library: its
grammar backends build their token tables from a fast (`tokenizers`) tokenizer, and the Mistral
checkpoint's tokenizer is Tekken (`tekken.json`, read by transformers' MistralCommonBackend).
The day SGLang takes it, this test fails: then send our grammars (`ebnf`, Lark, which its
llguidance backend reads) and lift the ingress's refusal."""

from __future__ import annotations

import pytest


def test_sglangs_llguidance_backend_cannot_take_the_mistral_tokenizer(checkpoint):
    from sglang.srt.constrained.llguidance_backend import GuidanceBackend
    from sglang.srt.utils.hf_transformers_utils import get_tokenizer

    tokenizer = get_tokenizer(str(checkpoint))
    assert type(tokenizer).__name__ == "MistralCommonBackend"
    with pytest.raises(ValueError, match="fast tokenizers"):
        GuidanceBackend(tokenizer, n_vocab=131072, eos_token_ids=[2])
