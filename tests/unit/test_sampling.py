"""The CPU engines' temperature and nucleus draws (`services/engines/sampling.py`): the draw
follows the distribution it is given and never picks a token of probability zero; the nucleus
found from the most likely tokens first is the one a sort of the whole vocabulary gives."""

from __future__ import annotations

import math

import pytest
import torch

from services.engines.protocol import SamplingParams
from services.engines.sampling import NUCLEUS_HEAD, _pick, draw, nucleus

VOCAB = 131072


def sorted_nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    """The nucleus by its definition: the whole vocabulary sorted, tokens kept while the mass
    before each is below top_p (the first always)."""
    values, order = torch.sort(probs, descending=True)
    kept, before = set(), 0.0
    for value, token in zip(values.tolist(), order.tolist()):
        if kept and before >= top_p:
            break
        kept.add(token)
        before += value
    return kept


def test_draws_follow_the_distribution_and_never_pick_an_impossible_token():
    weights = torch.tensor([0.0, 1.0, 2.0, 0.0, 7.0, 0.0])  # unnormalised, zeros between
    generator = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.bincount(torch.tensor([draw(weights, generator) for _ in range(n)]),
                            minlength=len(weights))
    assert counts[0] == counts[3] == counts[5] == 0
    for token, p in ((1, 0.1), (2, 0.2), (4, 0.7)):
        # five standard deviations of a binomial count
        assert abs(int(counts[token]) - n * p) < 5 * math.sqrt(n * p * (1 - p)), counts


def test_a_draw_is_reproducible_by_its_generator():
    probs = torch.softmax(torch.randn(VOCAB, generator=torch.Generator().manual_seed(1)), -1)
    first = [draw(probs, torch.Generator().manual_seed(s)) for s in range(20)]
    again = [draw(probs, torch.Generator().manual_seed(s)) for s in range(20)]
    assert first == again and len(set(first)) > 10


@pytest.mark.parametrize("scale", [8.0, 1.0], ids=["peaked", "flat"])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_the_nucleus_is_the_one_a_full_sort_gives(scale, top_p):
    """Peaked logits keep the nucleus within the first NUCLEUS_HEAD tokens (a top-k of them);
    flat ones need the whole sort. Both are checked against the definition."""
    logits = scale * torch.randn(VOCAB, generator=torch.Generator().manual_seed(2))
    probs = torch.softmax(logits, -1)
    kept = nucleus(probs, top_p)
    expected = sorted_nucleus(probs, top_p)
    assert set(torch.nonzero(kept).flatten().tolist()) == expected
    assert torch.equal(kept[list(expected)], probs[list(expected)])  # unchanged, unnormalised
    # both ways are taken: the peaked nucleus lies within the head, the flat one past it
    assert (len(expected) <= NUCLEUS_HEAD) == (scale == 8.0)


def test_the_most_likely_token_is_kept_whatever_top_p():
    probs = torch.softmax(torch.randn(VOCAB, generator=torch.Generator().manual_seed(3)), -1)
    kept = nucleus(probs, 1e-9)
    assert torch.nonzero(kept).flatten().tolist() == [int(torch.argmax(probs))]


def test_a_nucleus_pick_stays_in_the_nucleus():
    logits = 4.0 * torch.randn(VOCAB, generator=torch.Generator().manual_seed(4))
    params = SamplingParams(max_tokens=1, temperature=0.8, top_p=0.7, seed=11)
    allowed = sorted_nucleus(torch.softmax(logits / 0.8, -1), 0.7)
    picks = {_pick(logits, params, position) for position in range(300)}
    assert picks <= allowed and len(picks) > 1


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_a_row_with_no_possible_token_fails_instead_of_drawing_one(top_p):
    """Every logit -inf (a grammar and banned ids that forbid everything) or a NaN from the
    model: the draw raises, as torch.multinomial did (the decode step fails and its requests
    resume elsewhere), rather than emitting a forbidden token."""
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=top_p, seed=1)
    for bad in (torch.full((VOCAB,), float("-inf")), torch.full((VOCAB,), float("nan"))):
        with pytest.raises(RuntimeError, match="no token can be drawn"):
            _pick(bad, params, 0)
