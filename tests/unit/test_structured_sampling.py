"""Structured outputs and sampling controls in the CPU engines' sampler: mistral-common's grammar
enforced by llguidance masks, logit bias, presence/frequency penalties, logprobs.

The logits are random here (any logits must give a valid answer under a grammar) or the stand-in
model's (the reference engine's batched decode); schemas are bounded (maxLength, maxItems,
integer ranges, no additional properties) so an answer's length is bounded too."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
import torch

from services.engines.protocol import EngineRequest, SamplingParams
from services.engines.reference import ReferenceEngine
from services.engines.sampling import Sampler, sample_batch
from services.errors import InvalidRequest
from services.grammar import Guidance, StructuredRequest
from services.settings import EngineSettings
from tests.structured_cases import CLOCK, SCHEMA, TOOLS, WEATHER

JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}


@pytest.fixture(scope="module")
def guidance(tokenizer):
    return Guidance(tokenizer)


def generate(guidance, tokenizer, spec: StructuredRequest, seed: int, limit: int = 400):
    """Sample with random logits under the request's grammar until EOS; the text, decoded."""
    grammar = guidance.grammar(spec)
    params = SamplingParams(max_tokens=limit, grammar=grammar)
    sampler, out = Sampler(params, guidance), []
    generator = torch.Generator().manual_seed(seed)
    for position in range(limit):
        logits = torch.randn(1, tokenizer.vocab_size, generator=generator)
        (token, _), = sample_batch([sampler], logits, [position])
        if token == tokenizer.eos_id:
            return out
        out.append(token)
    raise AssertionError(f"no end of sequence in {limit} tokens: {tokenizer.decode(out)!r}")


def calls_of(tokenizer, ids):
    """`[TOOL_CALLS]name[ARGS]{...}` segments → [(name, arguments)]."""
    text = tokenizer.decode(ids)
    assert text.lstrip().startswith("[TOOL_CALLS]"), text
    calls = []
    for part in text.split("[TOOL_CALLS]")[1:]:
        name, args = part.split("[ARGS]")
        calls.append((name.strip(), json.loads(args)))
    return calls


@pytest.mark.parametrize("seed", range(8))
def test_json_schema_answers_always_validate(guidance, tokenizer, seed):
    text = tokenizer.decode(generate(guidance, tokenizer, StructuredRequest(
        response_format=JSON_SCHEMA), seed))
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_starts_an_object_and_can_only_end_as_one(guidance, tokenizer):
    """Random logits write unbounded strings, so no end is waited for: the answer opens an
    object, and the end of sequence is allowed only where the object is closed."""
    grammar = guidance.grammar(StructuredRequest(response_format={"type": "json_object"}))
    eos = tokenizer.eos_id
    for seed in range(4):
        sampler = Sampler(SamplingParams(max_tokens=60, grammar=grammar), guidance)
        generator, out = torch.Generator().manual_seed(seed), []
        for position in range(60):
            logits = torch.randn(1, tokenizer.vocab_size, generator=generator)
            mask = sampler.constraint.fill()
            ends = bool(mask[eos // 32] >> (eos % 32) & 1)
            text = tokenizer.decode(out)
            if ends:
                assert isinstance(json.loads(text), dict), text
            (token, _), = sample_batch([sampler], logits, [position])
            if token == eos:
                break
            out.append(token)
        assert tokenizer.decode(out).lstrip()[:1] == "{"


@pytest.mark.parametrize("seed", range(4))
def test_a_named_tool_choice_always_calls_that_tool_with_valid_arguments(guidance, tokenizer,
                                                                          seed):
    spec = StructuredRequest(tools=[WEATHER, CLOCK], tool_choice={
        "type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False)
    (name, args), = calls_of(tokenizer, generate(guidance, tokenizer, spec, seed))
    assert name == "get_time"
    jsonschema.validate(args, CLOCK["function"]["parameters"])


@pytest.mark.parametrize("seed", range(4))
def test_required_makes_one_valid_call_of_an_offered_tool(guidance, tokenizer, seed):
    """`required` with `parallel_tool_calls: false`: exactly one call, arguments valid against
    that tool's parameters even though the tools do not say `strict`."""
    spec = StructuredRequest(tools=[WEATHER, CLOCK], tool_choice="required",
                             parallel_tool_calls=False)
    (name, args), = calls_of(tokenizer, generate(guidance, tokenizer, spec, seed))
    tool = {"get_weather": WEATHER, "get_time": CLOCK}[name]
    jsonschema.validate(args, tool["function"]["parameters"])


@pytest.mark.parametrize("seed", range(4))
def test_with_reasoning_the_answer_thinks_first_then_follows_the_schema(guidance, tokenizer,
                                                                        seed):
    spec = StructuredRequest(response_format=JSON_SCHEMA, reasoning=True, reasoning_budget=12)
    ids = generate(guidance, tokenizer, spec, seed)
    think, end = tokenizer.special("[THINK]"), tokenizer.special("[/THINK]")
    assert ids[0] == think and end in ids
    assert 1 <= ids.index(end) - 1 <= 12  # the reasoning, within its budget
    jsonschema.validate(json.loads(tokenizer.decode(ids[ids.index(end) + 1:])), SCHEMA)


def test_without_reasoning_the_grammar_has_no_reasoning_section(guidance, tokenizer):
    think = tokenizer.special("[THINK]")
    for seed in range(6):
        assert think not in generate(guidance, tokenizer,
                                     StructuredRequest(response_format=JSON_SCHEMA), seed)


def test_plain_text_and_loose_tools_need_no_grammar(guidance):
    assert guidance.grammar(StructuredRequest()) is None
    assert guidance.grammar(StructuredRequest(tools=[WEATHER], tool_choice="auto")) is None
    assert guidance.grammar(StructuredRequest(tools=[WEATHER], tool_choice="none",
                                              parallel_tool_calls=False)) is None
    assert guidance.grammar(StructuredRequest(tools=[WEATHER], parallel_tool_calls=False))


@pytest.mark.parametrize("format_, field, words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}},
     "response_format.json_schema", ""),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
     "response_format.json_schema", "'nonsense' is not valid"),
])
def test_a_schema_the_compiler_cannot_take_is_refused_naming_the_field(guidance, format_, field,
                                                                       words):
    with pytest.raises(InvalidRequest) as caught:
        guidance.grammar(StructuredRequest(response_format=format_))
    assert caught.value.param == field
    assert words in caught.value.message and "validation error" not in caught.value.message


def _unbuildable_schema() -> dict:
    """~5 KB of nested `anyOf`s that llguidance's grammar check passes and whose matcher it
    cannot build (too many symbols): a stopped matcher, which allows only the end."""
    return {"allOf": [{"anyOf": [{"type": "object", "properties": {f"p{j}_{i}": {
        "type": "integer"}}, "required": [f"p{j}_{i}"]} for i in range(18)]} for j in range(3)]}


def test_a_schema_the_compiler_checks_but_cannot_build_is_refused_naming_the_field(
        guidance, tokenizer):
    import llguidance

    from services.grammar import _mistral_request

    spec = StructuredRequest(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": _unbuildable_schema()}})
    lark = guidance.factory.get_grammar_for_chat_request(_mistral_request(spec),
                                                         guidance._template(spec))
    # what the check alone let through (the premise: llguidance's check passes it)
    assert not llguidance.LLMatcher.validate_grammar(
        llguidance.LLMatcher.grammar_from_lark(lark), guidance.llg_tokenizer)
    with pytest.raises(InvalidRequest) as caught:
        guidance.grammar(spec)
    assert caught.value.param == "response_format.json_schema"
    assert "cannot take this schema" in caught.value.message
    # and an engine handed such a grammar refuses it rather than sample an empty answer
    with pytest.raises(InvalidRequest):
        Sampler(SamplingParams(max_tokens=8, grammar=lark), guidance)


def test_each_sequence_gets_its_own_matcher_of_a_grammar_built_once(guidance, tokenizer):
    """Matchers are built once per grammar and copied: one sequence's progress is not
    another's (a fresh sampler of the same grammar starts at the beginning)."""
    grammar = guidance.grammar(StructuredRequest(response_format=JSON_SCHEMA))
    params = SamplingParams(max_tokens=200, grammar=grammar, temperature=0.0)
    logits = torch.randn(40, tokenizer.vocab_size, generator=torch.Generator().manual_seed(5))
    first = Sampler(params, guidance)
    one = [sample_batch([first], logits[i:i + 1].clone(), [i])[0][0] for i in range(40)]
    second = Sampler(params, guidance)  # after the first has advanced
    two = [sample_batch([second], logits[i:i + 1].clone(), [i])[0][0] for i in range(40)]
    assert one == two
    assert guidance.constraint(grammar).matcher is not guidance.constraint(grammar).matcher


def test_a_grammars_matcher_is_built_once_per_process(tokenizer, monkeypatch):
    """Building a large schema's matcher takes a tenth of a second and more: it was built
    again for every sequence (every choice, every resumed leg)."""
    import llguidance

    fresh = Guidance(tokenizer)
    grammar = fresh.grammar(StructuredRequest(response_format=JSON_SCHEMA))
    builds, real = [], llguidance.LLMatcher

    class Counted:
        grammar_from_lark = staticmethod(real.grammar_from_lark)

        def __new__(cls, *args, **kwargs):
            builds.append(args)
            return real(*args, **kwargs)

    monkeypatch.setattr(llguidance, "LLMatcher", Counted)
    for _ in range(3):
        Sampler(SamplingParams(max_tokens=8, grammar=grammar), fresh)
    assert len(builds) <= 1


def test_a_requests_grammar_is_built_once_for_the_same_fields(tokenizer, monkeypatch):
    """An app sends one schema with every request: compiled once, answered (or refused, with
    the same field named) from then on; other fields get their own grammar."""
    fresh = Guidance(tokenizer)
    built = []
    compile_ = fresh._grammar
    monkeypatch.setattr(fresh, "_grammar", lambda spec: built.append(spec) or compile_(spec))
    spec = StructuredRequest(response_format=JSON_SCHEMA)
    assert fresh.grammar(spec) == fresh.grammar(StructuredRequest(response_format=JSON_SCHEMA))
    assert len(built) == 1
    other = StructuredRequest(response_format=JSON_SCHEMA, reasoning=True, reasoning_budget=9)
    assert fresh.grammar(other) != fresh.grammar(spec) and len(built) == 2
    bad = StructuredRequest(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}})
    for _ in range(2):
        with pytest.raises(InvalidRequest) as caught:
            fresh.grammar(bad)
        assert caught.value.param == "response_format.json_schema"
    assert len(built) == 3
    # a schema's property order is the order its answer keeps: the same properties in
    # another order are another grammar (one tenant's order must not become another's)
    def ordered(*names):
        return StructuredRequest(response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {
                n: {"type": "string", "maxLength": 3} for n in names},
                "required": sorted(names), "additionalProperties": False}}})
    assert fresh.grammar(ordered("answer", "reasoning")) != fresh.grammar(
        ordered("reasoning", "answer"))


def test_a_named_tool_that_is_not_offered_is_refused(guidance):
    with pytest.raises(InvalidRequest) as caught:
        guidance.grammar(StructuredRequest(tools=[WEATHER], tool_choice={
            "type": "function", "function": {"name": "nope"}}))
    assert caught.value.param == "tool_choice" and "nope" in caught.value.message


def test_a_resumed_sampler_continues_the_grammar_where_the_stream_stopped(guidance, tokenizer):
    """A stream resumed on another replica replays its tokens: the rest is the same as if it
    had never moved (same logits, same positions)."""
    grammar = guidance.grammar(StructuredRequest(response_format=JSON_SCHEMA))
    params = SamplingParams(max_tokens=200, grammar=grammar, temperature=0.0)
    logits = torch.randn(60, tokenizer.vocab_size, generator=torch.Generator().manual_seed(3))
    whole = Sampler(params, guidance)
    straight = [sample_batch([whole], logits[i:i + 1].clone(), [i])[0][0] for i in range(60)]
    cut = straight.index(tokenizer.eos_id) // 2
    resumed = Sampler(params, guidance, history=straight[:cut])
    rest = [sample_batch([resumed], logits[i:i + 1].clone(), [i])[0][0]
            for i in range(cut, straight.index(tokenizer.eos_id) + 1)]
    assert straight[:cut] + rest == straight[:straight.index(tokenizer.eos_id) + 1]


def test_logit_bias_forces_and_forbids(tokenizer):
    logits = torch.randn(tokenizer.vocab_size, generator=torch.Generator().manual_seed(0))
    top = int(torch.argmax(logits))
    forced = Sampler(SamplingParams(max_tokens=1, temperature=0.0, logit_bias=((77, 100.0),)))
    assert forced.pick(forced.adjust(logits), 0)[0] == 77
    banned = Sampler(SamplingParams(max_tokens=1, temperature=0.0, logit_bias=((top, -100.0),)))
    assert banned.pick(banned.adjust(logits), 0)[0] != top


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_banned_id_is_never_sampled_even_biased_up(tokenizer, temperature):
    logits = torch.randn(tokenizer.vocab_size, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_tokens=1, temperature=temperature, seed=3, logprobs=2,
                            logit_bias=((77, 100.0),), banned_ids=(77,))
    sampler = Sampler(params)
    token, record = sampler.pick(sampler.adjust(logits), 0)
    assert token != 77 and 77 not in dict(record.top)


@pytest.mark.parametrize("penalty", ["presence_penalty", "frequency_penalty"])
def test_penalties_stop_greedy_repetition(tokenizer, penalty):
    """Fixed logits make greedy repeat one token forever; a large penalty moves on each step."""
    logits = torch.randn(tokenizer.vocab_size, generator=torch.Generator().manual_seed(1))
    plain = Sampler(SamplingParams(max_tokens=8, temperature=0.0))
    assert len({plain.pick(plain.adjust(logits), i)[0] for i in range(8)}) == 1
    penalised = Sampler(SamplingParams(max_tokens=8, temperature=0.0, **{penalty: 2.0}))
    logits = logits / logits.std()  # a gap the penalty can close
    picks = [penalised.pick(penalised.adjust(logits), i)[0] for i in range(8)]
    assert len(set(picks)) == 8


def test_logprobs_are_the_distributions_top_in_order(tokenizer):
    logits = torch.randn(tokenizer.vocab_size, generator=torch.Generator().manual_seed(2))
    sampler = Sampler(SamplingParams(max_tokens=1, temperature=0.0, logprobs=5))
    token, record = sampler.pick(sampler.adjust(logits), 0)
    expected = torch.log_softmax(logits, dim=-1)
    assert record.token == token == int(torch.argmax(logits))
    assert record.logprob == pytest.approx(float(expected[token]), abs=1e-5)
    assert [t for t, _ in record.top] == torch.topk(expected, 5).indices.tolist()
    assert record.top[0] == (token, pytest.approx(record.logprob))
    assert [v for _, v in record.top] == sorted((v for _, v in record.top), reverse=True)


def test_the_reference_engine_constrains_one_row_of_a_mixed_batch(standin, tokenizer, guidance):
    """A constrained and an unconstrained request decode in one batch; the constrained one is
    valid JSON with its first token's logprob from prefill, the other untouched by the mask."""
    engine = ReferenceEngine(standin, EngineSettings(), role="both", context_length=4096,
                             eos_ids=(tokenizer.eos_id,), detokenize=tokenizer.decode,
                             guidance=guidance)
    prompt = tokenizer.encode_chat([{"role": "user", "content": "a thing"}], effort="none").ids
    grammar = guidance.grammar(StructuredRequest(response_format=JSON_SCHEMA))

    async def run(request):
        result = await engine.prefill(request)
        tokens, logprobs = [result.first_token], [result.first_logprob]
        async for chunk in engine.decode(request, result.first_token, result.kv):
            tokens += chunk.token_ids
            logprobs += chunk.logprobs or [None] * len(chunk.token_ids)
        return tokens, logprobs

    async def both():
        return await asyncio.gather(
            run(EngineRequest("json", prompt, SamplingParams(
                max_tokens=300, temperature=0.7, seed=5, grammar=grammar, logprobs=2))),
            run(EngineRequest("free", prompt, SamplingParams(max_tokens=40, temperature=0.0,
                                                             ignore_eos=True))))

    (constrained, logprobs), (free, _) = asyncio.run(both())
    assert constrained[-1] == tokenizer.eos_id
    jsonschema.validate(json.loads(tokenizer.decode(constrained[:-1])), SCHEMA)
    assert [r.token for r in logprobs] == constrained and all(len(r.top) == 2 for r in logprobs)
    unconstrained = ReferenceEngine(standin, EngineSettings(), role="both", context_length=4096,
                                    eos_ids=(tokenizer.eos_id,), detokenize=tokenizer.decode)

    async def alone():
        return await run(EngineRequest("free", prompt, SamplingParams(
            max_tokens=40, temperature=0.0, ignore_eos=True)))
    assert asyncio.run(alone())[0] == free


@pytest.mark.parametrize("seed", range(4))
def test_with_reasoning_a_forced_call_follows_the_reasoning_at_once(guidance, tokenizer, seed):
    spec = StructuredRequest(tools=[WEATHER, CLOCK], tool_choice="required",
                             parallel_tool_calls=False, reasoning=True, reasoning_budget=10)
    ids = generate(guidance, tokenizer, spec, seed)
    end = ids.index(tokenizer.special("[/THINK]"))
    assert ids[end + 1] == tokenizer.special("[TOOL_CALLS]")
    (name, args), = calls_of(tokenizer, ids[end + 1:])
    jsonschema.validate(args, TOOLS[name]["function"]["parameters"])


@pytest.mark.parametrize("temperature", [1e-40, 1e-7])
def test_a_temperature_too_small_to_divide_by_is_greedy(temperature):
    """Valid (the API takes [0, 2]) yet below float32's range once divided: greedy, as SGLang
    does, never a NaN distribution that fails the request."""
    from services.engines.sampling import sample_token

    logits = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(max_tokens=1, temperature=temperature)
    assert sample_token(logits, params, 0) == int(torch.argmax(logits))
