"""Token sampling shared by the CPU engines: logit bias, presence and frequency penalties, grammar
masks, greedy/temperature/nucleus picks with reproducible seeds, and logprobs.

Each sequence keeps one `Sampler`. Its steps, per token: add `logit_bias`; mask `banned_ids`;
subtract the penalties
for the tokens generated so far (OpenAI's definitions: `presence_penalty` once per token seen,
`frequency_penalty` times its count); mask the ids the request's grammar forbids (llguidance,
batched over the running sequences by `sample_batch`); then pick. Logprobs are taken from the
distribution after those steps and before temperature and top-p, so a constrained answer's
alternatives are the tokens it could have taken.

A seeded request draws each token from a generator keyed by (seed, position), so the same seed
gives the same tokens whether prefill and decode run in one engine or two, and whichever decode
replica continues a stream. A resumed stream's sampler replays the tokens already generated
(`SamplingParams.stop_context`) into its counts and grammar first.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch

from services.engines.protocol import SamplingParams, TokenLogprob
from services.grammar import Guidance, allowed

_SEED_STRIDE = 1_000_003


class Sampler:
    """One sequence's sampling state: the tokens it generated and its grammar's position."""

    def __init__(self, params: SamplingParams, guidance: Guidance | None = None,
                 history: Sequence[int] = ()):
        self.params = params
        self.counts: Counter[int] = Counter()
        self.constraint = None
        if params.grammar is not None:
            if guidance is None:
                raise ValueError("a grammar-constrained request needs an engine with guidance")
            self.constraint = guidance.constraint(params.grammar)
        for token in history:
            self.accept(token)

    def accept(self, token: int) -> None:
        """Count a generated token and advance the grammar over it."""
        if self.params.presence_penalty or self.params.frequency_penalty:
            self.counts[token] += 1
        if self.constraint is not None:
            self.constraint.advance(token)

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """Bias and penalties applied to one row of logits (a new tensor when any applies)."""
        params = self.params
        if params.logit_bias:
            logits = logits.clone()
            ids = torch.tensor([i for i, _ in params.logit_bias])
            logits[ids] += torch.tensor([b for _, b in params.logit_bias])
        if params.banned_ids:
            logits = logits.clone() if not params.logit_bias else logits
            logits[torch.tensor(params.banned_ids)] = float("-inf")
        if self.counts:
            logits = logits.clone() if not (params.logit_bias or params.banned_ids) else logits
            ids = torch.tensor(list(self.counts))
            counts = torch.tensor(list(self.counts.values()), dtype=logits.dtype)
            logits[ids] -= params.presence_penalty + params.frequency_penalty * counts
        return logits

    def pick(self, logits: torch.Tensor, position: int) -> tuple[int, TokenLogprob | None]:
        """The next token from one adjusted, masked row of logits, and its logprobs if asked."""
        token = _pick(logits, self.params, position)
        record = None
        if self.params.logprobs is not None:
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            top = ()
            if self.params.logprobs:
                values, ids = torch.topk(logprobs, self.params.logprobs)
                top = tuple((int(i), float(v)) for i, v in zip(ids, values))
            record = TokenLogprob(token, float(logprobs[token]), top)
        self.accept(token)
        return token, record


def sample_batch(samplers: list[Sampler], logits: torch.Tensor,
                 positions: list[int]) -> list[tuple[int, TokenLogprob | None]]:
    """One token per row of `logits` ([B, V]), each row by its own sampler; the grammar masks
    of the constrained rows are computed together and applied in one step."""
    constrained = [row for row, s in enumerate(samplers) if s.constraint is not None]
    if constrained:
        masks = torch.stack([samplers[row].constraint.fill() for row in constrained])
        forbidden = torch.zeros(logits.shape, dtype=torch.bool)
        forbidden[constrained] = ~allowed(masks, logits.shape[-1])
        logits = logits.masked_fill(forbidden, float("-inf"))
    return [sampler.pick(sampler.adjust(logits[row]), position)
            for row, (sampler, position) in enumerate(zip(samplers, positions))]


def sample_token(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """Pick from one row of logits with no state (no bias, penalties or grammar)."""
    return _pick(logits, params, position)


# Below this temperature a pick is greedy, as in SGLang (its _SAMPLING_EPS): dividing by a
# temperature that underflows float32 would make the distribution NaN.
GREEDY_BELOW = 1e-6


def _pick(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    if params.temperature < GREEDY_BELOW or params.top_p <= 0.0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        probs = nucleus(probs, params.top_p)
    generator = None
    if params.seed is not None:
        generator = torch.Generator().manual_seed((params.seed * _SEED_STRIDE + position) % 2**63)
    return draw(probs, generator)


# How many of the most likely tokens a nucleus is first looked for in: a trained model's
# nucleus is usually a few of its 131k tokens, and a top-k of them costs a fraction of sorting
# the whole vocabulary (~0.3 ms against ~11 ms here). A flatter distribution sorts it all.
NUCLEUS_HEAD = 256


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs` kept to the nucleus, unnormalised: the most likely tokens, in order, while the
    mass before each is below `top_p` (the most likely one always); the rest zero."""
    values, order = torch.topk(probs, min(NUCLEUS_HEAD, probs.numel()))  # sorted, descending
    if float(values.sum()) < top_p and values.numel() < probs.numel():
        values, order = torch.sort(probs, descending=True)  # the nucleus reaches past the head
    keep = torch.cumsum(values, dim=-1) - values < top_p
    keep[0] = True
    return torch.zeros_like(probs).scatter_(0, order[keep], values[keep])


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One token drawn with probability proportional to `probs` (not necessarily normalised):
    one uniform number placed on their running sum. `torch.multinomial` draws the same way in
    distribution but costs ~20x more over a 131k vocabulary on CPU (~2.8 ms a token against
    0.15). A token of probability zero is never drawn: its running sum equals the one before."""
    cumulative = torch.cumsum(probs, dim=-1, dtype=torch.float64)
    total = float(cumulative[-1])
    if not math.isfinite(total) or total <= 0:  # a row that masks every token, or a NaN
        raise RuntimeError(f"no token can be drawn: the probabilities sum to {total}")
    point = torch.rand(1, generator=generator, dtype=torch.float64) * total
    token = int(torch.searchsorted(cumulative, point, right=True))
    if token >= probs.numel():  # the point rounded up onto the total: the last possible token
        token = int(torch.nonzero(probs)[-1])
    return token
