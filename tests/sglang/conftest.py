"""The SGLang conformance tier: our adapter held to the real sglang 0.5.23 wherever it runs
without a GPU (`make test-sglang` builds its venv). Elsewhere every test here is skipped, saying
so; the `gpu` tier starts real engines."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


def _merged(base: dict, over: dict) -> dict:
    """Helm's merge of a values file over the chart's values."""
    out = dict(base)
    for key, value in over.items():
        out[key] = (_merged(base[key], value) if isinstance(value, dict)
                    and isinstance(base.get(key), dict) else value)
    return out


def gpu_profiles() -> dict[str, dict]:
    """Every settings document that runs SGLang: the production profile, the chart's default
    stack, and the chart's h200x16 profile merged over it."""
    import yaml

    chart = yaml.safe_load((ROOT / "helm" / "small4" / "values.yaml").read_text())["stack"]
    over = yaml.safe_load((ROOT / "helm" / "small4" / "profiles" / "h200x16.yaml").read_text())
    return {"cluster/h200x16": yaml.safe_load(
                (ROOT / "cluster" / "profiles" / "h200x16.yaml").read_text()),
            "chart/values": chart, "chart/h200x16": _merged(chart, over["stack"])}


# The SGLang modules the tier uses, imported once with their import-time warnings silenced:
# sglang and the kernel libraries it pulls in deprecate their own names as they load (item 8 of
# the conformance issue: the suite's warnings-as-errors is for our code and what we call).
def sglang_installed() -> bool:
    """The real sglang, not this folder (which pytest's path insertion makes importable as the
    namespace package `sglang` where the real one is missing)."""
    spec = importlib.util.find_spec("sglang")
    return spec is not None and spec.origin is not None


SGLANG_MODULES = ("sglang.srt.server_args", "sglang.srt.configs.model_config",
                  "sglang.srt.managers.multimodal_processor", "sglang.srt.managers.tokenizer_manager",
                  "sglang.srt.managers.io_struct", "sglang.srt.models.pixtral",
                  "sglang.srt.layers.layernorm", "sglang.srt.entrypoints.engine",
                  "sglang.srt.sampling.sampling_params", "sglang.srt.environ",
                  "sglang.srt.disaggregation.utils")
if sglang_installed():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in SGLANG_MODULES:
            importlib.import_module(name)


def pytest_collection_modifyitems(config, items):
    if sglang_installed():
        return
    skip = pytest.mark.skip(reason="SGLang conformance tier: run `make test-sglang`")
    for item in items:
        if str(item.fspath).startswith(str(HERE)):
            item.add_marker(skip)


# Mistral Small 4's `params.json` (shapes from the model card and the conversion script; FP8
# weights), the Mistral-native layout SGLang loads.
MOE = {"num_experts": 128, "num_experts_per_tok": 4, "expert_hidden_dim": 2048,
       "first_k_dense_replace": 0, "num_shared_experts": 1, "routed_scale": 1.0,
       "num_expert_groups": 1, "num_expert_groups_per_tok": 1}
VISION = {"hidden_size": 1024, "num_channels": 3, "image_size": 1540, "max_image_size": 1540,
          "patch_size": 14, "rope_theta": 10000.0, "intermediate_size": 4096,
          "num_hidden_layers": 24, "num_attention_heads": 16, "image_token_id": 10,
          "image_break_token_id": 12, "image_end_token_id": 13, "spatial_merge_size": 2,
          "mm_projector_id": "patch_merge", "add_pre_mm_projector_layer_norm": True,
          "adapter_bias": False}
PARAMS = {"dim": 4096, "n_layers": 36, "head_dim": 128, "hidden_dim": 12288, "n_heads": 32,
          "n_kv_heads": 32, "norm_eps": 1e-6, "vocab_size": 131072, "rope_theta": 1e4,
          "max_position_embeddings": 1048576, "q_lora_rank": 1024, "qk_rope_head_dim": 64,
          "qk_nope_head_dim": 64, "kv_lora_rank": 256, "v_head_dim": 128, "moe": MOE,
          "yarn": {"factor": 128, "original_max_position_embeddings": 8192, "beta": 32,
                   "alpha": 1, "apply_scale": False},
          "llama_4_scaling": {"original_max_position_embeddings": 8192, "beta": 0.1},
          "vision_encoder": VISION,
          "quantization": {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"}}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A config-only Mistral-native checkpoint directory of the real model's shape (SGLang
    detects the format by the directory name)."""
    from services.tokenizer import standin_tokenizer_path

    path = tmp_path_factory.mktemp("models") / "mistral-small-4-119b-2603"
    path.mkdir()
    (path / "params.json").write_text(json.dumps(PARAMS))
    shutil.copy(standin_tokenizer_path(), path / "tekken.json")
    return path
