"""An in-process stack (`small4 generate`, the in-process test tiers) loads the tokenizer and
its llguidance view once per process: each costs ~1 s and ~70 MB (~40 MB the view), the
ingress, the multimodal worker and every engine need them, and the suite builds hundreds of
stacks in one process, which FastAPI's dependency cache keeps alive (a leak of ~400 MB a stack
before: the CI box ran out of memory)."""

from __future__ import annotations

from cluster.inprocess import build_inprocess
from cluster.settings import parse_settings
from tests.unit.test_http_surface import PROFILE


def test_stacks_share_one_tokenizer_and_one_grammar_view():
    first, second = (build_inprocess(parse_settings(PROFILE)).service for _ in range(2))
    tokenizers = {id(first.tokenizer)}
    for service in (first, second):
        tokenizers.add(id(service.multimodal.preprocessor.tokenizer))
        for decode in service.pools.values():
            tokenizers |= {id(decode.engine.tokenizer), id(decode.prefill.engine.tokenizer)}
    assert tokenizers == {id(first.tokenizer)}
    assert first.guidance is second.guidance
    assert first.guidance.tokenizer is first.tokenizer
