"""The stand-in: Mistral Small 4's architecture scaled down, built from config with seeded weights.

It keeps the real shapes that matter to serving (128 experts, top-4, one shared expert, MLA latent
KV, the 131072-token Tekken vocabulary, a Pixtral vision tower with 14-px patches and 2x2 merge) so
the prompt format, image layout and KV handoff are exercised for real, while a forward pass costs
milliseconds on a laptop CPU. Nothing is downloaded: the tokenizer is mistral-common's bundled
Tekken vocabulary re-labelled as a v15 tokenizer with the `reasoning_effort` model setting.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Special-token names by Tekken rank. Ranks 0-19 are fixed across Tekken versions; 32-37 follow the
# v15 layout assumed by the serving code (looked up by name at run time, never by number).
SPECIAL_TOKEN_NAMES: dict[int, str] = dict(
    enumerate(
        [
            "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
            "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
            "[TOOL_CONTENT]",
        ]
    )
) | {32: "[ARGS]", 33: "[CALL_ID]", 34: "[THINK]", 35: "[/THINK]", 36: "[MODEL_SETTINGS]",
     37: "[/MODEL_SETTINGS]"}

IMAGE_TOKEN_ID = 10


def standin_tekken() -> dict:
    """The v15 Tekken tokenizer document built from mistral-common's bundled vocabulary."""
    import mistral_common

    data_dir = Path(mistral_common.__file__).parent / "data"
    doc = json.loads((data_dir / "tekken_240911.json").read_text())
    n_special = doc["config"]["default_num_special_tokens"]
    doc["special_tokens"] = [
        {"rank": i, "token_str": SPECIAL_TOKEN_NAMES.get(i, f"<SPECIAL_{i}>"), "is_control": True}
        for i in range(n_special)
    ]
    doc["config"]["version"] = "v15"
    doc["image"] = {"image_patch_size": 14, "max_image_size": 1540, "spatial_merge_size": 2}
    doc["model_settings_builder"] = {
        "reasoning_effort": {"type": "enum", "values": ["none", "high"], "accepts_none": True,
                             "default": "none"}
    }
    return doc


def write_standin_tokenizer(directory: Path) -> Path:
    """Write `tekken.json` into `directory` (mistral-common needs a file whose name says tekken)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tekken.json"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(standin_tekken()))
        tmp.replace(path)
    return path


def standin_config():
    """`Mistral3Config` with the Mistral-4 text backbone of the real shape, scaled down."""
    from transformers import Mistral3Config, Mistral4Config, PixtralVisionConfig

    text = Mistral4Config(
        vocab_size=131072, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=128, num_experts_per_tok=4,
        n_shared_experts=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=16,
        qk_nope_head_dim=16, v_head_dim=32, max_position_embeddings=1048576,
        bos_token_id=1, eos_token_id=2, pad_token_id=11,
    )
    vision = PixtralVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=1540, patch_size=14, hidden_act="silu",
    )
    return Mistral3Config(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
        spatial_merge_size=2, multimodal_projector_bias=False, vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def build_standin_model(seed: int, dtype: torch.dtype = torch.float32):
    """The stand-in `Mistral3ForConditionalGeneration`, weights drawn from `seed` (same seed, same model)."""
    from transformers import Mistral3ForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Mistral3ForConditionalGeneration(standin_config())
    return model.to(dtype).eval()
