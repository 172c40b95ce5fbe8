"""`small4`'s failures a user meets end in one line on stderr and a non-zero exit, never a
traceback. Without Ray: where the CLI calls into Ray, the call raises what Ray raises."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from cluster.cli import main

ROOT = Path(__file__).resolve().parents[2]
H200 = ROOT / "cluster" / "profiles" / "h200x16.yaml"


def one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("command", ["up", "plan", "generate", "openapi"])
def test_a_profile_that_is_not_yaml_is_one_line_and_exit_2(command, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools:\n  fast: [1, 2\n  deep: 3\n")
    extra = ["hi"] if command == "generate" else []
    assert main([command, *extra, "--config", str(bad)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"refused: {bad}: not valid YAML (")
    assert "line 3 column 7" in line


@pytest.fixture
def no_ray(monkeypatch):
    """`up` without Ray: no signal handlers left behind, no app built, no drain."""
    import signal

    import cluster.app
    import cluster.cli

    drained = []
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    monkeypatch.setattr(cluster.app, "build_app", lambda settings: "app")
    monkeypatch.setattr(cluster.cli, "_drain", lambda *args, **kw: drained.append(args))
    return drained


@pytest.mark.parametrize("address, drained", [([], 1), (["--address", "10.0.0.1:6379"], 0)])
def test_up_whose_replicas_cannot_start_says_why_and_exits_1(no_ray, monkeypatch, capsys,
                                                            address, drained):
    """On its own Ray, what did start is removed; on a cluster joined, an app of that name may
    still serve its earlier version, and stays."""
    import ray
    from ray import serve

    def fail(app, name, route_prefix):  # what Serve's client raises on DEPLOY_FAILED
        raise RuntimeError(f"Deploying application {name} failed: Failed to update the "
                           "deployments ['PrefillWorker_fast'].")

    monkeypatch.setattr(ray, "init", lambda **kw: None)
    monkeypatch.setattr(serve, "start", lambda **kw: None)
    monkeypatch.setattr(serve, "run", fail)
    assert main(["up", *address]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("deploy failed: Deploying application small4 failed: Failed to "
                           "update the deployments ['PrefillWorker_fast'].")
    assert len(no_ray) == drained


def test_up_lets_other_errors_of_serve_run_through(no_ray, monkeypatch):
    """Only Serve's deploy failure is caught: a bug elsewhere keeps its traceback."""
    import ray
    from ray import serve

    def bug(*args, **kw):
        raise KeyError("bug")

    monkeypatch.setattr(ray, "init", lambda **kw: None)
    monkeypatch.setattr(serve, "start", lambda **kw: None)
    monkeypatch.setattr(serve, "run", bug)
    with pytest.raises(KeyError):
        main(["up", "--address", "10.0.0.1:6379"])


def invalid_address(address=None, **kw):  # ray._private.services.canonicalize_bootstrap_address
    raise ValueError(f"Invalid address format: {address}")


@pytest.mark.parametrize("command", [["up"], ["status"], ["scale", "fast", "prefill", "2"],
                                     ["release", "fast", "prefill"]])
def test_an_address_that_is_not_host_port_is_one_line_and_exit_2(command, no_ray, monkeypatch,
                                                                 capsys):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", invalid_address)
    assert main([*command, "--address", "10.0.0.1"]) == 2
    assert one_line(capsys.readouterr().err) == \
        "refused: --address 10.0.0.1: Invalid address format: 10.0.0.1"


@pytest.fixture
def connected(monkeypatch):
    """A CLI that believes it joined a cluster whose Serve has no application."""
    import cluster.cli
    from ray import serve
    from ray.serve.schema import ServeStatus

    from autoscaling import control

    monkeypatch.setattr(cluster.cli, "_connect", lambda address: True)
    monkeypatch.setattr(serve, "status", lambda: ServeStatus())
    monkeypatch.setattr(control, "read_status", lambda app: {})
    return control


def serving(body: bytes, status: int = 200) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("page, status, why", [
    (b"404 page not found", 404, "answered HTTP 404, not metrics"),
    (b'{"status": "success", "data": []}', 200, "is not a Prometheus endpoint (Invalid labels"),
    (b"<html><body>Grafana</body></html>", 200, "is not a Prometheus endpoint (invalid metric")])
def test_status_with_a_metrics_url_that_is_not_prometheus_says_so_and_exits_2(
        page, status, why, connected, capsys):
    metrics, ready = serving(page, status), serving(b'{"ready": true}')
    try:
        code = main(["status", "--metrics-url", f"http://127.0.0.1:{metrics.server_port}/",
                     "--url", f"http://127.0.0.1:{ready.server_port}"])
    finally:
        for server in (metrics, ready):
            server.shutdown()
            server.server_close()
    assert code == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"--metrics-url http://127.0.0.1:{metrics.server_port}/ {why}")


def test_status_with_a_malformed_metrics_url_says_so_and_exits_2(connected, capsys):
    ready = serving(b'{"ready": true}')
    try:
        code = main(["status", "--metrics-url", "http://[::1",
                     "--url", f"http://127.0.0.1:{ready.server_port}"])
    finally:
        ready.shutdown()
        ready.server_close()
    assert code == 2
    assert one_line(capsys.readouterr().err).startswith("--metrics-url http://[::1 did not")


def test_the_node_endpoints_cache_view_lists_a_non_prometheus_page_with_the_silent_ones():
    from cluster.cli import cache_view

    server = serving(b'{"status": "success", "data": []}')
    try:
        view = cache_view([f"http://127.0.0.1:{server.server_port}/metrics"])
    finally:
        server.shutdown()
        server.server_close()
    assert "is not a Prometheus endpoint" in view


def test_generate_with_a_missing_checkpoint_is_one_line_and_exit_1(capsys, tmp_path):
    profile = tmp_path / "ckpt.yaml"
    profile.write_text(yaml.safe_dump({"auth": {"enabled": False}, "model": {
        "source": "checkpoint", "path": str(tmp_path / "gone")}}))
    assert main(["generate", "hi", "--config", str(profile)]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("the stack could not start: ") and str(tmp_path / "gone") in line


def test_generate_without_sglang_names_the_extra_and_exits_1(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "sglang", None)  # `import sglang` fails, installed or not
    from services.tokenizer import standin_tokenizer_path

    data = yaml.safe_load(H200.read_text()) | {"auth": {"enabled": False}}
    checkpoint = tmp_path / "model"  # mounted (a missing one is refused first, by name)
    checkpoint.mkdir()
    (checkpoint / "tekken.json").write_bytes(standin_tokenizer_path().read_bytes())
    data["model"] = data["model"] | {"path": str(checkpoint)}
    profile = tmp_path / "sglang.yaml"
    profile.write_text(yaml.safe_dump(data))
    assert main(["generate", "hi", "--config", str(profile)]) == 1
    assert one_line(capsys.readouterr().err) == ("the stack could not start: engine.kind sglang "
                                                 "needs the 'sglang' extra on a GPU host "
                                                 "(pip install '.[sglang]')")


def test_release_of_a_name_not_in_the_stack_names_the_valid_ones(connected, monkeypatch,
                                                                 capsys):
    cleared = []
    monkeypatch.setattr(connected, "read_overrides", lambda app: {("fast", "decode"): 3})
    monkeypatch.setattr(connected, "read_status",
                        lambda app: {("fast", "prefill"): {}, ("deep", "decode"): {}})
    monkeypatch.setattr(connected, "clear_override",
                        lambda app, pool, role: cleared.append((pool, role)) or True)
    assert main(["release", "fsat", "decode"]) == 2
    assert one_line(capsys.readouterr().err) == (
        "fsat/decode is neither pinned nor autoscaled in small4; those that are: deep/decode, "
        "fast/decode, fast/prefill")
    assert cleared == [], "the real pin stays, and the user knows"
    assert main(["release", "fast", "decode"]) == 0
    assert "released to the policy" in capsys.readouterr().out and cleared == [("fast", "decode")]


def test_release_when_nothing_is_pinned_or_autoscaled_is_refused(connected, monkeypatch, capsys):
    monkeypatch.setattr(connected, "read_overrides", lambda app: {})
    monkeypatch.setattr(connected, "clear_override", lambda *args: pytest.fail("cleared"))
    assert main(["release", "fast", "prefill", "--app", "smal4"]) == 2
    assert one_line(capsys.readouterr().err) == \
        "fast/prefill is neither pinned nor autoscaled in smal4; none is: nothing to release"


def test_status_gives_up_on_a_controller_that_does_not_answer(connected, monkeypatch, capsys):
    from ray import serve

    release = threading.Event()
    monkeypatch.setattr(serve, "status", lambda: release.wait(60))  # Ray's ray.get, no timeout
    try:
        assert main(["status", "--timeout", "0.2"]) == 1
    finally:
        release.set()
    assert one_line(capsys.readouterr().err) == ("Serve's controller did not answer within "
                                                 "0.2 s (busy, or gone); --timeout waits longer")


def test_status_passes_on_what_serve_status_raises(connected, monkeypatch):
    from ray import serve

    def gone():
        raise ConnectionError("controller gone")

    monkeypatch.setattr(serve, "status", gone)
    with pytest.raises(ConnectionError, match="controller gone"):
        main(["status", "--timeout", "5"])


def test_status_refuses_a_timeout_that_is_not_positive(capsys):
    assert main(["status", "--timeout", "0"]) == 2
    assert one_line(capsys.readouterr().err) == "--timeout must be positive"


@pytest.mark.parametrize("apps, app, code, says", [
    ({}, "small4", 1, "no application 'small4' in Serve (applications: none)"),
    ({"small4": "RUNNING"}, "smal4", 1, "no application 'smal4' in Serve (applications: small4)"),
    ({"small4": "DEPLOY_FAILED"}, "small4", 1, "application 'small4' is DEPLOY_FAILED"),
    ({"small4": "RUNNING"}, "small4", 0, ""),
])
def test_status_exits_non_zero_unless_the_application_asked_for_runs(
        apps, app, code, says, connected, monkeypatch, capsys):
    """A redeploy that failed still answers /ready from the old version, and a mistyped --app
    found nothing: both exited 0."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus, ApplicationStatusOverview, ServeStatus

    monkeypatch.setattr(serve, "status", lambda: ServeStatus(applications={
        name: ApplicationStatusOverview(status=ApplicationStatus(state), message="",
                                        last_deployed_time_s=0.0, deployments={})
        for name, state in apps.items()}))
    ready = serving(b'{"ready": true}')
    try:
        assert main(["status", "--app", app, "--url",
                     f"http://127.0.0.1:{ready.server_port}"]) == code
    finally:
        ready.shutdown()
        ready.server_close()
    err = capsys.readouterr().err
    assert says in err if says else "no application" not in err


def test_generate_answers_with_a_profile_whose_keys_guard_a_socket(capsys, tmp_path):
    """`generate` runs the stack in its own process, on no socket: a profile with API keys
    (production's, whose keys file is not on this machine) answered 401, or failed to start."""
    profile = tmp_path / "keyed.yaml"
    profile.write_text(yaml.safe_dump({"auth": {"enabled": True, "keys_file": str(
        tmp_path / "absent.yaml")}, "engine": {"kind": "simulated"}}))
    assert main(["generate", "hi", "--config", str(profile), "--max-tokens", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["choices"][0]["finish_reason"]
