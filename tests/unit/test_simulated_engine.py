"""The simulated engine: deterministic echo/counter output, its timing model, batching, abort."""

from __future__ import annotations

import asyncio
import json
import pickle
import time
from dataclasses import replace

import pytest

from services.engines.protocol import Engine, EngineRequest, SamplingParams
from services.engines.simulated import MLA_BYTES_PER_TOKEN, SimulatedEngine, SimulatedKV
from services.errors import EngineError, EngineUnavailable
from services.settings import EngineSettings, SimulatedTiming
from services.tokenizer import PromptTokenizer

CONTEXT = 8192
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def tokenizer() -> PromptTokenizer:
    return PromptTokenizer()


def make_engine(tokenizer, engine: dict | None = None, **timing) -> SimulatedEngine:
    settings = EngineSettings(kind="simulated", simulated=SimulatedTiming(**timing),
                              **(engine or {}))
    return SimulatedEngine(settings, role="both", context_length=CONTEXT, tokenizer=tokenizer)


def chat(tokenizer, rid: str, messages: list[dict], *, max_tokens: int = 256,
         effort: str = "none", tools: list[dict] | None = None, **sampling) -> EngineRequest:
    ids = tokenizer.encode_chat(messages, effort=effort, tools=tools).ids
    return EngineRequest(rid, ids, SamplingParams(max_tokens=max_tokens, **sampling))


def user(tokenizer, rid: str, text: str = "hello there", **kwargs) -> EngineRequest:
    return chat(tokenizer, rid, [{"role": "user", "content": text}], **kwargs)


async def run(engine, request) -> tuple[list[int], list]:
    result = await engine.prefill(request)
    tokens, chunks = [result.first_token], []
    async for chunk in engine.decode(request, result.first_token, result.kv):
        tokens += chunk.token_ids
        chunks.append(chunk)
    return tokens, chunks


def generate(engine, request) -> tuple[list[int], list]:
    return asyncio.run(run(engine, request))


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer._raw.encode(text, bos=False, eos=False)


def idle(engine) -> tuple[int, int, int]:
    stats = engine.stats()
    return stats.running, stats.waiting, stats.kv_tokens


# ---- the seam ----------------------------------------------------------------------------------
def test_is_an_engine_and_its_kv_pickles_with_the_production_size(tokenizer):
    engine = make_engine(tokenizer)
    assert isinstance(engine, Engine) and engine.kind == "simulated"
    result = asyncio.run(engine.prefill(user(tokenizer, "kv")))
    kv = pickle.loads(pickle.dumps(result.kv))
    assert kv == SimulatedKV(result.prompt_tokens) and kv.num_tokens == result.prompt_tokens
    assert kv.nbytes == result.prompt_tokens * MLA_BYTES_PER_TOKEN == kv.num_tokens * 23040


def test_decode_rejects_kv_of_another_prompt(tokenizer):
    engine = make_engine(tokenizer)
    request = user(tokenizer, "mismatch")
    with pytest.raises(EngineError):
        engine.decode(request, 1, SimulatedKV(len(request.prompt_ids) - 1))


# ---- output ------------------------------------------------------------------------------------
def test_echo_replies_with_the_last_user_turn_then_eos(tokenizer):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "an answer"},
                {"role": "user", "content": "second question, please"}]
    tokens, chunks = generate(make_engine(tokenizer), chat(tokenizer, "echo", messages))
    assert tokens[-1] == tokenizer.eos_id and chunks[-1].finish_reason == "stop"
    assert tokenizer.decode(tokens[:-1]) == "second question, please"


def test_echo_leaves_out_image_tokens(tokenizer):
    names = ("[INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[/INST]")
    inst, img, brk, end, close = (tokenizer.special(n) for n in names)
    prompt = [1, inst, img, img, brk, img, img, end] + text_ids(tokenizer, "a cat") + [close]
    request = EngineRequest("img", prompt, SamplingParams(max_tokens=32))
    tokens, _ = generate(make_engine(tokenizer), request)
    assert tokens == text_ids(tokenizer, "a cat") + [tokenizer.eos_id]


def test_a_turn_without_text_echoes_a_fixed_word(tokenizer):
    prompt = [1, tokenizer.special("[INST]"), tokenizer.special("[/INST]")]
    tokens, _ = generate(make_engine(tokenizer), EngineRequest("empty", prompt,
                                                               SamplingParams(max_tokens=8)))
    assert tokens == text_ids(tokenizer, "ok") + [tokenizer.eos_id]


def test_effort_high_wraps_the_echo_in_think_markers(tokenizer):
    tokens, _ = generate(make_engine(tokenizer), user(tokenizer, "deep", "why", effort="high"))
    echo = text_ids(tokenizer, "why")
    assert tokens == ([tokenizer.special("[THINK]")] + echo + [tokenizer.special("[/THINK]")]
                      + echo + [tokenizer.eos_id])
    assert tokenizer.decode(tokens) == "[THINK]why[/THINK]why</s>"


def test_tools_give_a_call_of_the_first_tool_with_json_args(tokenizer):
    other = {"type": "function", "function": {"name": "other_tool", "parameters": {}}}
    request = user(tokenizer, "tool", "weather in Paris?", tools=[WEATHER_TOOL, other])
    tokens, chunks = generate(make_engine(tokenizer), request)
    calls, args = tokenizer.special("[TOOL_CALLS]"), tokenizer.special("[ARGS]")
    assert tokens[0] == calls and tokens[-1] == tokenizer.eos_id
    split = tokens.index(args)
    assert tokenizer.decode(tokens[1:split]) == "get_weather"
    assert json.loads(tokenizer.decode(tokens[split + 1:-1])) == {"input": "weather in Paris?"}
    assert chunks[-1].finish_reason == "stop"


def test_tools_after_a_tool_result_echo_instead_of_calling_again(tokenizer):
    call = {"id": "abcdefghi", "type": "function",
            "function": {"name": "get_weather", "arguments": "{}"}}
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "abcdefghi", "content": "sunny"}]
    request = chat(tokenizer, "result", messages, tools=[WEATHER_TOOL])
    tokens, _ = generate(make_engine(tokenizer), request)
    assert tokenizer.special("[TOOL_CALLS]") not in tokens
    assert tokenizer.decode(tokens[:-1]) == "weather?"


def test_max_tokens_finishes_with_length_counting_the_first_token(tokenizer):
    request = user(tokenizer, "len", "one two three four five six seven", max_tokens=3)
    tokens, chunks = generate(make_engine(tokenizer), request)
    assert len(tokens) == 3 and chunks[-1].finish_reason == "length"
    tokens, chunks = generate(make_engine(tokenizer), user(tokenizer, "one", max_tokens=1))
    assert len(tokens) == 1 and [(c.token_ids, c.finish_reason) for c in chunks] == [([], "length")]


def test_stop_ids_and_stop_strings_end_the_echo(tokenizer):
    echo = text_ids(tokenizer, "alpha beta gamma delta")
    request = user(tokenizer, "ids", "alpha beta gamma delta", stop_token_ids=(echo[2],))
    tokens, chunks = generate(make_engine(tokenizer), request)
    assert tokens == echo[:3] and chunks[-1].finish_reason == "stop"
    request = user(tokenizer, "str", "alpha beta gamma delta", stop=("gamma",))
    tokens, chunks = generate(make_engine(tokenizer), request)
    assert tokenizer.decode(tokens).endswith("gamma") and chunks[-1].finish_reason == "stop"


def test_counter_never_stops_before_max_tokens(tokenizer):
    tokens, chunks = generate(make_engine(tokenizer, output="counter"),
                              user(tokenizer, "count", max_tokens=300))
    assert len(tokens) == 300 and tokenizer.eos_id not in tokens
    assert chunks[-1].finish_reason == "length"


# ---- timing and batching -----------------------------------------------------------------------
def test_prefill_takes_its_time_per_prompt_token(tokenizer):
    request = user(tokenizer, "long", "tok " * 200, max_tokens=4)
    assert len(request.prompt_ids) >= 200
    engine = make_engine(tokenizer, prefill_ms_per_token=1.0)
    started = time.perf_counter()
    result = asyncio.run(engine.prefill(request))
    assert time.perf_counter() - started >= len(request.prompt_ids) / 1000.0
    assert result.compute_s >= len(request.prompt_ids) / 1000.0


def test_prefills_run_one_at_a_time_and_queue_behind_each_other(tokenizer):
    engine = make_engine(tokenizer, prefill_base_ms=50.0)

    async def scenario():
        first = asyncio.ensure_future(engine.prefill(user(tokenizer, "p1")))
        second = asyncio.ensure_future(engine.prefill(user(tokenizer, "p2")))
        await asyncio.sleep(0.01)
        during = idle(engine)
        return during, await first, await second

    during, first, second = asyncio.run(scenario())
    assert during[:2] == (1, 1) and during[2] == first.prompt_tokens
    assert second.queue_s >= 0.04 and first.queue_s < 0.04


def test_decode_steps_take_their_time(tokenizer):
    engine = make_engine(tokenizer, decode_step_ms=5.0, output="counter")
    request = user(tokenizer, "steps", max_tokens=20)
    started = time.perf_counter()
    tokens, _ = generate(engine, request)
    assert len(tokens) == 20 and time.perf_counter() - started >= 19 * 0.005


def test_concurrent_requests_share_decode_steps(tokenizer):
    """Eight requests started together decode in shared steps: the batch holds all eight, and
    the steps number about one request's, not eight's (counted, not timed)."""
    engine = make_engine(tokenizer, decode_step_ms=10.0, output="counter")
    step, batches = engine._batcher.step, []

    async def counted(batch):
        batches.append(len(batch))
        return await step(batch)

    engine._batcher.step = counted

    async def scenario():
        return await asyncio.gather(*(run(engine, user(tokenizer, f"r{i}", max_tokens=20))
                                      for i in range(8)))

    results = asyncio.run(scenario())
    assert [len(tokens) for tokens, _ in results] == [20] * 8
    assert max(batches) == 8 and sum(batches) == 8 * 19  # the first token is prefill's
    assert len(batches) < 2 * 19, batches


def test_a_slow_consumer_gets_every_token_since_its_last_chunk(tokenizer):
    engine = make_engine(tokenizer, decode_step_ms=1.0, output="counter")

    async def scenario():
        request = user(tokenizer, "slow", max_tokens=60)
        result = await engine.prefill(request)
        sizes = []
        async for chunk in engine.decode(request, result.first_token, result.kv):
            sizes.append(len(chunk.token_ids))
            await asyncio.sleep(0.03)
        return sizes

    sizes = asyncio.run(scenario())
    assert sum(sizes) == 59 and max(sizes) > 1


def test_zero_timings_yield_to_the_event_loop_every_step(tokenizer):
    engine = make_engine(tokenizer, output="counter")

    async def scenario():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.ensure_future(ticker())
        tokens, _ = await run(engine, user(tokenizer, "zero", max_tokens=2000))
        task.cancel()
        return tokens, ticks

    started = time.perf_counter()
    tokens, ticks = asyncio.run(scenario())
    assert len(tokens) == 2000 and ticks >= 1000
    assert time.perf_counter() - started < 5.0  # a generous bound: an un-yielding loop hangs


# ---- abort and admission -----------------------------------------------------------------------
def test_abort_mid_decode_frees_everything(tokenizer):
    engine = make_engine(tokenizer, decode_step_ms=1.0, output="counter")

    async def scenario():
        request = user(tokenizer, "victim", max_tokens=400)
        result = await engine.prefill(request)
        stream = engine.decode(request, result.first_token, result.kv)
        await stream.__anext__()
        held = idle(engine)
        assert await engine.abort("victim")
        freed = idle(engine)
        with pytest.raises(EngineUnavailable, match="aborted"):
            await stream.__anext__()
        return held, freed

    held, freed = asyncio.run(scenario())
    prompt = len(user(tokenizer, "victim").prompt_ids)
    assert held[:2] == (1, 0) and held[2] > prompt
    assert freed == (0, 0, 0) and idle(engine) == (0, 0, 0)


def test_closing_the_stream_early_aborts(tokenizer):
    engine = make_engine(tokenizer, decode_step_ms=1.0, output="counter")

    async def scenario():
        request = user(tokenizer, "early", max_tokens=400)
        result = await engine.prefill(request)
        stream = engine.decode(request, result.first_token, result.kv)
        await stream.__anext__()
        await stream.aclose()
        return idle(engine)

    assert asyncio.run(scenario()) == (0, 0, 0)
    assert not asyncio.run(engine.abort("early"))


def test_abort_frees_a_running_and_a_queued_prefill(tokenizer):
    engine = make_engine(tokenizer, prefill_base_ms=5000.0)

    async def scenario():
        running = asyncio.ensure_future(engine.prefill(user(tokenizer, "running")))
        queued = asyncio.ensure_future(engine.prefill(user(tokenizer, "queued")))
        await asyncio.sleep(0.01)
        before = idle(engine)
        assert await engine.abort("queued") and await engine.abort("running")
        after = idle(engine)
        outcomes = await asyncio.gather(running, queued, return_exceptions=True)
        return before, after, outcomes

    started = time.perf_counter()
    before, after, outcomes = asyncio.run(scenario())
    assert before[:2] == (1, 1) and after == (0, 0, 0)
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
    assert time.perf_counter() - started < 2.0


def test_a_third_request_waits_for_a_running_slot(tokenizer):
    engine = make_engine(tokenizer, {"max_running_requests": 2}, decode_step_ms=5.0,
                         output="counter")

    async def scenario():
        short = asyncio.ensure_future(run(engine, user(tokenizer, "short", max_tokens=8)))
        longer = [asyncio.ensure_future(run(engine, user(tokenizer, f"long{i}", max_tokens=60)))
                  for i in range(2)]
        await asyncio.sleep(0.01)
        crowded = idle(engine)
        await short
        await asyncio.sleep(0.02)
        admitted = idle(engine)
        await asyncio.gather(*longer)
        return crowded, admitted

    crowded, admitted = asyncio.run(scenario())
    assert crowded[:2] == (2, 1)
    assert admitted[:2] == (2, 0)
    assert idle(engine) == (0, 0, 0)


def test_kv_capacity_holds_back_a_request_that_would_not_fit(tokenizer):
    first, second = user(tokenizer, "a", max_tokens=40), user(tokenizer, "b", max_tokens=40)
    capacity = len(first.prompt_ids) + 40 + len(second.prompt_ids) + 39
    engine = make_engine(tokenizer, {"kv_capacity_tokens": capacity}, decode_step_ms=2.0,
                         output="counter")

    async def scenario():
        tasks = [asyncio.ensure_future(run(engine, r)) for r in (first, second)]
        await asyncio.sleep(0.02)
        crowded = engine.stats()
        await asyncio.gather(*tasks)
        return crowded

    crowded = asyncio.run(scenario())
    assert (crowded.running, crowded.waiting, crowded.kv_capacity) == (1, 1, capacity)
    assert crowded.kv_tokens > len(first.prompt_ids) + len(second.prompt_ids)


def test_prefix_hits_are_the_reference_engines_blocks_and_only_the_rest_is_prefilled(tokenizer):
    engine = make_engine(tokenizer, {"prefix_cache": {"block_tokens": 16}})
    words = " ".join(f"w{i}" for i in range(80))
    first = chat(tokenizer, "a", [{"role": "user", "content": words}])
    longer = chat(tokenizer, "b", [{"role": "user", "content": words},
                                   {"role": "assistant", "content": "fine"},
                                   {"role": "user", "content": "and then?"}])

    async def cached(request, salt=""):
        request.cache_salt = salt
        return (await engine.prefill(request)).cached_tokens

    assert asyncio.run(cached(first)) == 0
    shared = next((k for k, (x, y) in enumerate(zip(first.prompt_ids, longer.prompt_ids))
                   if x != y), len(first.prompt_ids))  # the next turn extends the first
    assert asyncio.run(cached(longer)) == shared // 16 * 16 > 0
    assert asyncio.run(cached(first, salt="another tenant")) == 0
    stats = engine.stats()
    assert stats.cache_hit_tokens == shared // 16 * 16 and stats.cache_tokens > 0


def test_a_next_turn_that_outgrows_the_cache_keeps_the_head_it_extends(tokenizer):
    """The next turn's prefill hits the first turn's blocks and stores its own tail; where the
    tail does not fit, room is made from the tail, never from the head it extends (evicted,
    the head would strand every block after it: held, and never hit again)."""
    engine = make_engine(tokenizer, {"prefix_cache": {"block_tokens": 16,
                                                      "capacity_tokens": 256}})
    words = " ".join(f"w{i}" for i in range(60))
    first = chat(tokenizer, "a", [{"role": "user", "content": words}])
    longer = chat(tokenizer, "b", [{"role": "user", "content": words},
                                   {"role": "assistant", "content": words},
                                   {"role": "user", "content": "and then?"}])
    assert len(first.prompt_ids) < 256 < len(longer.prompt_ids)

    async def cached(request):
        return (await engine.prefill(request)).cached_tokens

    asyncio.run(cached(first))
    shared = next((k for k, (x, y) in enumerate(zip(first.prompt_ids, longer.prompt_ids))
                   if x != y), len(first.prompt_ids))  # the next turn extends the first
    assert asyncio.run(cached(longer)) == shared // 16 * 16 > 0
    again = replace(longer, request_id="c")
    assert asyncio.run(cached(again)) == 256  # everything it could keep of the longer prompt


def test_a_decoding_sequences_kv_is_counted_as_the_reference_engine_counts_it():
    """The first token is sampled by prefill and has no KV until the step that reads it: the
    simulated engine counted one token more per running sequence than the reference engine
    (and SGLang), so its KV use, which the autoscaler reads, ran high."""
    from services.engines.simulated import _Sequence
    from services.engines.stops import StopChecker

    tokenizer = PromptTokenizer()
    request = EngineRequest("k", [5] * 18, SamplingParams(max_tokens=5))
    seq = _Sequence(request, StopChecker(request.sampling, (tokenizer.eos_id,), tokenizer.decode),
                    plan=[7])
    assert seq.produced == 1 and seq.kv_tokens == 18  # the prompt's; the first token has none
    seq.produced += 1  # one step read the first token, sampled the second
    assert seq.kv_tokens == 19
