"""Load the model an engine runs: the seeded stand-in, or a local HF checkpoint directory.

Only local files are read (no hub access): a directory of `Mistral3ForConditionalGeneration` (the
real architecture) or of any causal LM transformers can load. The tokenizer is always
mistral-common's (the prompt format is Mistral's), so a checkpoint's vocabulary must cover it.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.errors import InvalidRequest
from services.model.standin import IMAGE_TOKEN_ID, build_standin_model
from services.settings import ModelSettings


@dataclass
class ModelBundle:
    """A loaded model plus the facts engines need about it."""

    model: Any
    image_token_id: int | None
    has_vision: bool
    vocab_size: int
    description: str
    cache_arg: str = field(init=False)

    def __post_init__(self) -> None:
        # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns, and goes
        # in 5.40); older releases and other architectures still take `past_key_values`
        params = inspect.signature(self.model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def forward(self, cache: Any, **inputs: Any) -> Any:
        """One forward that extends `cache` and returns the last position's logits."""
        return self.model(**inputs, **{self.cache_arg: cache}, use_cache=True, logits_to_keep=1)

    def embed(self, ids: torch.Tensor, images: list[torch.Tensor],
              skip_rows: int = 0) -> torch.Tensor:
        """Input embeddings for `ids` [1, n], with each image's vision features at its `[IMG]`
        slots. `skip_rows`: leading rows of the first image's features whose slots lie before
        `ids` (a prefill that starts inside an image, its first slots' KV taken from a cache)."""
        embeds = self.model.get_input_embeddings()(ids)
        if not images:
            return embeds
        if not self.has_vision:
            raise InvalidRequest("this model has no vision tower; remove the image parts",
                                 param="messages")
        features = [_image_features(self.model.model, px.to(embeds.dtype)) for px in images]
        feats = torch.cat(features, dim=0).to(embeds.dtype)[skip_rows:]
        mask = ids == self.image_token_id
        if int(mask.sum()) != feats.shape[0]:
            raise InvalidRequest(
                f"prompt has {int(mask.sum())} image slots but the images fill {feats.shape[0]}",
                param="messages")
        return embeds.masked_scatter(mask[..., None].expand_as(embeds), feats)


def _image_features(core: Any, px: torch.Tensor) -> torch.Tensor:
    """One CHW image's vision features, one row per `[IMG]` slot.

    transformers' Mistral3 loses an image that fills a single slot (it squeezes the slot axis of
    its [1, hidden] result away and then fails to split it), so such an image goes through the
    tower as a batch of two copies and the first copy's row is kept: the tower attends within
    each image only, so the row is the one the image alone would give."""
    merged = core.vision_tower.patch_size * core.config.spatial_merge_size
    batch, sizes = px[None], torch.tensor([list(px.shape[-2:])])
    if (px.shape[-2] // merged) * (px.shape[-1] // merged) == 1:
        batch, sizes = torch.cat([batch, batch]), sizes.repeat(2, 1)
    return core.get_image_features(pixel_values=batch, image_sizes=sizes,
                                   return_dict=True).pooler_output[0]


def load_model(settings: ModelSettings) -> ModelBundle:
    """Build or load the model named by `settings` (stand-in from seed, or a local checkpoint)."""
    dtype = getattr(torch, settings.dtype)
    if settings.source == "standin":
        model = build_standin_model(settings.seed, dtype)
        return ModelBundle(model, IMAGE_TOKEN_ID, True, model.config.text_config.vocab_size,
                           f"stand-in (seed {settings.seed})")
    return _load_checkpoint(Path(settings.path), dtype)


def _load_checkpoint(path: Path, dtype: torch.dtype) -> ModelBundle:
    from transformers import AutoModelForCausalLM, Mistral3ForConditionalGeneration

    config = json.loads((path / "config.json").read_text())
    if "Mistral3ForConditionalGeneration" in config.get("architectures", []):
        model = Mistral3ForConditionalGeneration.from_pretrained(path, dtype=dtype,
                                                                 local_files_only=True)
        vocab = model.config.text_config.vocab_size
        return ModelBundle(model.eval(), model.config.image_token_index, True, vocab, str(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return ModelBundle(model.eval(), None, False, model.config.vocab_size, str(path))
