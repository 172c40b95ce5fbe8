"""A KV cache exported by a CPU engine: per-layer (keys, values) numpy arrays, picklable.

numpy rather than torch so Ray's object store hands it over without a pickle copy; the importing
engine copies it into its own tensors (store buffers are read-only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class KVBlob:
    """The prompt's KV: `layers[i] = (keys, values)`, each shaped [1, heads, tokens, dim]."""

    layers: list[tuple[np.ndarray, np.ndarray]]

    @property
    def num_tokens(self) -> int:
        return int(self.layers[0][0].shape[-2]) if self.layers else 0

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)

    @classmethod
    def from_cache(cls, cache) -> KVBlob:
        """Export a transformers cache (its layers' keys/values) after a prefill."""
        return cls([(layer.keys.detach().numpy().copy(), layer.values.detach().numpy().copy())
                    for layer in cache.layers])

    def to_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Writable torch copies, ready to extend during decode."""
        return [(torch.tensor(k), torch.tensor(v)) for k, v in self.layers]
