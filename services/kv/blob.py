"""A KV cache exported by a CPU engine: per-layer (keys, values) numpy arrays, picklable.

numpy rather than torch so Ray's object store hands it over without a pickle copy; the importing
engine copies it into its own tensors (store buffers are read-only). numpy has no bfloat16: such
a cache travels as its bits (int16) and is viewed back on import.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class KVBlob:
    """The prompt's KV: `layers[i] = (keys, values)`, each shaped [1, heads, tokens, dim]."""

    layers: list[tuple[np.ndarray, np.ndarray]]
    bits_of: str = ""  # "bfloat16": the arrays hold that dtype's bits

    def layout(self) -> tuple:
        """What a decode engine must match: per layer, each array's shape but the token axis,
        and the dtype."""
        return tuple((k.shape[:-2] + k.shape[-1:], v.shape[:-2] + v.shape[-1:])
                     for k, v in self.layers) + ((self.bits_of or str(self.layers[0][0].dtype))
                                                 if self.layers else "",)

    @property
    def num_tokens(self) -> int:
        return int(self.layers[0][0].shape[-2]) if self.layers else 0

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)

    @classmethod
    def from_cache(cls, cache) -> KVBlob:
        """Export a transformers cache (its layers' keys/values) after a prefill."""
        bits = bool(cache.layers) and cache.layers[0].keys.dtype == torch.bfloat16

        def array(t: torch.Tensor) -> np.ndarray:
            t = t.detach()
            return (t.view(torch.int16) if bits else t).numpy().copy()
        return cls([(array(layer.keys), array(layer.values)) for layer in cache.layers],
                   "bfloat16" if bits else "")

    def to_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Writable torch copies, ready to extend during decode."""
        def tensor(a: np.ndarray) -> torch.Tensor:
            t = torch.tensor(a)
            return t.view(getattr(torch, self.bits_of)) if self.bits_of else t
        return [(tensor(k), tensor(v)) for k, v in self.layers]
