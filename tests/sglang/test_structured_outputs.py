"""Constrained decoding on SGLang, held to the real library on the CPU (grammars compile and masks
fill without a GPU): the plugin SGLang loads from our package gives a grammar manager that SGLang
left without a backend (a token-id engine) its own llguidance backend on mistral-common's token
table; the grammar objects that backend compiles from what a request sends (`ebnf`) allow exactly
the tokens the reference engine's masks allow, token by token, and a resumed leg's grammar starts
where the tokens before it left it. What a GPU still has to show: a live PD pair decoding under
these grammars (the `gpu` tier)."""

from __future__ import annotations

import json
import pkgutil
import random
import tomllib
from types import SimpleNamespace

import pytest
import torch

from services.engines.sglang_args import GRAMMAR_BACKEND, grammar_key
from services.grammar import Guidance, StructuredRequest, allowed
from services.tokenizer import load_tokenizer
from tests.sglang.conftest import ROOT
from tests.structured_cases import CLOCK, SCHEMA, WEATHER

EOS = 2
CASES = {
    "json_schema": StructuredRequest(response_format={
        "type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}),
    "required_tool": StructuredRequest(tools=[WEATHER, CLOCK], tool_choice="required"),
    "named_tool_reasoning": StructuredRequest(
        tools=[WEATHER, CLOCK], tool_choice={"type": "function", "function": {"name": "get_time"}},
        reasoning=True, reasoning_budget=6),
}


@pytest.fixture(scope="module")
def guidance(checkpoint) -> Guidance:
    return Guidance(load_tokenizer(checkpoint / "tekken.json"))


@pytest.fixture(scope="module")
def backend(checkpoint):
    from services.engines.sglang_grammar import backend_for

    return backend_for(checkpoint / "tekken.json")


def compiled(backend, key: str):
    """What SGLang's grammar manager does with a request's `ebnf`: a future, then the object."""
    value, cached = backend.get_cached_or_future_value(("ebnf", key), False)
    return value if cached else value.result(timeout=60)


def sglang_mask(grammar) -> torch.Tensor:
    mask = grammar.allocate_vocab_mask(131072, 1, "cpu")
    grammar.reset_vocab_mask(mask)
    grammar.fill_vocab_mask(mask, 0)
    return mask[0]


def test_the_plugin_is_declared_where_sglang_looks_for_plugins():
    from sglang.srt.plugins import GENERAL_PLUGINS_GROUP

    from services.engines.sglang_grammar import install

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    (target,) = declared[GENERAL_PLUGINS_GROUP].values()
    assert pkgutil.resolve_name(target) is install


def test_the_hook_applies_to_sglangs_grammar_manager():
    from sglang.srt.constrained.grammar_manager import GrammarManager
    from sglang.srt.plugins.hook_registry import HookRegistry

    from services.engines.sglang_grammar import MANAGER_INIT, give_backend, install

    install()
    assert any(hook is give_backend for _, hook, _ in HookRegistry._hooks[MANAGER_INIT])
    HookRegistry.apply_hooks()
    assert MANAGER_INIT in HookRegistry._patched
    assert GrammarManager.__init__.__wrapped__ is not None


def manager(server_args, backend=None):
    from sglang.srt.constrained.grammar_manager import GrammarManager

    made = GrammarManager.__new__(GrammarManager)  # what __init__ leaves under skip_tokenizer_init
    made.server_args, made.grammar_backend = server_args, backend
    return made


def test_a_token_id_engine_of_our_profile_gets_the_mistral_backend(checkpoint):
    """Our engines' resolved `ServerArgs` (skip_tokenizer_init, grammar_backend llguidance, a
    Tekken checkpoint) get the backend; others are left as SGLang made them."""
    from sglang.srt.constrained.llguidance_backend import GuidanceBackend

    from services.engines.sglang_grammar import give_backend
    from tests.sglang.conftest import gpu_profiles
    from tests.sglang.resolve import profile_args, resolve

    args, env, _ = profile_args(gpu_profiles()["cluster/h200x16"], "fast", "decode", checkpoint,
                                None)
    resolved = resolve(args, env)
    assert resolved.skip_tokenizer_init and resolved.grammar_backend == GRAMMAR_BACKEND
    ours = manager(resolved)
    give_backend(None, ours)
    assert isinstance(ours.grammar_backend, GuidanceBackend)
    assert ours.grammar_backend.llguidance_tokenizer.vocab_size == 131072

    theirs = object()
    kept = manager(resolved, theirs)
    give_backend(None, kept)
    assert kept.grammar_backend is theirs
    other = manager(SimpleNamespace(grammar_backend="xgrammar", model_path=resolved.model_path,
                                    tokenizer_path=resolved.tokenizer_path))
    give_backend(None, other)
    assert other.grammar_backend is None


@pytest.mark.parametrize("case", sorted(CASES))
def test_sglang_masks_equal_the_reference_engines_token_by_token(case, guidance, backend):
    """A random walk through the grammar (any allowed token, the end as soon as it is allowed):
    SGLang's grammar object and the reference engine's constraint allow the same ids at every
    step; a leg resumed part-way allows what the walk allowed there."""
    lark = guidance.grammar(CASES[case])
    ours, theirs = guidance.constraint(lark), compiled(backend, grammar_key(lark))
    rng, walked, resumed_at = random.Random(7), [], None
    for step in range(400):
        mask = sglang_mask(theirs)
        assert torch.equal(mask, ours.fill()), f"step {step}"
        ids = allowed(mask[None], 131072)[0].nonzero().flatten().tolist()
        token = EOS if EOS in ids else rng.choice(ids)
        if step == 5:
            resumed = compiled(backend, grammar_key(lark, tuple(walked)))
            assert torch.equal(sglang_mask(resumed), mask)
            resumed_at = step
        if token == EOS:
            break
        walked.append(token)
        ours.advance(token)
        theirs.accept_token(token)
    else:
        pytest.fail("the walk did not end")
    assert resumed_at is not None
    theirs.accept_token(EOS)
    assert theirs.ll_matcher.is_stopped() and not theirs.ll_matcher.is_error()
    text = guidance.tokenizer.decode(walked)
    if case == "json_schema":
        import jsonschema

        jsonschema.validate(json.loads(text), SCHEMA)
    else:
        assert "[TOOL_CALLS]" in text


def test_a_grammar_that_does_not_compile_is_sglangs_invalid_grammar(backend):
    """SGLang aborts such a request with the compiler's message (the ingress checks first)."""
    from sglang.srt.constrained.base_grammar_backend import InvalidGrammarObject

    assert isinstance(compiled(backend, "start: undefined_rule"), InvalidGrammarObject)


def test_the_grammar_cache_is_bounded_and_keeps_no_resumed_leg(backend, monkeypatch):
    """SGLang's own cache keeps every grammar it compiled for the process's life (distinct
    schemas are cheap to send); ours keeps the `CACHED_GRAMMARS` used last, and never a resumed
    leg's grammar, whose key names that request's tokens."""
    from services.engines import sglang_grammar

    monkeypatch.setattr(sglang_grammar, "CACHED_GRAMMARS", 2)
    keys = [("ebnf", f'start: "{word}"') for word in ("alpha", "beta", "gamma")]

    def use(key) -> bool:
        """What SGLang's grammar manager does: look up, compile on a miss, cache a copy."""
        value, hit = backend.get_cached_or_future_value(key, False)
        if not hit:
            backend.set_cache(key, value.result(timeout=60).copy())
        return hit

    backend.reset()
    try:
        assert [use(keys[0]), use(keys[1]), use(keys[0])] == [False, False, True]
        assert not use(keys[2])  # over the bound: the least recently used (beta) goes
        assert list(backend.cache) == [keys[0], keys[2]]
        assert not use(keys[1])
        resumed = ("ebnf", grammar_key('start: "alpha"', (5,)))
        backend.set_cache(resumed, compiled(backend, keys[0][1]))
        assert resumed not in backend.cache and len(backend.cache) == 2
    finally:
        backend.reset()


def test_a_retracted_request_resumed_on_a_decode_engine_takes_its_last_token_once(backend):
    """SGLang's PD decode engine gives a request's last token to its grammar where the
    grammar's `current_token` is None (`process_prebuilt`): a request it retracted (its KV was
    short) and resumes has taken that token already. SGLang's llguidance grammar never set it:
    the token was taken twice, the request aborted with a 500."""
    import inspect

    from sglang.srt.disaggregation.decode_schedule_batch_mixin import (
        ScheduleBatchDisaggregationDecodeMixin)

    guard = inspect.getsource(ScheduleBatchDisaggregationDecodeMixin.process_prebuilt)
    assert "current_token is None" in guard  # the rule this follows, as SGLang writes it

    def prebuilt(grammar, last: int) -> None:  # what `process_prebuilt` does with a grammar
        if grammar.current_token is None:
            grammar.accept_token(last)

    key = grammar_key('start: "{" "}"')
    template = compiled(backend, key)
    grammar = template.copy()
    assert grammar.current_token is None
    opening = int(torch.nonzero(allowed(sglang_mask(template.copy())[None], 131072)[0])[0])
    prebuilt(grammar, opening)  # arrived from the prefill engine
    prebuilt(grammar, opening)  # retracted, resumed: not taken again
    assert grammar.current_token == opening and not grammar.ll_matcher.is_error()
    fresh = template.copy()  # the template is left as it was: the next request takes its own
    assert fresh.current_token is None
    # a resumed leg's grammar (advanced over the tokens before it; compiled for it, so not a
    # copy) still takes the leg's first token from its prefill engine
    resumed = compiled(backend, grammar_key('start: "{" "}"', (opening,)))
    assert resumed.current_token is None

