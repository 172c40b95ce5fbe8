"""GPU topology: the production profile places 8 TP2 engines on 2 nodes; bad profiles are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.settings import SettingsError, load_settings, parse_settings
from cluster.topology import deployment_options

ROOT = Path(__file__).resolve().parents[2]
H200 = ROOT / "cluster" / "profiles" / "h200x16.yaml"


def h200(**changes) -> dict:
    data = yaml.safe_load(H200.read_text())
    for path, value in changes.items():
        node = data
        *parents, leaf = path.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return data


def test_h200x16_places_eight_tp2_engines_on_two_nodes():
    placements = load_settings(H200).placements()
    assert len(placements) == 8
    assert all(len(p.gpus) == 2 for p in placements)
    by_node = {}
    for p in placements:
        by_node.setdefault(p.node, []).append(p)
    assert sorted(by_node) == [0, 1] and all(len(v) == 4 for v in by_node.values())
    for engines in by_node.values():
        gpus = [g for p in engines for g in p.gpus]
        assert sorted(gpus) == list(range(8)), "each GPU of a node holds exactly one engine"
        ports = [p.bootstrap_port for p in engines if p.role == "prefill"]
        assert len(ports) == len(set(ports)), "prefill engines on a node share a bootstrap port"
    roles = sorted((p.pool, p.role) for p in placements)
    assert roles.count(("fast", "prefill")) == 1 and roles.count(("deep", "decode")) == 3


def test_gpu_roles_get_one_strict_pack_group_per_engine():
    settings = load_settings(H200)
    options = deployment_options(settings.pools["deep"].decode)
    assert options["num_replicas"] == 3
    assert options["placement_group_bundles"] == [{"CPU": 4, "GPU": 2}]
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["ray_actor_options"]["num_gpus"] == 2
    assert "placement_group_bundles" not in deployment_options(load_settings().pools["fast"].decode)


@pytest.mark.parametrize("changes, problem", [
    ({"pools__deep__decode__replicas": 4}, "9 engines at tensor_parallel 2 need 18 GPUs; the cluster has 2 x 8 = 16"),
    ({"pools__fast__prefill__num_gpus": 1}, "pools.fast.prefill.num_gpus is 1, but an engine at tensor_parallel 2 holds exactly 2"),
    ({"topology__tensor_parallel": 16, "pools__fast__prefill__num_gpus": 16,
      "pools__fast__decode__num_gpus": 16, "pools__deep__prefill__num_gpus": 16,
      "pools__deep__decode__num_gpus": 16}, "tensor_parallel 16 does not fit a node of 8 GPUs"),
    ({"topology__bootstrap_port_base": 7998}, "include port 8000, used by the HTTP ingress"),
    ({"topology__bootstrap_port_base": 8078}, "include port 8080, used by Ray's metrics export"),
    ({"ray__metrics_port": 9000}, "include port 9000, used by Ray's metrics export"),
    ({"ray__metrics_port": 8000}, "ray.metrics_port: 8000 is http.port too"),
    # Ray's own ports: the chart opens http.port to every client (8265 took jobs from anyone)
    ({"http__port": 8265}, "http.port: 8265 is the port of the Ray dashboard"),
    ({"http__port": 52365}, "http.port: 52365 is the port of the Ray dashboard agent"),
    ({"ray__metrics_port": 6379}, "ray.metrics_port: 6379 is the port of the Ray GCS"),
    ({"autoscaling__budget_engines": 12}, "12 engines, but the topology holds 8"),
])
def test_impossible_profiles_are_refused_naming_the_problem(changes, problem):
    with pytest.raises(SettingsError) as err:
        parse_settings(h200(**changes))
    assert problem in str(err.value)


def test_chart_default_stack_is_the_h200x16_profile():
    values = yaml.safe_load((ROOT / "helm" / "small4" / "values.yaml").read_text())
    assert values["stack"] == yaml.safe_load(H200.read_text())


def test_every_prefill_replica_a_profile_may_run_has_its_own_fixed_port():
    from cluster.topology import RAY_PORTS, bootstrap_ports

    settings = load_settings(H200)
    ports = bootstrap_ports(settings.pools, settings.topology)
    assert {pool: len(p) for pool, p in ports.items()} == {
        name: settings.pools[name].prefill.max_replicas for name in ("fast", "deep")}
    every = [p for pool in ports.values() for p in pool]
    assert len(every) == len(set(every)), "two prefill replicas would share a bootstrap port"
    assert not set(every) & (set(RAY_PORTS) | {settings.http.port})
    assert settings.worker("deep").bootstrap_ports == ports["deep"]
    planned = [p.bootstrap_port for p in settings.placements() if p.role == "prefill"]
    assert planned == [ports["fast"][0], ports["deep"][0], ports["deep"][1]]


def test_plan_shows_each_engines_placement_port_and_sglang_arguments(capsys, tmp_path):
    from cluster.cli import main

    assert main(["plan", "--config", str(H200), "--json"]) == 0
    entries = __import__("json").loads(capsys.readouterr().out)
    assert len(entries) == 8
    prefill = [e for e in entries if e["role"] == "prefill"]
    assert [e["sglang_args"]["disaggregation_bootstrap_port"] for e in prefill] == \
        [e["bootstrap_port"] for e in prefill] == [8998, 9001, 9002]
    assert all(e["env"]["SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"] == "1" for e in entries)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(h200(topology__bootstrap_port_base=7998)))
    assert main(["plan", "--config", str(bad)]) == 2
    assert "include port 8000, used by the HTTP ingress" in capsys.readouterr().err
    keyed = tmp_path / "keyed.yaml"  # a collector's key reaches the engines, not the screen
    keyed.write_text(yaml.safe_dump(h200(telemetry__tracing={
        "enabled": True, "endpoint": "http://collector:4318/v1/traces",
        "headers": {"authorization": "Bearer sk-collector"}})))
    for form in (["--json"], []):
        assert main(["plan", "--config", str(keyed), *form]) == 0
        shown = capsys.readouterr().out
        assert "OTEL_EXPORTER_OTLP_TRACES_HEADERS" in shown and "sk-collector" not in shown


@pytest.mark.parametrize("command", ["up", "openapi", "generate", "plan"])
def test_a_bad_or_missing_profile_is_one_line_and_exit_2_for_every_command(command, capsys,
                                                                          tmp_path):
    from cluster.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(h200(ray__metrics_port=8000)))
    extra = ["hi"] if command == "generate" else []
    assert main([command, *extra, "--config", str(bad)]) == 2
    assert capsys.readouterr().err.startswith("refused: ray.metrics_port")
    assert main([command, *extra, "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["up", "plan"])
def test_a_profile_no_serve_app_can_run_is_refused_before_ray_starts(command, capsys,
                                                                    tmp_path):
    """An in-process KV handoff parses (small4 generate and the tests use it) but cannot
    run as a Serve app: `plan` said the profile was fine and `up` failed after starting Ray."""
    from cluster.cli import main

    paired = tmp_path / "paired.yaml"
    paired.write_text(yaml.safe_dump({"auth": {"enabled": False},
                                      "kv_handoff": {"backend": "paired"}}))
    assert main([command, "--config", str(paired)]) == 2
    assert capsys.readouterr().err.startswith("refused: kv_handoff.backend 'paired'")


def test_up_checks_its_port_as_the_profiles_own(capsys):
    """`--port` replaces http.port before the settings' port checks, not after them."""
    from cluster.cli import main

    assert main(["up", "--config", str(H200), "--port", "8998"]) == 2
    assert "include port 8998, used by the HTTP ingress" in capsys.readouterr().err


def test_h200x16_admits_what_its_engines_hold():
    """A decode stream holds its Serve call for its whole life, and each ingress replica
    admits `max_queue` streams per pool: caps below the engines' batch slots left them empty
    (64 calls per decode replica against 128 slots; 2 x 64 streams per pool against up to 5
    decode engines x 128), spilled or refused the rest, and hid that demand from the
    autoscaler, which sees the engines' queues, not Serve's router's."""
    s = load_settings(H200)
    slots = s.engine.max_running_requests
    admitted = 0
    for name, pool in s.pools.items():
        decode = s.role_options(name, "decode")["max_ongoing_requests"]
        assert decode >= slots, name
        assert s.ingress.replicas * pool.max_queue >= pool.decode.highest * slots, name
        admitted += pool.max_queue
    assert s.ingress.max_ongoing_requests >= admitted  # Serve's own cap does not bind first


def test_a_decode_replica_takes_calls_for_its_batch_and_a_queue_unless_set():
    settings = load_settings(H200)
    assert settings.role_options("deep", "decode")["max_ongoing_requests"] == 256
    assert settings.role_options("deep", "prefill")["max_ongoing_requests"] == 64
    pinned = parse_settings(h200(pools__deep__decode__max_ongoing_requests=100))
    assert pinned.role_options("deep", "decode")["max_ongoing_requests"] == 100


def test_small4_up_drains_at_least_as_long_as_its_longest_deployment_drain():
    """Each deployment gets its `drain_deadline_s` to finish its requests (the chart's grace
    period follows the longest); `small4 up` stopped Ray after `ray.drain_timeout_s` (60 s),
    cutting a decode role given 300."""
    base = {"auth": {"enabled": False}}
    assert parse_settings(base).drain_s() == 60
    long = parse_settings(base | {"pools": {"fast": {"effort": "none", "decode": {
        "drain_deadline_s": 300}}, "deep": {"effort": "high"}}})
    assert long.drain_s() == 300
    assert parse_settings(base | {"ray": {"drain_timeout_s": 900}}).drain_s() == 900
