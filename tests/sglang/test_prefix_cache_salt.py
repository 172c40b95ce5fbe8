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


def test_no_image_embedding_is_kept_across_requests_in_the_engines_environment():
    """SGLang's vision-embedding cache is keyed by image content alone, not salted: with it,
    one tenant resending another's image would skip the vision tower (a timing that tells).
    Off in the environment our engines start with, as SGLang reads it."""
    import torch
    from sglang.srt.environ import envs
    from sglang.srt.managers import mm_schedule
    from sglang.srt.mem_cache.multimodal_cache import EmbeddingResult

    from cluster.settings import parse_settings
    from services.engines.sglang_args import engine_env
    from tests.sglang.resolve import environment

    stack = parse_settings({"auth": {"enabled": False}})
    with environment(engine_env(stack.model, stack.kv_handoff, None)):
        size_mb = envs.SGLANG_VLM_CACHE_SIZE_MB.get()
    assert size_mb == 0
    mm_schedule.init_mm_embedding_cache(size_mb * 1024 * 1024)  # as SGLang's KV builder does
    try:
        kept = mm_schedule.embedding_cache.set(1234, EmbeddingResult(embedding=torch.ones(8, 4)))
        assert not kept and mm_schedule.embedding_cache.get_single(1234) is None
    finally:
        mm_schedule.init_mm_embedding_cache(100 * 1024 * 1024)
