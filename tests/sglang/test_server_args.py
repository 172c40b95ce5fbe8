"""Our `ServerArgs` for both roles of every GPU profile, resolved by SGLang's own pipeline on
the Mistral-native config of the real model's shape: no error and no warning we have not
explained, 256K context accepted, each prefill replica's bootstrap port its own, speculative
decoding accepted on both roles, the KV transfer library importable."""

from __future__ import annotations

import pytest

from cluster.settings import parse_settings
from cluster.topology import bootstrap_ports
from services.engines.sglang_args import FAKE_BOOTSTRAP_HOST, require_transfer_backend
from tests.sglang.conftest import gpu_profiles
from tests.sglang.resolve import environment, listening, profile_args, resolve, unexpected

PROFILES = gpu_profiles()
ENGINES = [(name, pool, role) for name, profile in PROFILES.items()
           for pool in profile["pools"] for role in ("prefill", "decode")]


@pytest.mark.parametrize("name, pool, role", ENGINES)
def test_every_engine_of_every_gpu_profile_resolves_cleanly(name, pool, role, checkpoint):
    port = bootstrap_ports(parse_settings(PROFILES[name]).pools,
                           parse_settings(PROFILES[name]).topology)[pool][0]
    args, env, _ = profile_args(PROFILES[name], pool, role, checkpoint,
                                port if role == "prefill" else None)
    with listening() as heard:
        resolved = resolve(args, env)
    assert unexpected(heard) == []
    assert resolved.disaggregation_mode == role and resolved.skip_tokenizer_init is True
    assert resolved.host == "10.0.0.7" and resolved.tp_size == 2
    decided = resolved.resolved_dict()  # what SGLang made of our arguments
    assert decided["dtype"] == "bfloat16"
    assert decided["disable_radix_cache"] is (role == "decode")  # SGLang's own, for decode
    if role == "prefill":
        assert resolved.disaggregation_bootstrap_port == port


def test_the_model_and_engine_settings_sglang_has_fields_for_reach_it(checkpoint):
    """The weights' seed (dummy weights, sampling) and a prefix cache turned off (the radix
    cache) are SGLang's settings too, not only the CPU engines'."""
    profile = PROFILES["cluster/h200x16"]
    profile = profile | {"model": profile["model"] | {"seed": 7},
                         "engine": profile["engine"] | {"prefix_cache": {"enabled": False}}}
    for role, port in (("prefill", 8998), ("decode", None)):
        args, env, _ = profile_args(profile, "fast", role, checkpoint, port)
        decided = resolve(args, env).resolved_dict()
        assert decided["random_seed"] == 7 and decided["disable_radix_cache"] is True


def test_the_models_256k_context_is_served(checkpoint):
    """The native config remap assumes 128000 positions unless params.json says otherwise;
    without the override engine_env sets, SGLang refuses the model card's context."""
    from sglang.srt.configs.model_config import ModelConfig

    args, env, _ = profile_args(PROFILES["cluster/h200x16"], "deep", "decode", checkpoint)
    with environment(env):
        config = ModelConfig.from_server_args(resolve(args, env))
    assert config.context_len == 262144
    assert config.hf_config.architectures == ["PixtralForConditionalGeneration"]
    without = {k: v for k, v in env.items() if k != "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"}
    with pytest.raises(ValueError, match="context_length"), environment(
            {"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "0"}):
        ModelConfig.from_server_args(resolve(args, without))


def test_pd_timeouts_and_the_probe_host_are_sglangs_own_names():
    from sglang.srt.disaggregation import utils
    from sglang.srt.environ import envs

    args, env, _ = profile_args(PROFILES["cluster/h200x16"], "fast", "decode", "/x")
    for name in env:
        if name.startswith("SGLANG_"):
            assert hasattr(envs, name), f"sglang reads no {name}"
    assert FAKE_BOOTSTRAP_HOST == utils.FAKE_BOOTSTRAP_HOST


def test_speculative_decoding_resolves_on_both_roles(checkpoint, tmp_path):
    draft = tmp_path / "mistral-small-4-119b-2603-eagle"
    draft.mkdir()
    (draft / "params.json").write_text((checkpoint / "params.json").read_text())
    (draft / "tekken.json").write_text((checkpoint / "tekken.json").read_text())
    profile = PROFILES["cluster/h200x16"] | {"engine": PROFILES["cluster/h200x16"]["engine"] | {
        "speculative": {"draft_model_path": str(draft), "num_steps": 3, "eagle_topk": 1,
                        "num_draft_tokens": 4}}}
    for role, port in (("prefill", 8998), ("decode", None)):
        args, env, _ = profile_args(profile, "deep", role, checkpoint, port)
        resolved = resolve(args, env)
        assert str(resolved.speculative_algorithm).upper().endswith("EAGLE")
        assert resolved.speculative_num_draft_tokens == 4


def test_the_kv_transfer_library_of_the_extra_imports():
    require_transfer_backend("nixl")
