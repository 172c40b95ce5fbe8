"""Every engine honours the same contract (protocol docstring): run against each implementation.

SGLang runs prefill and decode as two paired engines, so it cannot be the one "both" engine
these tests build; its translation is `test_sglang_adapter.py`, its PD path `tests/gpu`.
"""

from __future__ import annotations

import asyncio

import pytest

from services.engines.protocol import Engine, EngineRequest, SamplingParams
from services.errors import ContextLengthExceeded, EngineUnavailable, InvalidRequest
from services.settings import EngineSettings, SimulatedTiming

CONTEXT = 2048


def reference(standin, tokenizer, **overrides):
    from services.engines.reference import ReferenceEngine

    return ReferenceEngine(standin, EngineSettings(**overrides), role="both",
                           context_length=CONTEXT, eos_ids=(tokenizer.eos_id,),
                           detokenize=tokenizer.decode)


def simulated(standin, tokenizer, **overrides):
    from services.engines.simulated import SimulatedEngine

    timing = SimulatedTiming(decode_step_ms=2.0, output="counter")
    return SimulatedEngine(EngineSettings(kind="simulated", simulated=timing, **overrides),
                           role="both", context_length=CONTEXT, tokenizer=tokenizer)


@pytest.fixture(params=[reference, simulated], ids=["reference", "simulated"])
def make(request, standin, tokenizer):
    return lambda **overrides: request.param(standin, tokenizer, **overrides)


def request_of(tokenizer, rid: str, max_tokens: int, words: int = 6) -> EngineRequest:
    ids = tokenizer.encode_chat([{"role": "user", "content": "tok " * words}], effort="none").ids
    return EngineRequest(rid, ids, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                  ignore_eos=True))


async def run(engine, request) -> tuple[list[int], list]:
    result = await engine.prefill(request)
    assert result.kv.num_tokens == len(request.prompt_ids) == result.prompt_tokens
    tokens, chunks = [result.first_token], []
    async for chunk in engine.decode(request, result.first_token, result.kv):
        tokens += chunk.token_ids
        chunks.append(chunk)
    return tokens, chunks


def test_is_an_engine(make):
    assert isinstance(make(), Engine)


def test_runs_to_max_tokens_with_length_finish(make, tokenizer):
    engine = make()
    tokens, chunks = asyncio.run(run(engine, request_of(tokenizer, "a", 9)))
    assert len(tokens) == 9
    assert chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.kv_tokens) == (0, 0, 0)


def test_max_tokens_one_finishes_at_the_first_token(make, tokenizer):
    tokens, chunks = asyncio.run(run(make(), request_of(tokenizer, "one", 1)))
    assert len(tokens) == 1 and [c.finish_reason for c in chunks] == ["length"]


def test_abort_mid_decode_frees_kv(make, tokenizer):
    engine = make()

    async def scenario():
        request = request_of(tokenizer, "victim", 400)
        result = await engine.prefill(request)
        stream = engine.decode(request, result.first_token, result.kv)
        await stream.__anext__()
        held = engine.stats()
        assert held.kv_tokens > len(request.prompt_ids) - 1 and held.running == 1
        assert await engine.abort("victim")
        assert engine.stats().kv_tokens == 0
        # the stream ends as SGLang's does: retryable, the engine let the request go
        with pytest.raises((EngineUnavailable, StopAsyncIteration)):
            while True:
                await stream.__anext__()
        await asyncio.sleep(0.05)
        return engine.stats()

    stats = asyncio.run(scenario())
    assert (stats.running, stats.waiting, stats.kv_tokens) == (0, 0, 0)


def test_closing_the_stream_early_frees_kv(make, tokenizer):
    engine = make()

    async def scenario():
        request = request_of(tokenizer, "early", 400)
        result = await engine.prefill(request)
        stream = engine.decode(request, result.first_token, result.kv)
        await stream.__anext__()
        await stream.aclose()
        await asyncio.sleep(0.05)
        return engine.stats()

    stats = asyncio.run(scenario())
    assert (stats.running, stats.kv_tokens) == (0, 0)


def test_requests_join_a_running_batch(make, tokenizer):
    engine = make()

    async def scenario():
        first = asyncio.create_task(run(engine, request_of(tokenizer, "first", 40)))
        await asyncio.sleep(0.02)
        late = [asyncio.create_task(run(engine, request_of(tokenizer, f"late{i}", 10, words=i + 2)))
                for i in range(4)]
        return await asyncio.gather(first, *late)

    results = asyncio.run(scenario())
    assert [len(tokens) for tokens, _ in results] == [40, 10, 10, 10, 10]


@pytest.mark.parametrize("prompt, params, error, param", [
    ([], SamplingParams(max_tokens=4), InvalidRequest, "messages"),
    ([1, 3, 1000, 4], SamplingParams(max_tokens=0), InvalidRequest, "max_tokens"),
    ([1] * CONTEXT, SamplingParams(max_tokens=4), ContextLengthExceeded, "messages"),
])
def test_bad_requests_raise_typed_errors_naming_the_field(make, prompt, params, error, param):
    with pytest.raises(error) as err:
        asyncio.run(make().prefill(EngineRequest("bad", prompt, params)))
    assert err.value.param == param
