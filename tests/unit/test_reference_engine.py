"""The reference engine reproduces transformers' `generate` through prefill → handoff → decode."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from services.engines.batching import ContinuousBatcher, Sequence
from services.engines.protocol import EngineRequest, SamplingParams
from services.engines.reference import ReferenceEngine
from services.engines.stops import StopChecker
from services.errors import EngineError, EngineUnavailable, InvalidRequest
from services.kv.backends import LocalHandoff
from services.kv.transfer import KVState, KVTransfer
from services.settings import EngineSettings

GREEDY = dict(temperature=0.0, ignore_eos=True)


def make_engine(standin, tokenizer, role, **overrides):
    return ReferenceEngine(standin, EngineSettings(**overrides), role=role,
                           context_length=4096, eos_ids=(tokenizer.eos_id,),
                           detokenize=tokenizer.decode)


async def disaggregated(prefill, decode, request):
    """Prefill on one engine, hand the KV over, decode on another: the real two-engine path."""
    transfer = KVTransfer(LocalHandoff(), request.request_id)
    transfer.move(KVState.TRANSFERRING)
    result = await prefill.prefill(request)
    transfer.ready(await transfer.handoff.send(transfer.ticket, result.kv))
    kv = await transfer.consume()
    tokens = [result.first_token]
    async for chunk in decode.decode(request, result.first_token, kv):
        tokens += chunk.token_ids
    return tokens


def record_request_ids(monkeypatch, target, method: str) -> list[str]:
    """The request ids `target.<method>(request, ...)` is called with from now on (each call
    goes through to the method)."""
    seen, original = [], getattr(target, method)

    async def spy(request, *args):
        seen.append(request.request_id)
        return await original(request, *args)

    monkeypatch.setattr(target, method, spy)
    return seen


def reference_ids(standin, prompt, n, **extra):
    out = standin.model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, **extra)
    return out[0, len(prompt):].tolist()


def prompt_of(tokenizer, words: int, salt: str = "") -> list[int]:
    text = " ".join(f"{salt}w{i}" for i in range(words))
    return tokenizer.encode_chat([{"role": "user", "content": text}], effort="none").ids


def test_short_prompt_matches_generate(standin, tokenizer):
    prompt = prompt_of(tokenizer, 3)
    request = EngineRequest("a", prompt, SamplingParams(max_tokens=12, **GREEDY))
    engines = make_engine(standin, tokenizer, "prefill"), make_engine(standin, tokenizer, "decode")
    assert asyncio.run(disaggregated(*engines, request)) == reference_ids(standin, prompt, 12)


def test_prompt_longer_than_the_prefill_chunk_matches_generate(standin, tokenizer):
    prompt = prompt_of(tokenizer, 60)
    prefill = make_engine(standin, tokenizer, "prefill", prefill_chunk_tokens=16)
    assert len(prompt) > 3 * 16
    request = EngineRequest("long", prompt, SamplingParams(max_tokens=10, **GREEDY))
    got = asyncio.run(disaggregated(prefill, make_engine(standin, tokenizer, "decode"), request))
    assert got == reference_ids(standin, prompt, 10)


def test_eight_concurrent_requests_batched_in_decode_match_generate(standin, tokenizer):
    prompts = [prompt_of(tokenizer, n, salt=str(n)) for n in (1, 4, 9, 15, 22, 30, 2, 40)]
    prefill, decode = make_engine(standin, tokenizer, "prefill"), make_engine(standin, tokenizer, "decode")
    steps_seen = []

    async def run_all():
        async def watch():
            while True:
                steps_seen.append(decode.stats().running)
                await asyncio.sleep(0.005)
        watcher = asyncio.create_task(watch())
        requests = [EngineRequest(f"r{i}", p, SamplingParams(max_tokens=8 + i, **GREEDY))
                    for i, p in enumerate(prompts)]
        outs = await asyncio.gather(*(disaggregated(prefill, decode, r) for r in requests))
        watcher.cancel()
        return outs

    outs = asyncio.run(run_all())
    for i, (prompt, got) in enumerate(zip(prompts, outs)):
        assert got == reference_ids(standin, prompt, 8 + i), f"request {i} diverged"
    assert max(steps_seen) >= 4, "decode never batched several requests together"


def test_length_groups_bound_each_passes_padding_and_keep_every_row_once():
    from services.engines.reference import length_groups

    lengths = [16000, 10, 9000, 30, 600, 400, 8100, 20]
    groups = length_groups(lengths, ratio=2.0, floor=512)
    assert sorted(row for group in groups for row in group) == list(range(len(lengths)))
    for group in groups:
        longest = max(lengths[row] for row in group)
        assert longest <= 512 or all(2.0 * lengths[row] >= longest for row in group), group
    assert [0, 2, 6] in groups  # the long rows share a pass; the short ones never join it
    assert length_groups([100, 3, 500], ratio=2.0, floor=512) == [[2, 0, 1]]


def test_a_long_sequence_decodes_in_its_own_pass_and_every_row_still_matches_generate(
        standin, tokenizer, monkeypatch):
    """One long sequence in a batch of short ones: the short rows are not padded to its length
    (a pass of their own), and each row's greedy output is still `generate`'s."""
    from services.engines import reference

    monkeypatch.setattr(reference, "PAD_FLOOR_TOKENS", 16)
    prompts = [prompt_of(tokenizer, n, salt=str(n)) for n in (60, 1, 2, 3)]
    prefill = make_engine(standin, tokenizer, "prefill")
    decode = make_engine(standin, tokenizer, "decode")
    passes = []
    original = decode._forward_batch

    def forward(batch):
        passes.append(sorted(s.kv_tokens for s in batch))
        return original(batch)

    monkeypatch.setattr(decode, "_forward_batch", forward)

    async def run_all():
        requests = [EngineRequest(f"g{i}", p, SamplingParams(max_tokens=10, **GREEDY))
                    for i, p in enumerate(prompts)]
        return await asyncio.gather(*(disaggregated(prefill, decode, r) for r in requests))

    outs = asyncio.run(run_all())
    for i, (prompt, got) in enumerate(zip(prompts, outs)):
        assert got == reference_ids(standin, prompt, 10), f"request {i} diverged"
    long_rows = [p for p in passes if max(p) >= len(prompts[0])]
    assert long_rows and all(len(p) == 1 for p in long_rows), passes
    assert any(len(p) > 1 for p in passes), "the short rows never shared a pass"


def test_image_prompt_prefill_matches_generate(standin, tokenizer):
    import base64
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    encoded = tokenizer.encode_chat([{"role": "user", "content": [
        {"type": "text", "text": "Describe"}, {"type": "image_url", "image_url": {"url": url}}]}],
        effort="none")
    request = EngineRequest("img", encoded.ids, SamplingParams(max_tokens=6, **GREEDY),
                            images=encoded.images)
    got = asyncio.run(disaggregated(make_engine(standin, tokenizer, "prefill"),
                                    make_engine(standin, tokenizer, "decode"), request))
    pixels = torch.from_numpy(encoded.images[0])[None]
    expected = reference_ids(standin, encoded.ids, 6, pixel_values=pixels,
                             image_sizes=torch.tensor([list(pixels.shape[-2:])]))
    assert got == expected


def test_seeded_sampling_is_reproducible_across_engines(standin, tokenizer):
    prompt = prompt_of(tokenizer, 5)
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)

    def once():
        engines = make_engine(standin, tokenizer, "prefill"), make_engine(standin, tokenizer, "decode")
        return asyncio.run(disaggregated(*engines, EngineRequest("s", prompt, params)))

    first, second = once(), once()
    assert first == second
    other = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=8, ignore_eos=True)
    engines = make_engine(standin, tokenizer, "prefill"), make_engine(standin, tokenizer, "decode")
    assert asyncio.run(disaggregated(*engines, EngineRequest("s", prompt, other))) != first


def test_a_failed_decode_step_fails_its_batch_and_health_recovers_with_the_next():
    class Seq(Sequence):
        kv_tokens = 1

    calls = []

    async def step(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("transient")
        return [(7, None)] * len(batch)

    async def run():
        batcher = ContinuousBatcher(EngineSettings(), step)

        async def one(rid):
            params = SamplingParams(max_tokens=3)
            seq = Seq(EngineRequest(rid, [1, 2], params), StopChecker(params, (), str))
            return [c async for c in batcher.stream(seq, 5)]

        with pytest.raises(EngineUnavailable, match="transient"):  # resumed, not a 500
            await one("a")
        failed = batcher.failure
        chunks = await one("b")
        return failed, batcher.failure, sum(len(c.token_ids) for c in chunks)

    failed, after, tokens = asyncio.run(run())
    assert "transient" in failed and after == "" and tokens == 2


def test_a_hung_decode_step_reads_as_unhealthy():
    """A CPU engine's health was only whether its last step failed: a step that never returned
    kept the engine healthy, every stream on it waiting out its deadline."""
    from services.engines import batching
    from services.engines.batching import engine_stats

    class Seq(Sequence):
        kv_tokens = 1

    async def run():
        stuck = asyncio.Event()

        async def step(batch):
            await stuck.wait()  # never set: hung
            return [(7, None)] * len(batch)

        batcher = ContinuousBatcher(EngineSettings(), step)
        params = SamplingParams(max_tokens=3)
        seq = Seq(EngineRequest("h", [1, 2], params), StopChecker(params, (), str))
        stream = batcher.stream(seq, 5)
        reading = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.05)  # the step has started
        gate = type("Gate", (), {"running": {}, "waiting": 0})()
        fresh = engine_stats("reference", "decode", batcher, gate, 100)
        batcher.stepping -= batching.STEP_STALL_S + 1  # as if it began that long ago
        hung = engine_stats("reference", "decode", batcher, gate, 100)
        reading.cancel()
        stuck.set()  # (let the loop end)
        await asyncio.gather(reading, return_exceptions=True)
        await stream.aclose()
        return fresh, hung

    fresh, hung = asyncio.run(run())
    assert fresh.healthy and not hung.healthy and hung.running == 1
    assert "decode step has run for" in hung.detail


def test_tokens_sampled_before_an_abort_reach_the_reader_before_the_error():
    """A reader slower than the steps finds tokens and then the abort queued: it gets the
    tokens, then the error (they were dropped, to be sampled again on the resumed leg)."""
    class Seq(Sequence):
        kv_tokens = 1

    steps = []

    async def step(batch):
        steps.append(len(batch))
        await asyncio.sleep(0)  # a step takes time: the loop runs between them
        return [(7, None)] * len(batch)

    async def run():
        batcher = ContinuousBatcher(EngineSettings(), step)
        params = SamplingParams(max_tokens=10_000, ignore_eos=True)
        seq = Seq(EngineRequest("slow", [1, 2], params), StopChecker(params, (), str))
        stream = batcher.stream(seq, 5)
        got = [await anext(stream)]
        while len(steps) < 4:  # the steps run on while the reader waits
            await asyncio.sleep(0)
        batcher.drop("slow")  # the 4th step is running: its token is not sent
        with pytest.raises(EngineUnavailable):
            async for chunk in stream:
                got.append(chunk)
        return sum(len(c.token_ids) for c in got)

    assert asyncio.run(run()) == 3


def test_a_stop_check_that_fails_ends_its_sequence_only():
    """One sequence's stop check raising (an id its tokenizer cannot decode) used to end the
    batch loop: every other stream of the replica waited to its deadline."""
    class Seq(Sequence):
        kv_tokens = 1

    def detokenize(ids):
        if 666 in ids:
            raise KeyError("Invalid token for decoding")
        return "x" * len(ids)

    async def step(batch):
        return [(666 if seq.request.request_id == "bad" else 7, None) for seq in batch]

    async def run():
        batcher = ContinuousBatcher(EngineSettings(), step)

        async def one(rid):
            params = SamplingParams(max_tokens=4, stop=("never",))
            seq = Seq(EngineRequest(rid, [1, 2], params), StopChecker(params, (), detokenize))
            return [c async for c in batcher.stream(seq, 5)]

        return await asyncio.wait_for(asyncio.gather(one("bad"), one("good"),
                                                     return_exceptions=True), 10)

    bad, good = asyncio.run(run())
    assert isinstance(bad, EngineError) and "stop check" in str(bad)
    assert sum(len(c.token_ids) for c in good) == 3 and good[-1].finish_reason == "length"


def test_ids_past_the_tokenizers_vocabulary_are_never_sampled(standin, tokenizer):
    """A checkpoint whose vocabulary is padded past the tokenizer's: its extra ids have logits
    but no text; neither sampled nor accepted in logit_bias."""
    prompt = prompt_of(tokenizer, 3)
    vocab = max(prompt) + 1
    engines = [ReferenceEngine(standin, EngineSettings(), role=role, context_length=4096,
                               eos_ids=(tokenizer.eos_id,), detokenize=tokenizer.decode,
                               vocab_size=vocab) for role in ("prefill", "decode")]
    assert max(reference_ids(standin, prompt, 12)) >= vocab  # the model does pick such ids
    request = EngineRequest("v", prompt, SamplingParams(max_tokens=12, **GREEDY))
    tokens = asyncio.run(disaggregated(*engines, request))
    assert len(tokens) == 12 and max(tokens) < vocab
    biased = EngineRequest("b", prompt, SamplingParams(max_tokens=2, logit_bias=((vocab, 5),)))
    with pytest.raises(InvalidRequest):
        asyncio.run(engines[0].prefill(biased))


def test_an_abort_reaches_a_prefill_still_waiting_for_its_turn(standin, tokenizer,
                                                                monkeypatch):
    """A prefill queued behind another (one runs at a time) is aborted where it waits: it
    never runs (the prefill client's abort after a late attempt is sent exactly then)."""
    engine = make_engine(standin, tokenizer, "prefill", prefill_chunk_tokens=8)
    ran = record_request_ids(monkeypatch, engine, "_run_prefill")

    async def scenario():
        first = asyncio.ensure_future(engine.prefill(EngineRequest(
            "first", prompt_of(tokenizer, 200), SamplingParams(max_tokens=2, **GREEDY))))
        queued = asyncio.ensure_future(engine.prefill(EngineRequest(
            "queued", prompt_of(tokenizer, 3), SamplingParams(max_tokens=2, **GREEDY))))
        await asyncio.sleep(0.05)
        assert engine._gate.queued == {"queued": 1}
        aborted = await engine.abort("queued")
        outcomes = await asyncio.gather(first, queued, return_exceptions=True)
        return aborted, outcomes

    aborted, (first, queued) = asyncio.run(scenario())
    assert aborted and isinstance(queued, asyncio.CancelledError)
    assert first.first_token is not None and ran == ["first"]
    assert engine._aborted == set() and engine._gate.queued == {}


def test_a_bfloat16_model_hands_its_kv_over_and_decodes(tokenizer):
    """numpy has no bfloat16: its KV travels as its bits and is viewed back (the export raised,
    so every prefill of a bfloat16 reference engine failed)."""
    from services.model.loader import load_model
    from services.settings import ModelSettings

    bundle = load_model(ModelSettings(dtype="bfloat16"))
    prefill, decode = (make_engine(bundle, tokenizer, role) for role in ("prefill", "decode"))
    request = EngineRequest("b", prompt_of(tokenizer, 6), SamplingParams(max_tokens=5, **GREEDY))
    tokens = asyncio.run(disaggregated(prefill, decode, request))
    assert len(tokens) == 5 and decode.kv_layout()[-1] == "bfloat16"


def test_kv_of_another_layout_is_refused_alone_not_failing_the_batch(standin, tokenizer):
    """A KV of the right length but another model's shape (a prefill replica of another
    config in a rollout) failed the next decode step of every stream in the batch."""
    import numpy as np

    from services.kv.blob import KVBlob

    engine = make_engine(standin, tokenizer, "both")

    async def scenario():
        good = EngineRequest("good", prompt_of(tokenizer, 5), SamplingParams(max_tokens=30,
                                                                            **GREEDY))
        bad = EngineRequest("bad", prompt_of(tokenizer, 7), SamplingParams(max_tokens=30,
                                                                          **GREEDY))
        first, other = await engine.prefill(good), await engine.prefill(bad)
        wide = KVBlob([(np.zeros(k.shape[:-1] + (2 * k.shape[-1],), k.dtype), v)
                       for k, v in other.kv.layers])
        stream = engine.decode(good, first.first_token, first.kv)
        got = [await anext(stream)]
        with pytest.raises(EngineError, match="layout"):
            engine.decode(bad, other.first_token, wide)
        async for chunk in stream:
            got.append(chunk)
        return sum(len(c.token_ids) for c in got)

    assert asyncio.run(scenario()) == 29


def test_an_abort_during_the_last_prefill_chunk_keeps_nothing(standin, tokenizer, monkeypatch):
    """Acknowledged (True) and then ignored: the one chunk ran on, sampled, exported its KV and
    filled the prefix cache. It raises where the chunks end now."""
    # one 512-token chunk; the cache on whatever the default, so its check below can fail
    engine = make_engine(standin, tokenizer, "prefill", prefix_cache={"enabled": True})
    started = slowed(monkeypatch, engine, "_forward_chunk")

    async def scenario():
        request = EngineRequest("only", prompt_of(tokenizer, 60), SamplingParams(
            max_tokens=2, **GREEDY))
        assert len(request.prompt_ids) < 512  # one chunk
        running = asyncio.ensure_future(engine.prefill(request))
        assert await asyncio.to_thread(started.wait, 30)
        return await engine.abort("only"), await asyncio.gather(running,
                                                                return_exceptions=True)

    aborted, (outcome,) = asyncio.run(scenario())
    assert aborted and isinstance(outcome, asyncio.CancelledError)
    assert engine.prefix_cache.stats.held_tokens == 0


def slowed(monkeypatch, engine, method: str) -> threading.Event:
    """`engine.<method>` (a step on its thread) made 0.3 s slower; set once the step begins."""
    original, started = getattr(engine, method), threading.Event()

    def slow(*args):
        started.set()
        time.sleep(0.3)
        return original(*args)

    monkeypatch.setattr(engine, method, slow)
    return started


def test_an_abort_while_the_first_token_is_sampled_keeps_no_kv(standin, tokenizer,
                                                                 monkeypatch):
    """The chunks done, the prompt's blocks kept and the first token being sampled (a grammar
    built there), an abort was acknowledged and then forgotten: the KV came back all the
    same. It raises once the sampling ends now; its reservation is gone meanwhile."""
    engine = make_engine(standin, tokenizer, "prefill")
    started = slowed(monkeypatch, engine, "_sample_first")

    async def scenario():
        request = EngineRequest("late", prompt_of(tokenizer, 20), SamplingParams(
            max_tokens=2, **GREEDY))
        running = asyncio.ensure_future(engine.prefill(request))
        assert await asyncio.to_thread(started.wait, 30)
        held = engine.stats().kv_tokens
        return held, await engine.abort("late"), await asyncio.gather(
            running, return_exceptions=True)

    held, aborted, (outcome,) = asyncio.run(scenario())
    assert held > 0  # its KV was counted while it ran
    assert aborted and isinstance(outcome, asyncio.CancelledError)
    assert engine._aborted == set() and engine.stats().kv_tokens == 0


def test_a_prefill_counts_the_kv_it_loaded_from_the_cache_from_the_start(standin, tokenizer,
                                                                          monkeypatch):
    """A prefill whose prompt the cache mostly held reported no KV until its first computed
    chunk ended (the simulated engine counts the whole prompt from the start)."""
    engine = make_engine(standin, tokenizer, "prefill", prefill_chunk_tokens=16,
                         prefix_cache={"enabled": True})
    prompt = prompt_of(tokenizer, 80)
    asyncio.run(engine.prefill(EngineRequest("warm", prompt, SamplingParams(
        max_tokens=2, **GREEDY))))
    forward, seen = engine._forward_chunk, []

    def watch(*args):
        seen.append(engine.stats().kv_tokens)
        return forward(*args)

    monkeypatch.setattr(engine, "_forward_chunk", watch)
    hit = asyncio.run(engine.prefill(EngineRequest("hit", prompt + [5, 6, 7],
                                                   SamplingParams(max_tokens=2, **GREEDY))))
    assert hit.cached_tokens > 0 and seen[0] >= hit.cached_tokens
