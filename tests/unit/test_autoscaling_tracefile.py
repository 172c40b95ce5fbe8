"""Trace files for `small4 simulate`: the public trace columns, one file per pool or mixed, and
clear refusals (exit 2) naming the file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoscaling.simulator.tracefile import (TraceFileError, TraceSource, load_trace,
                                             read_rows)
from cluster.cli import main

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"
ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_mixed_file_routes_each_row_by_its_effort(tmp_path):
    path = write(tmp_path, "mixed.csv", f"{HEADER},Effort\n"
                 "2023-11-16 18:15:46.6805900,4000,200,high\n"
                 "2023-11-16 18:15:48.1805900,1500,100,none\n"
                 "\n"
                 "2023-11-16 18:15:50.6805900,900,30,medium\n")
    trace = load_trace([TraceSource.parse(str(path))], speedup=2.0)
    assert [(r.pool, r.prompt, r.output) for r in trace.requests] == [
        ("deep", 4000, 200), ("fast", 1500, 100), ("deep", 900, 30)]
    assert [r.arrival for r in trace.requests] == pytest.approx([0.0, 0.75, 2.0])


def test_one_file_per_pool_takes_the_effort_after_its_name(tmp_path):
    chat = write(tmp_path, "chat.csv", f"{HEADER}\n10,100,20\n12.5,300,40\n")
    agents = write(tmp_path, "agents.csv", f"{HEADER}\n11,8000,3000\n")
    trace = load_trace([TraceSource.parse(f"{chat}:none"), TraceSource.parse(f"{agents}:high")])
    assert [(r.arrival, r.pool) for r in trace.requests] == [
        (0.0, "fast"), (1.0, "deep"), (2.5, "fast")]
    assert trace.duration_s == pytest.approx(2.5)


@pytest.mark.parametrize("body, message", [
    (f"{HEADER}\n0,100,20\n1,abc,3\n", "line 3: ContextTokens must be a number"),
    (f"{HEADER}\n0,100,20\n1,100\n", "line 3: 2 fields, the header has 3"),
    (f"{HEADER}\n0,100,-5\n", "line 2: GeneratedTokens must be a whole number"),
    (f"{HEADER}\nyesterday,100,5\n", "line 2: TIMESTAMP must be seconds or an ISO"),
    (f"{HEADER},Effort\n0,100,5,extreme\n", "line 2: unknown Effort 'extreme'"),
    ("", "empty file"),
    (f"{HEADER}\n", "no requests after the header"),
    ("TIMESTAMP,ContextTokens,Output\n0,1,2\n", "unknown column 'Output'"),
    ("TIMESTAMP,ContextTokens\n0,1\n", "missing column 'GeneratedTokens'"),
    (f"{HEADER},ContextTokens\n0,1,2,3\n", "column 'ContextTokens' appears twice"),
    (f"{HEADER}\n0,1e30,2\n", "line 2: ContextTokens must be at most 10,000,000"),
    (f"{HEADER}\n0,262000,1000\n", "line 2: ContextTokens \\+ GeneratedTokens is 263,000, "
                                   "beyond the model's context"),
    (f"{HEADER}\n0,1,2\n2023-11-16 18:15:46,1,2\n",
     "line 3: TIMESTAMP is ISO date-times here, the rows before have seconds"),
    (f'{HEADER}\n0,1,2\n1,"2\n3\n4\n', "line 3: 2 fields"),  # where it starts
    (f'{HEADER}\n0,1,2\n1,"{"9" * 200_000},2\n', "line 3: field larger than field limit"),
])
def test_bad_files_are_refused_naming_the_problem(tmp_path, body, message):
    path = write(tmp_path, "t.csv", body)
    with pytest.raises(TraceFileError, match=message):
        read_rows(TraceSource(path, "none"))


def test_a_spreadsheet_export_with_a_byte_order_mark_reads_and_other_bytes_are_refused(
        tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(f"\ufeff{HEADER}\n0,100,20\n".encode("utf-8"))
    assert read_rows(TraceSource(path, "none")) == [(0.0, "fast", 100, 20)]
    path.write_bytes(f"{HEADER}\n0,100,20\n".encode("utf-16"))
    with pytest.raises(TraceFileError, match="not UTF-8 text"):
        read_rows(TraceSource(path, "none"))


def test_files_on_different_clocks_or_beyond_a_week_are_refused(tmp_path):
    seconds = write(tmp_path, "a.csv", f"{HEADER}\n0,100,20\n")
    iso = write(tmp_path, "b.csv", f"{HEADER}\n2023-11-16 18:15:46,100,20\n")
    with pytest.raises(TraceFileError, match="cannot be put on one clock"):
        load_trace([TraceSource(seconds, "none"), TraceSource(iso, "high")])
    fortnight = write(tmp_path, "long.csv", f"{HEADER}\n0,100,20\n1209600,100,20\n")
    with pytest.raises(TraceFileError, match="14 days of simulated time"):
        load_trace([TraceSource(fortnight, "none")])
    assert load_trace([TraceSource(fortnight, "none")], speedup=2).duration_s == 604800


def test_milliseconds_are_refused_not_read_as_seconds_and_naive_times_are_utc(tmp_path,
                                                                             monkeypatch):
    """Five minutes in epoch milliseconds read as seconds were 3.5 days of simulated time,
    run at that (a one-second file as 1000 s). An ISO time without an offset was this
    machine's local time: across a daylight-saving change an hour vanished."""
    import time

    millis = write(tmp_path, "ms.csv", f"{HEADER}\n1700000000000,100,20\n"
                   "1700000300000,100,20\n")
    with pytest.raises(TraceFileError, match="line 2: TIMESTAMP '1700000000000' is not "
                                             "seconds"):
        read_rows(TraceSource(millis, "none"))
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        dst = write(tmp_path, "dst.csv", f"{HEADER}\n2023-03-12T01:30:00,1,1\n"
                    "2023-03-12T02:30:00,1,1\n2023-03-12T03:30:00,1,1\n")
        trace = load_trace([TraceSource(dst, "none")])
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert [r.arrival for r in trace.requests] == [0.0, 3600.0, 7200.0]


def test_column_names_ignore_case_and_an_empty_effort_cell_names_the_way_out(tmp_path):
    lower = write(tmp_path, "lower.csv", "timestamp,contexttokens,GENERATEDTOKENS,effort\n"
                  "0,100,20,high\n")
    assert read_rows(TraceSource(lower)) == [(0.0, "deep", 100, 20)]
    blank = write(tmp_path, "blank.csv", f"{HEADER},Effort\n0,100,20,\n")
    with pytest.raises(TraceFileError, match="line 2: no Effort on this row"):
        read_rows(TraceSource(blank))


def test_a_file_without_effort_needs_one_after_its_name(tmp_path):
    path = write(tmp_path, "t.csv", f"{HEADER}\n0,100,20\n")
    with pytest.raises(TraceFileError, match="no Effort column"):
        read_rows(TraceSource.parse(str(path)))
    with pytest.raises(TraceFileError, match="unknown effort 'hgh'"):
        TraceSource.parse(f"{path}:hgh")


@pytest.mark.parametrize("body, message", [
    (f"{HEADER}\n0,100,20\n1.5,abc,3\n", "t.csv line 3: ContextTokens must be a number"),
    ("", "t.csv: empty file"),
    (f"{HEADER},Priority\n0,100,20,1\n", "t.csv: unknown column 'Priority'"),
])
def test_small4_simulate_refuses_a_bad_file_with_exit_2(tmp_path, capsys, body, message):
    path = write(tmp_path, "t.csv", body)
    assert main(["simulate", "--trace", f"{path}:none", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "simulate.json").exists()


def test_small4_simulate_refuses_a_missing_file_and_a_tiny_budget(tmp_path, capsys):
    assert main(["simulate", "--trace", str(tmp_path / "none.csv:high")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["simulate", "--budget-engines", "2", "--kind", "steady"]) == 2
    assert "must be 4 to 128" in capsys.readouterr().err
    # the hindsight reference tries budget^4 splits: 1000 never ended
    assert main(["simulate", "--budget-engines", "1000", "--kind", "steady"]) == 2
    assert main(["simulate", "--jobs", "0", "--kind", "steady"]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err
    # a file name with a colon is a file that cannot be read, not an unknown effort
    assert main(["simulate", "--trace", str(tmp_path / "trace:v2.csv")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["simulate", "--trace", f"{write(tmp_path, 's.csv', HEADER + chr(10) + '0,1,1')}"
                 ":none", "--speedup", "inf"]) == 2
    assert "finite" in capsys.readouterr().err
    # refused before the study runs (minutes), not when its results are written
    blocker = write(tmp_path, "a-file", "")
    assert main(["simulate", "--kind", "steady", "--out", str(blocker / "out")]) == 2
    assert "not a directory this user can write" in capsys.readouterr().err
    (tmp_path / "taken" / "simulate.json").mkdir(parents=True)  # a directory where it writes
    assert main(["simulate", "--kind", "steady", "--out", str(tmp_path / "taken")]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_small4_simulate_replays_a_file_and_answers_with_a_budget_and_split(tmp_path, capsys):
    rows = "".join(f"{i * 0.25:.2f},{1500 + 37 * (i % 9)},{120 + i % 50},"
                   f"{'high' if i % 4 == 0 else 'none'}\n" for i in range(240))
    path = write(tmp_path, "ops.csv", f"{HEADER},Effort\n{rows}")
    out = tmp_path / "out"
    assert main(["simulate", "--trace", str(path), "--speedup", "2", "--out", str(out),
                 "--jobs", "1"]) == 0
    printed = capsys.readouterr()
    assert "[1/5] ops.csv static 0" in printed.err  # progress while it runs
    assert "ours" in printed.out and "planner" in printed.out and "x static" in printed.out
    assert "ops.csv: with our autoscaling, 4 engines (8 GPUs)" in printed.out
    assert "a fixed split needs 4 engines (8 GPUs): fast/prefill 1" in printed.out
    import json

    document = json.loads((out / "simulate.json").read_text())
    assert {r["policy"] for r in document["summary"]} == {"static", "ray_default", "planner",
                                                           "ours", "hindsight"}
    assert document["answers"][0]["ours"]["slo_attainment"] >= 0.95
    assert (out / "simulate.png").exists()


def test_small4_simulate_shows_what_prefix_aware_routing_buys(tmp_path, capsys):
    assert main(["simulate", "--prefix-share", "1.5", "--no-answer"]) == 2
    assert "--prefix-share" in capsys.readouterr().err
    rows = "".join(f"{i * 0.25:.2f},{3000 + 37 * (i % 9)},{60 + i % 50},none\n"
                   for i in range(240))
    path = write(tmp_path, "chat.csv", f"{HEADER},Effort\n{rows}")
    out = tmp_path / "out"
    assert main(["simulate", "--trace", str(path), "--policy", "static", "--no-answer",
                 "--prefix-share", "0.8", "--prefix-groups", "4", "--out", str(out),
                 "--jobs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "prefix hit" in printed and "cache-aware" in printed
    import json

    by_routing = {r["routing"]: r for r in json.loads(
        (out / "simulate.json").read_text())["prefix"]["by_routing"]}
    assert by_routing["cache-aware"]["hit_rate"] >= by_routing["random"]["hit_rate"] > 0


def test_small4_simulate_runs_a_profiles_split_bounds_and_slos(tmp_path, capsys):
    """Ops plan with their own profile: its budget, start split, each role's bounds and SLOs
    (here h200x16's, with the deep pool's TTFT SLO tightened), not the simulator's defaults."""
    import copy
    import json

    import yaml

    profile = yaml.safe_load((ROOT / "cluster" / "profiles" / "h200x16.yaml").read_text())
    profile["pools"]["deep"]["slo"]["ttft_s"] = 2.5
    profile["pools"]["fast"]["decode"]["max_replicas"] = 4
    path = write(tmp_path, "ops.yaml", yaml.safe_dump(profile))
    out = tmp_path / "out"
    assert main(["simulate", "--config", str(path), "--kind", "steady", "--policy", "ours",
                 "--no-answer", "--out", str(out), "--jobs", "1"]) == 0
    settings = json.loads((out / "simulate.json").read_text())["settings"]
    assert settings["budget_engines"] == 8
    assert settings["static_split"] == {"fast/prefill": 1, "fast/decode": 2, "deep/prefill": 2,
                                        "deep/decode": 3}
    assert settings["slos"]["deep"]["ttft_s"] == 2.5
    from autoscaling.simulator.scenario import SimSettings, _bounds
    from cluster.settings import load_settings
    from cluster.simulate import from_profile

    s = from_profile(SimSettings(), load_settings(path))
    assert _bounds(s, ("fast", "decode")) == {"min_replicas": 1, "max_replicas": 4}
    assert (s.perf.gpus_per_engine, s.perf.max_running) == (2, 128)  # the profile's engine
    assert s.perf.kv_capacity_tokens == SimSettings().perf.kv_capacity_tokens
    # TP4 engines: twice the compute per engine, the weights over four GPUs (more room for KV)
    tp4 = copy.deepcopy(profile)
    tp4["topology"] |= {"tensor_parallel": 4, "nodes": 4}
    for pool in tp4["pools"].values():
        for role in ("prefill", "decode"):
            pool[role]["num_gpus"] = 4
    tp4["engine"]["max_running_requests"] = 256
    wide = from_profile(SimSettings(), load_settings(write(tmp_path, "tp4.yaml",
                                                           yaml.safe_dump(tp4))))
    assert (wide.perf.gpus_per_engine, wide.perf.max_running) == (4, 256)
    assert wide.perf.prefill_flops_per_s == 2 * s.perf.prefill_flops_per_s
    assert wide.perf.kv_capacity_tokens > 2 * s.perf.kv_capacity_tokens
    # a profile of CPU engines would be planned as if it had H200s: refused
    cpu = write(tmp_path, "cpu.yaml", (ROOT / "cluster" / "profiles" / "local.yaml").read_text())
    capsys.readouterr()
    assert main(["simulate", "--config", str(cpu), "--kind", "steady"]) == 2
    assert "times SGLang engines on H200 GPUs" in capsys.readouterr().err
    both = copy.deepcopy(profile) | {"routing": {"effort_map": {"none": "none"},
                                                 "default_effort": "none"}}
    both["pools"]["deep"]["effort"] = "none"  # two pools of one effort: not what it models
    bad = write(tmp_path, "both.yaml", yaml.safe_dump(both))
    assert main(["simulate", "--config", str(bad), "--kind", "steady"]) == 2
    assert "one pool of effort none and one of high" in capsys.readouterr().err
    assert main(["simulate", "--config", str(tmp_path / "none.yaml"), "--kind", "steady"]) == 2
    capsys.readouterr()
    # a budget below the roles' minimums would fail inside the study (the arbiter cannot hold
    # them): refused first
    profile["pools"]["fast"]["decode"]["min_replicas"] = 2
    floor = write(tmp_path, "floor.yaml", yaml.safe_dump(profile))
    assert main(["simulate", "--config", str(floor), "--budget-engines", "4",
                 "--kind", "steady"]) == 2
    assert "min_replicas, 5" in capsys.readouterr().err
