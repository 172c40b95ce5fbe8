"""Token sampling shared by the CPU engines: greedy, temperature, nucleus, reproducible seeds.

A seeded request draws each token from a generator keyed by (seed, position), so the same seed
gives the same tokens whether prefill and decode run in one engine or two, and whichever decode
replica continues a stream.
"""

from __future__ import annotations

import torch

from services.engines.protocol import SamplingParams

_SEED_STRIDE = 1_000_003


def sample_token(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """Pick the next token from one row of logits for the token at `position` of the sequence."""
    if params.temperature <= 0.0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        keep = cumulative - sorted_probs < params.top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    generator = None
    if params.seed is not None:
        generator = torch.Generator().manual_seed((params.seed * _SEED_STRIDE + position) % 2**63)
    return int(torch.multinomial(probs, 1, generator=generator).item())
