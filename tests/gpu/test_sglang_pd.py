"""SGLang's real PD path (GPU host, the `sglang` extra): a prefill and a decode engine on a
scaled-down Mistral-4-shaped checkpoint with dummy weights (reference/sglang.md §8), our prefill
and decode workers around them, one request paired through the bootstrap server and the KV moved
by the transfer backend. Prints TTFT and tokens/s. Skipped elsewhere, with the reason."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import pytest

from services.context import RequestContext
from services.engines.protocol import EngineRequest, SamplingParams
from services.settings import (EngineSettings, KVHandoffSettings, ModelSettings, SGLangSettings,
                               StreamSettings)
from services.tokenizer import PromptTokenizer, standin_tokenizer_path

pytestmark = pytest.mark.gpu

MOE = {"num_experts": 128, "num_experts_per_tok": 4, "expert_hidden_dim": 128,
       "first_k_dense_replace": 0, "num_shared_experts": 1, "routed_scale": 1.0,
       "num_expert_groups": 1, "num_expert_groups_per_tok": 1}
PARAMS = {"dim": 256, "n_layers": 2, "head_dim": 128, "hidden_dim": 512, "n_heads": 32,
          "n_kv_heads": 32, "norm_eps": 1e-6, "vocab_size": 131072, "rope_theta": 1e4,
          "max_position_embeddings": 1048576, "q_lora_rank": 1024, "qk_rope_head_dim": 64,
          "qk_nope_head_dim": 64, "kv_lora_rank": 256, "v_head_dim": 128, "moe": MOE,
          "yarn": {"factor": 128, "original_max_position_embeddings": 8192, "beta": 32,
                   "alpha": 1, "apply_scale": False},
          "llama_4_scaling": {"original_max_position_embeddings": 8192, "beta": 0.1}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Mistral-native layout; SGLang detects it by the directory name."""
    path = tmp_path_factory.mktemp("weights") / "mistral-small-4-smoke"
    path.mkdir()
    (path / "params.json").write_text(json.dumps(PARAMS))
    shutil.copy(standin_tokenizer_path(), path / "tekken.json")
    return path


@pytest.fixture(scope="module")
def decode(checkpoint):
    """Our decode worker and its prefill worker, each with its SGLang engine (started once)."""
    from services.settings import WorkerSettings
    from services.workers.decode import DecodeWorker
    from services.workers.prefill import PrefillWorker

    # both engines share the one GPU of the smoke machine: a third of its memory each
    worker = WorkerSettings(
        pool="fast", model=ModelSettings(source="checkpoint", path=checkpoint,
                                         context_length=4096, dtype="bfloat16"),
        engine=EngineSettings(kind="sglang", max_running_requests=8,
                              sglang=SGLangSettings(load_format="dummy", mem_fraction_static=0.3,
                                                    chunked_prefill_size=2048)),
        kv_handoff=KVHandoffSettings(backend="sglang", timeout_s=60),
        stream=StreamSettings(interval_tokens=1), tensor_parallel=1,
        bootstrap_ports=[18998, 18999])
    return DecodeWorker(worker, PrefillWorker(worker))


# One loop for every request: SGLang's tokenizer manager reads its engine's outputs on the loop
# of the first request, for good (`auto_create_handle_loop`); a request on a later
# `asyncio.run` would never hear back.
LOOP = asyncio.new_event_loop()


def run(decode, request: EngineRequest):
    """(TTFT s, token ids, decode s, finish reason) of one request through the PD pair."""
    async def go():
        started, first, ids, finish = time.perf_counter(), None, [], None
        async for chunk in decode.generate(RequestContext(request.request_id), request):
            first = first or time.perf_counter()
            ids, finish = ids + list(chunk.token_ids), chunk.finish_reason or finish
        return first - started, ids, time.perf_counter() - first, finish

    return LOOP.run_until_complete(go())


def test_one_request_through_sglang_pd(decode):
    prompt = PromptTokenizer().encode_chat([{"role": "user", "content": "Count to ten."}],
                                           effort="none")
    request = EngineRequest("smoke-1", prompt.ids, SamplingParams(max_tokens=64,
                                                                  temperature=0.0))
    ttft, ids, decode_s, finish = run(decode, request)
    tokens = len(ids)
    print(json.dumps({"ttft_s": round(ttft, 4), "tokens": tokens, "finish_reason": finish,
                      "decode_tokens_per_s": round((tokens - 1) / decode_s, 1)
                      if decode_s > 0 else None}))
    assert tokens >= 1 and finish in ("stop", "length")
    # SGLang publishes its load before a finished request leaves the batch: the idle snapshot
    # comes a scheduler step later
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (decode.engine.stats().running
                                           or decode.prefill.engine.stats().running):
        time.sleep(0.05)
    assert decode.engine.stats().running == 0 and decode.prefill.engine.stats().running == 0


def test_a_json_schema_answer_through_sglang_pd_validates(decode):
    """The grammar runs in SGLang's llguidance backend (our plugin, both engines): random
    weights, sampled at temperature 1, still answer JSON that validates."""
    import jsonschema

    from services.grammar import Guidance, StructuredRequest
    from tests.structured_cases import SCHEMA

    tokenizer = PromptTokenizer()
    lark = Guidance(tokenizer).grammar(StructuredRequest(response_format={
        "type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}))
    prompt = tokenizer.encode_chat([{"role": "user", "content": "A thing, as JSON."}],
                                   effort="none")
    for seed in range(3):
        request = EngineRequest(f"smoke-json-{seed}", prompt.ids,
                                SamplingParams(max_tokens=256, temperature=1.0, grammar=lark))
        _, ids, _, finish = run(decode, request)
        assert finish == "stop", finish
        text = tokenizer.decode([t for t in ids if t != tokenizer.eos_id])
        jsonschema.validate(json.loads(text), SCHEMA)
