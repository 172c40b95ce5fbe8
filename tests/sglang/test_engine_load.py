"""The engine's load as SGLang's schedulers publish it, read the way `SGLangEngine.stats` reads
it: SGLang's own snapshot writer and reader on a shared-memory file (the real sglang 0.5.23
classes; no GPU, no engine)."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

from services.engines.sglang_engine import engine_load


def test_the_tokenizer_manager_holds_the_reader_stats_read():
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    assert "self.load_snapshot_reader = create_load_snapshot_reader(" in inspect.getsource(
        TokenizerManager)


def test_engine_load_sums_what_each_scheduler_published(tmp_path):
    from sglang.srt.managers.load_snapshot import (LoadSnapshot, ShmLoadSnapshotReader,
                                                   ShmLoadSnapshotWriter)

    path = str(tmp_path / "loads.shm")
    writers = [ShmLoadSnapshotWriter(path, 2, rank) for rank in (0, 1)]
    engine = SimpleNamespace(tokenizer_manager=SimpleNamespace(
        load_snapshot_reader=ShmLoadSnapshotReader(path, 2)))
    # a started engine's schedulers have published nothing yet: an idle engine, its pool
    # size unknown (the caller keeps the configured one)
    assert engine_load(engine).kv_capacity == 0
    writers[0].write(LoadSnapshot(dp_rank=0, num_running_reqs=7, num_waiting_reqs=4,
                                  num_used_tokens=9000, max_total_num_tokens=500000))
    writers[1].write(LoadSnapshot(dp_rank=1, num_running_reqs=1, num_waiting_reqs=0,
                                  num_used_tokens=100, max_total_num_tokens=500000))
    load = engine_load(engine)
    assert (load.running, load.waiting, load.kv_tokens, load.kv_capacity) == (
        8, 4, 9100, 1000000)


def test_no_snapshot_file_is_no_load(tmp_path):
    from sglang.srt.managers.load_snapshot import ShmLoadSnapshotReader

    engine = SimpleNamespace(tokenizer_manager=SimpleNamespace(
        load_snapshot_reader=ShmLoadSnapshotReader(str(tmp_path / "none.shm"), 1)))
    assert engine_load(engine) is None


def test_each_roles_queue_leaves_out_the_other_roles_backlog(tmp_path):
    """SGLang counts its transfer queue (KV slots allocated, the prefill's KV not sent yet) in
    a decode scheduler's waiting requests: the prefill role's backlog, which read as decode's
    queue asked for decode engines under a prefill overload. Pre-allocation (no KV room yet)
    and retracted requests are decode's own and stay. Mirrored on prefill: its bootstrap
    queue waits for decode."""
    from sglang.srt.managers.load_snapshot import (DisaggregationMetrics, LoadSnapshot,
                                                   ShmLoadSnapshotReader, ShmLoadSnapshotWriter)

    path = str(tmp_path / "loads.shm")
    writer = ShmLoadSnapshotWriter(path, 1, 0)
    engine = SimpleNamespace(tokenizer_manager=SimpleNamespace(
        load_snapshot_reader=ShmLoadSnapshotReader(path, 1)))
    writer.write(LoadSnapshot(dp_rank=0, num_running_reqs=100, num_waiting_reqs=45,
                              disaggregation=DisaggregationMetrics(
                                  mode="decode", decode_prealloc_queue_reqs=5,
                                  decode_transfer_queue_reqs=30,
                                  decode_retracted_queue_reqs=2)))
    assert engine_load(engine).waiting == 15  # 8 in its waiting queue, 5 + 2 of its own
    # a prefill engine's bootstrap queue waits for the decode side's KV room: decode's backlog
    writer.write(LoadSnapshot(dp_rank=0, num_running_reqs=3, num_waiting_reqs=25,
                              disaggregation=DisaggregationMetrics(
                                  mode="prefill", prefill_bootstrap_queue_reqs=20,
                                  prefill_inflight_queue_reqs=4)))
    assert engine_load(engine).waiting == 5


def test_the_tokenizer_manager_stamps_each_outputs_arrival_in_wall_time():
    """What `EngineProbe` reads of a busy engine: the arrival of the latest batch of outputs,
    in `time.time()` (the probe compares it with its own start)."""
    import time

    from sglang.srt.managers.tokenizer_manager import TokenizerManager
    from sglang.srt.observability import req_time_stats

    assert "self.last_receive_tstamp = real_time()" in inspect.getsource(TokenizerManager)
    assert req_time_stats.real_time is time.time


def test_a_prefills_meta_info_names_its_forwards_span_in_wall_time():
    """What `SGLangEngine.prefill` reads as compute: the first forward's entry and the last
    chunk's end, in the output's meta_info (wall-clock seconds, like `time.time()`)."""
    from sglang.srt.observability.req_time_stats import SchedulerReqTimeStats

    source = inspect.getsource(SchedulerReqTimeStats.convert_to_output_meta_info)
    for field in ("forward_entry_time", "prefill_finished_time"):
        assert f'meta_data["{field}"] = convert_time_to_realtime(' in source
