"""Tenants stay apart in SGLang's radix cache: what our engine sends SGLang carries the tenant's
salt as SGLang's own `cache_salt`, which its request class keeps and its radix tree namespaces
(the real sglang 0.5.23 classes; no GPU)."""

from __future__ import annotations

import inspect
from array import array

import pytest

from services.engines.protocol import EngineRequest, SamplingParams
from services.engines.sglang_args import generate_args
from services.engines.sglang_engine import salted

PAIRING = {"bootstrap_host": "10.0.0.1", "bootstrap_port": 8998, "bootstrap_room": 7}


def engine_args(salt: str) -> dict:
    request = EngineRequest("r1", list(range(100, 164)), SamplingParams(max_tokens=4),
                            handoff=dict(PAIRING), cache_salt=salt)
    return salted(generate_args(request, (2,)), request)


def test_the_salt_reaches_sglangs_request_as_its_cache_salt():
    from sglang.srt.entrypoints.engine import Engine
    from sglang.srt.managers.io_struct import GenerateReqInput

    kwargs = engine_args("tenant-a")
    assert set(kwargs) <= set(inspect.signature(Engine.async_generate).parameters)
    request = GenerateReqInput(**kwargs)
    request.normalize_batch_and_arguments()
    assert request.cache_salt == "tenant-a"
    assert "cache_salt" not in engine_args("")  # no salt: SGLang's one shared namespace


@pytest.mark.parametrize("other, shared", [("tenant-a", 64), ("tenant-b", 0), (None, 0)])
def test_sglangs_radix_tree_shares_a_prompt_only_within_its_salt(other, shared):
    import torch
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

    ids = array("q", engine_args("tenant-a")["input_ids"])
    tree = RadixCache.create_simulated()
    tree.insert(InsertParams(key=RadixKey(ids, cache_salt=engine_args("tenant-a")["cache_salt"]),
                             value=torch.arange(len(ids))))
    hit = tree.match_prefix(MatchPrefixParams(key=RadixKey(ids, cache_salt=other)))
    assert hit.device_prefix_len == shared


def test_a_seed_is_refused_only_where_sglang_would_sample():
    """Below SGLang's own epsilon it samples greedily (a seed changes nothing): the seed
    refusal of an engine not started deterministic uses the same bound."""
    from sglang.srt.sampling import sampling_params

    from services.engines.sglang_args import GREEDY_BELOW

    assert GREEDY_BELOW == sampling_params._SAMPLING_EPS
    params = sampling_params.SamplingParams(temperature=GREEDY_BELOW / 2)
    assert params.top_k == 1  # greedy
