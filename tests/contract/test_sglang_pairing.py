"""The SGLang adapter's runtime parts on the CPU: the image payload, the decode stream the handoff
opens (so a prefill failing before the KV arrives is retried in a new room), aborts, the
readiness probe, the bootstrap port claims, the engine's environment, speculative decoding and
the tokenizer choice. The engine is a recording stand-in for the few `sglang.Engine` calls the
adapter makes; the conformance tier (`tests/sglang`) runs the same payload through SGLang's own
processor and vision tower.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from cluster.settings import load_settings, parse_settings
from services.engines.bootstrap_port import claim_port
from services.engines.protocol import EngineRequest, SamplingParams
from services.engines.sglang_args import (BOOTSTRAP_FIELDS, engine_env, image_payload,
                                          require_transfer_backend, server_args)
from services.engines.sglang_engine import EngineProbe, SGLangEngine, SGLangHandoff
from services.errors import EngineError, InvalidRequest
from services.kv.protocol import PairedKV
from services.multimodal.uniform import ImageTokens
from services.telemetry.tracing import resolve as resolve_tracing

PROFILE = load_settings("cluster/profiles/h200x16.yaml")
PAIRING = {"bootstrap_host": "10.0.0.7", "bootstrap_port": 8999, "bootstrap_room": 12345}
TOKENS = ImageTokens(img=10, brk=12, end=13)


def request() -> EngineRequest:
    return EngineRequest("chatcmpl-1", [1, 5, 6, 7], SamplingParams(max_tokens=8),
                         handoff=dict(PAIRING))


def image_block(rows: int, cols: int) -> list[int]:
    block = ([10] * cols + [12]) * rows
    return block[:-1] + [13]


class RecordingEngine:
    """The part of `sglang.Engine` the adapter calls, answering from a script of outputs."""

    def __init__(self, outputs: list[dict] | None = None, block: bool = False):
        self.outputs, self.block, self.calls, self.aborted = outputs or [], block, [], []
        self.tokenizer_manager = self

    def abort_request(self, rid: str) -> None:
        self.aborted.append(rid)

    async def async_generate(self, **kwargs):
        self.calls.append(kwargs)
        if self.block:
            await asyncio.Event().wait()  # the KV never arrives
        if not kwargs.get("stream", True):
            return self.outputs[-1]

        async def stream():
            for out in self.outputs:
                yield out
        return stream()


class Adapter:
    """What `DecodeStream` and the handoff read of an `SGLangEngine`, around a recording engine
    (the methods are `SGLangEngine`'s own)."""

    def __init__(self, engine: RecordingEngine):
        self.engine, self.live, self.eos_ids, self.seeded = engine, {}, (2,), False
        self.detokenize = lambda ids: " ".join(map(str, ids))
        self.marks = None  # ids here are not Tekken's
        self.abort = SGLangEngine.abort.__get__(self)
        self.open_decode = SGLangEngine.open_decode.__get__(self)


def outputs(*cumulative: list[int], finish: str = "length") -> list[dict]:
    last = len(cumulative) - 1
    return [{"output_ids": ids, "meta_info": {
        "completion_tokens": len(ids), "finish_reason": {"type": finish} if i == last else None}}
        for i, ids in enumerate(cumulative)]


def test_images_go_as_one_tensor_item_with_their_rows_as_offsets():
    ids = [1, 3] + image_block(2, 4) + image_block(2, 4) + [7, 4]
    pixels = [np.full((3, 56, 112), v, np.float32) for v in (0.5, -0.5)]
    items = image_payload(ids, pixels, TOKENS)
    assert len(items) == 1 and items[0]["format"] == "processor_output"
    batch = items[0]["pixel_values"]
    assert type(batch).__module__.startswith("torch"), "SGLang hashes tensors, not numpy"
    assert tuple(batch.shape) == (2, 3, 56, 112) and float(batch[1, 0, 0, 0]) == -0.5
    # one offset per row of [IMG]s, as SGLang finds placeholders (the [IMG_BREAK] is none)
    assert items[0]["offsets"] == [(2, 5), (7, 10), (12, 15), (17, 20)]
    assert image_payload([1, 2], [], TOKENS) == []
    with pytest.raises(InvalidRequest, match="1 image blocks for 2 images"):
        image_payload([1] + image_block(2, 4), pixels, TOKENS)
    # a resumed leg's prompt: [IMG]s it sampled are text, not placeholders
    resumed = image_payload(ids + [55, 10, 10], pixels, TOKENS)
    assert resumed[0]["offsets"] == items[0]["offsets"]
    # blocks that would pad more placeholders than the images have patches: never sent
    with pytest.raises(EngineError, match="hold 16 \\[IMG\\] for 8 patches"):
        image_payload(ids, [p[:, :28, :] for p in pixels], TOKENS)


def test_images_of_several_sizes_must_have_been_made_one_size():
    ids = [1] + image_block(2, 4) + image_block(3, 1)
    with pytest.raises(EngineError, match="2 sizes"):
        image_payload(ids, [np.ones((3, 56, 112), np.float32),
                            np.ones((3, 84, 28), np.float32)], TOKENS)


def test_handoff_opens_the_decode_request_in_the_prefill_replicas_room():
    class Prefill:  # what the handoff reads from a started prefill engine
        host, bootstrap_port = "10.0.0.9", 9000

    engine = RecordingEngine(outputs([4], [4, 5, 6]))
    decode_side, prefill_side = SGLangHandoff(Adapter(engine)), SGLangHandoff(Prefill())
    assert decode_side.concurrent
    ticket = decode_side.open("r")
    assert ticket.fields["bootstrap_room"] != decode_side.open("r").fields["bootstrap_room"]
    assert 0 <= ticket.fields["bootstrap_room"] < 2 ** 63
    bound = prefill_side.bind(ticket)

    async def run():
        paired = await decode_side.receive(bound, request())
        return paired, [c async for c in paired.kv.chunks()]

    paired, chunks = asyncio.run(run())
    assert isinstance(paired, PairedKV) and paired.first_token is None
    sent = engine.calls[0]
    assert {f: sent[f] for f in BOOTSTRAP_FIELDS} == {
        "bootstrap_room": ticket.fields["bootstrap_room"], "bootstrap_host": "10.0.0.9",
        "bootstrap_port": 9000}
    assert [c.token_ids for c in chunks] == [[4], [5, 6]] and chunks[-1].finish_reason == "length"
    assert engine.aborted == [], "a request that finished is not aborted"


def test_a_decode_leg_whose_kv_never_comes_is_aborted_when_the_worker_gives_up():
    """The worker cancels `receive` when the prefill fails before the KV arrived, then retries
    in a new room: the old room's decode request is aborted by that room's rid."""
    engine = RecordingEngine(block=True)
    handoff = SGLangHandoff(Adapter(engine))
    ticket = handoff.open("r")
    ticket.fields |= {"bootstrap_host": "10.0.0.9", "bootstrap_port": 9000}

    async def run():
        waiting = asyncio.ensure_future(handoff.receive(ticket, request()))
        await asyncio.sleep(0.05)
        assert not waiting.done(), "receive returns only once the KV is there"
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)

    asyncio.run(run())
    assert engine.aborted == [f"chatcmpl-1#{ticket.fields['bootstrap_room']}"]


def test_a_stream_closed_early_aborts_its_engine_request():
    engine = RecordingEngine(outputs([4], [4, 5], [4, 5, 6]))
    adapter = Adapter(engine)

    async def run():
        stream = await adapter.open_decode(request(), dict(PAIRING))
        chunks = stream.chunks()
        await anext(chunks)
        await chunks.aclose()  # the client left after the first token

    asyncio.run(run())
    assert engine.aborted == ["chatcmpl-1#12345"] and adapter.live == {}


def test_a_stream_our_stop_string_ends_aborts_its_engine_request():
    """Stop strings are matched here, not in SGLang: the engine request is still decoding (and
    holding its KV) when ours ends the answer, so it is aborted."""
    engine = RecordingEngine(outputs([4], [4, 5], [4, 5, 6]))
    adapter = Adapter(engine)
    stopping = EngineRequest("chatcmpl-1", [1, 5, 6, 7],
                             SamplingParams(max_tokens=8, stop=("5",)), handoff=dict(PAIRING))

    async def run():
        stream = await adapter.open_decode(stopping, dict(PAIRING))
        return [c async for c in stream.chunks()]

    chunks = asyncio.run(run())
    assert [c.token_ids for c in chunks] == [[4], [5]] and chunks[-1].finish_reason == "stop"
    assert engine.aborted == ["chatcmpl-1#12345"] and adapter.live == {}


def test_a_prefill_cancelled_while_it_runs_aborts_its_engine_request():
    """SGLang goes on with a request whose caller went away (its deadline, or the decode side
    giving up on the attempt), holding the KV and the room: a cancelled prefill aborts it."""
    engine = RecordingEngine(block=True)
    adapter = Adapter(engine)
    adapter.image_tokens, adapter.live = TOKENS, {}
    prefill = SGLangEngine.prefill.__get__(adapter)

    async def run():
        running = asyncio.ensure_future(prefill(request()))
        await asyncio.sleep(0.05)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)

    asyncio.run(run())
    assert engine.aborted == [engine.calls[0]["rid"]] and adapter.live == {}


def test_the_probe_makes_an_engine_ready_that_sglang_never_marks_up():
    engine = RecordingEngine(outputs([7]))
    probe = EngineProbe(engine, timeout_s=1, every_s=60)
    assert probe.status() == (False, "not probed yet")
    assert asyncio.run(probe.check()) and probe.status()[0]
    sent = engine.calls[0]
    assert sent["bootstrap_host"] == "2.2.2.2" and sent["sampling_params"]["max_new_tokens"] == 1
    stuck = EngineProbe(RecordingEngine(block=True), timeout_s=0.05)
    assert not asyncio.run(stuck.check()) and "no token within" in stuck.detail
    assert stuck.engine.aborted[0].startswith("small4-probe-")


def test_a_busy_engine_whose_probe_waits_behind_its_queue_stays_ready():
    """At peak load the probe queues behind the engine's requests past its timeout: outputs
    arriving for others meanwhile (SGLang stamps each batch's arrival) keep it ready, as
    SGLang's own health check reads them; a probe with nothing arriving is not ready."""
    import time

    class Busy(RecordingEngine):
        async def async_generate(self, **kwargs):
            self.calls.append(kwargs)
            await asyncio.sleep(0.01)
            self.last_receive_tstamp = time.time()  # a batch for other requests came out
            await asyncio.Event().wait()  # the probe's own token never comes in time

    busy = EngineProbe(Busy(block=True), timeout_s=0.1)
    assert asyncio.run(busy.check()) and busy.detail == ""
    assert busy.engine.aborted[0].startswith("small4-probe-")  # still aborted
    idle = RecordingEngine(block=True)
    idle.last_receive_tstamp = time.time() - 60  # outputs, but only before the probe
    stalled = EngineProbe(idle, timeout_s=0.05)
    assert not asyncio.run(stalled.check()) and "no token within" in stalled.detail


def test_bootstrap_ports_are_claimed_per_replica_and_never_shared(tmp_path):
    ports = [9100, 9101, 9102]
    first = claim_port(ports, rank=1, lock_dir=tmp_path)
    # a second replica starting at the same moment, before any engine has bound its port,
    # still gets another one (probing which port is free would hand both the same)
    second = claim_port(ports, rank=1, lock_dir=tmp_path)
    third = claim_port(ports, rank=0, lock_dir=tmp_path)
    assert (first.port, second.port, third.port) == (9101, 9102, 9100)
    with pytest.raises(RuntimeError, match="9100-9102 of this pool is claimed"):
        claim_port(ports, rank=2, lock_dir=tmp_path)
    second.release()
    assert claim_port(ports, rank=2, lock_dir=tmp_path).port == 9102


def test_engine_timeouts_outlast_the_longest_attempt_and_256k_is_allowed():
    traced = resolve_tracing(PROFILE.telemetry.tracing,
                             {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    env = engine_env(PROFILE.model, PROFILE.kv_handoff, traced)
    longest = PROFILE.kv_handoff.attempt_timeout_s(PROFILE.model.context_length)
    for name in ("SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT",
                 "SGLANG_DISAGGREGATION_WAITING_TIMEOUT"):
        assert int(env[name]) > longest > PROFILE.kv_handoff.prefill_timeout_s
    assert env["SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"] == "1"
    assert env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"
    assert "OTEL_EXPORTER_OTLP_TRACES_HEADERS" not in env  # none given
    short = PROFILE.model.model_copy(update={"context_length": 32768})
    assert "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN" not in engine_env(
        short, PROFILE.kv_handoff, None)


def test_a_long_prompt_gets_a_longer_prefill_attempt():
    handoff = PROFILE.kv_handoff
    assert handoff.attempt_timeout_s(0) == handoff.prefill_timeout_s
    assert handoff.attempt_timeout_s(200_000) > handoff.attempt_timeout_s(1000) + 90


def test_a_missing_transfer_library_is_named_with_its_extra(monkeypatch):
    from services.engines import sglang_args

    monkeypatch.setitem(sglang_args.TRANSFER_PACKAGES, "nixl", ("small4_no_such_module", "sglang"))
    with pytest.raises(RuntimeError, match=r"pip install '\.\[sglang\]'"):
        require_transfer_backend("nixl")


def speculative_profile(**changes) -> dict:
    spec = {"draft_model_path": "/models/mistral-small-4-119b-2603-eagle", "num_steps": 3,
            "eagle_topk": 1, "num_draft_tokens": 4} | changes
    data = yaml.safe_load(Path("cluster/profiles/h200x16.yaml").read_text())
    data["engine"]["speculative"] = spec
    return data


def test_speculative_decoding_reaches_both_roles():
    worker = parse_settings(speculative_profile()).worker("deep")
    for role in ("prefill", "decode"):
        args = server_args(worker.model, worker.engine, role=role, tp_size=2, host="h",
                           bootstrap_port=1 if role == "prefill" else None)
        assert args["speculative_algorithm"] == "EAGLE" and args["speculative_num_steps"] == 3
        assert args["speculative_draft_model_path"].endswith("-eagle")
    with pytest.raises(Exception, match="num_steps"):
        parse_settings(speculative_profile(num_draft_tokens=9))
    with pytest.raises(Exception, match="needs engine.kind sglang"):
        parse_settings({"auth": {"enabled": False},
                        "engine": {"speculative": speculative_profile()["engine"]["speculative"]}})


def test_prompts_are_encoded_with_the_checkpoints_own_tokenizer(tmp_path):
    from services.settings import ModelSettings
    from services.tokenizer import standin_tokenizer_path

    checkpoint = tmp_path / "mistral-small-4-x"
    checkpoint.mkdir()
    bare = ModelSettings(source="checkpoint", path=checkpoint)
    assert bare.tokenizer_file() is None  # no tekken.json: the stand-in's (reference engine)
    (checkpoint / "tekken.json").write_text('{"other": "vocabulary"}')
    assert bare.tokenizer_file() == checkpoint / "tekken.json"
    clash = ModelSettings(source="checkpoint", path=checkpoint,
                          tokenizer=standin_tokenizer_path())
    with pytest.raises(ValueError, match="differs from the checkpoint's own"):
        clash.tokenizer_file()
    assert ModelSettings().tokenizer_file() is None
    unmounted = ModelSettings(source="checkpoint", path=tmp_path / "not-mounted")
    with pytest.raises(ValueError, match="no such directory on this node"):
        unmounted.tokenizer_file()  # not the stand-in's, silently
    named = unmounted.model_copy(update={"tokenizer": standin_tokenizer_path()})
    assert named.tokenizer_file() == standin_tokenizer_path()  # the one the operator named



def test_a_prefills_time_in_sglangs_queue_is_its_queue_wait_not_compute():
    engine = RecordingEngine([{"output_ids": [4], "meta_info": {
        "finish_reason": {"type": "length"}, "cached_tokens": 2, "queue_time": 30.0}}])
    adapter = Adapter(engine)
    adapter.image_tokens = TOKENS
    result = asyncio.run(SGLangEngine.prefill.__get__(adapter)(request()))
    # SGLang's queue time, bounded by what the call took (here it answered at once)
    assert result.cached_tokens == 2 and 0.0 < result.queue_s < 1.0 and result.compute_s == 0.0
    engine.outputs[-1]["meta_info"].pop("queue_time")  # SGLang's metrics off: no wait known
    result = asyncio.run(SGLangEngine.prefill.__get__(adapter)(request()))
    assert result.queue_s == 0.0 and result.compute_s > 0.0


def test_a_prefills_compute_is_its_forwards_not_its_wait_for_the_decode_side():
    """A PD prefill answers once its KV reached the decode engine: the time after its last
    forward (decode's room, the wire) is not prefill compute. SGLang reports the forwards'
    span in wall-clock seconds (metrics on)."""
    class Slow(RecordingEngine):
        async def async_generate(self, **kwargs):
            await asyncio.sleep(0.2)  # the transfer to a busy decode engine
            return await super().async_generate(**kwargs)

    engine = Slow([{"output_ids": [4], "meta_info": {
        "finish_reason": {"type": "length"}, "queue_time": 0.01,
        "forward_entry_time": 1_796_000_000.50, "prefill_finished_time": 1_796_000_000.55}}])
    adapter = Adapter(engine)
    adapter.image_tokens = TOKENS
    result = asyncio.run(SGLangEngine.prefill.__get__(adapter)(request()))
    assert result.queue_s == 0.01 and abs(result.compute_s - 0.05) < 1e-6


class Snapshots:
    """SGLang's load snapshot reader as its tokenizer manager holds it (`read_all`)."""

    def __init__(self, loads: list[dict] | Exception):
        self.loads = loads

    def read_all(self):
        if isinstance(self.loads, Exception):
            raise self.loads
        return [SimpleNamespace(**load) for load in self.loads]


def engine_stats(engine: RecordingEngine, live: dict):
    """`SGLangEngine.stats` of an engine whose probe said it is ready."""
    adapter = SimpleNamespace(kind="sglang", role="prefill", engine=engine, live=live,
                              settings=PROFILE.worker("fast"),
                              health=SimpleNamespace(status=lambda: (True, "")))
    return SGLangEngine.stats(adapter)


def rank(running: int, waiting: int, used: int, size: int) -> dict:
    return {"num_running_reqs": running, "num_waiting_reqs": waiting,
            "num_used_tokens": used, "max_total_num_tokens": size}


def test_stats_report_sglangs_own_queue_summed_over_its_schedulers():
    """The autoscaler reads `waiting` as the role's queue: SGLang's schedulers publish theirs
    (one snapshot per data-parallel rank); our own count of calls cannot tell queued from
    running."""
    engine = RecordingEngine()
    engine.load_snapshot_reader = Snapshots([rank(3, 5, 1000, 40000), rank(2, 1, 500, 40000)])
    stats = engine_stats(engine, {"a": ["rid-a", 10]})
    assert (stats.running, stats.waiting, stats.kv_tokens, stats.kv_capacity) == (
        5, 6, 1500, 80000)
    assert stats.healthy


@pytest.mark.parametrize("reader", [Snapshots([]), Snapshots(RuntimeError("torn")), None],
                         ids=["none-yet", "unreadable", "no-reader"])
def test_stats_fall_back_to_our_own_count_when_sglang_publishes_no_load(reader):
    engine = RecordingEngine()
    if reader is not None:
        engine.load_snapshot_reader = reader
    stats = engine_stats(engine, {"a": ["rid-a", 10], "b": ["rid-b", 30]})
    assert (stats.running, stats.waiting, stats.kv_tokens) == (2, 0, 40)
    assert stats.kv_capacity == PROFILE.worker("fast").engine.kv_capacity_tokens
