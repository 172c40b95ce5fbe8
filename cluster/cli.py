"""`small4`: run the stack (`up`), inspect it (`status`), scale a pool's role by hand (`scale`,
`release`), answer one prompt in-process (`generate`), print the served OpenAPI document
(`openapi`), show a profile's placement (`plan`), or plan capacity for traffic (`simulate`)."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import sys
import threading
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray must never phone home
os.environ.setdefault("HF_HUB_OFFLINE", "1")
EDGE_CALLBACK = "services.guard.http_edge:install"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="small4", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start Ray (or join one), deploy the profile, serve HTTP")
    up.add_argument("--config", help="settings YAML (default: the embedded local profile)")
    up.add_argument("--port", type=int, help="HTTP port (default from the profile)")
    up.add_argument("--address", help="join this Ray cluster instead of starting one")
    status = sub.add_parser("status", help="replicas, queue, KV use and SLO attainment per "
                            "pool and role, and readiness")
    status.add_argument("--address", default="auto")
    status.add_argument("--app", default=None, help="Serve application (default: small4)")
    status.add_argument("--url", default="http://127.0.0.1:8000")
    status.add_argument("--metrics-url", default=None, help="Ray's Prometheus endpoint "
                        "(default: this node's), for the prefix-cache table")
    status.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for "
                        "Serve's controller to answer (default: 30)")
    scale = sub.add_parser("scale", help="pin POOL's ROLE at N replicas until `release`")
    release = sub.add_parser("release", help="hand POOL's ROLE back to the autoscaling policy")
    for command in (scale, release):
        command.add_argument("pool")
        command.add_argument("role", choices=("prefill", "decode"))
        if command is scale:
            command.add_argument("replicas", type=int)
        command.add_argument("--address", default="auto")
        command.add_argument("--app", default=None, help="Serve application (default: small4)")
    gen = sub.add_parser("generate", help="answer one prompt through prefill → KV → decode")
    gen.add_argument("prompt")
    gen.add_argument("--config")
    gen.add_argument("--effort", default=None)
    gen.add_argument("--max-tokens", type=int, default=32)
    spec = sub.add_parser("openapi", help="print the OpenAPI spec a profile serves (no stack "
                          "needed; the running ingress serves it keyed at /openapi.json)")
    spec.add_argument("--config")
    plan = sub.add_parser("plan", help="what a profile will launch: per engine its node, GPUs, "
                          "bootstrap port and SGLang arguments; or why it is refused")
    plan.add_argument("--config", help="settings YAML (default: the embedded local profile)")
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")
    simulate = sub.add_parser("simulate", help="capacity planner: replay traffic through the "
                              "cluster simulator under each autoscaling policy; the smallest "
                              "budget and split that meet the SLOs")
    from cluster.simulate import add_arguments as simulate_arguments

    simulate_arguments(simulate)
    args = parser.parse_args(argv)
    commands = {"up": cmd_up, "status": cmd_status, "scale": cmd_scale, "release": cmd_release,
                "generate": cmd_generate, "openapi": cmd_openapi, "plan": cmd_plan,
                "simulate": cmd_simulate}
    try:
        return commands[args.command](args)
    except _Refused as refused:
        print(f"refused: {refused}", file=sys.stderr)
        return 2


def _settings(args, serve_app: bool = False):
    """The profile `--config` names (or the embedded one), with `up`'s `--port`; a bad or
    missing file, or (`serve_app`) one a Serve app cannot run, is one line on stderr and exit
    code 2, not a traceback."""
    import yaml

    from cluster.settings import SettingsError, load_settings, parse_settings, require_serve_app

    try:
        settings = load_settings(args.config)
        if getattr(args, "port", None) is not None:  # checked as the profile's port is
            data = settings.model_dump(mode="json")
            settings = parse_settings(data | {"http": data["http"] | {"port": args.port}})
        return require_serve_app(settings) if serve_app else settings
    except (SettingsError, ValueError, OSError) as exc:
        raise _Refused(str(exc)) from None
    except yaml.YAMLError as exc:
        raise _Refused(f"{args.config}: not valid YAML ({_yaml_problem(exc)})") from None


def _yaml_problem(exc) -> str:
    """PyYAML's multi-line report (context, problem, excerpt with a caret) as one line."""
    mark = getattr(exc, "problem_mark", None)
    if mark is None or not getattr(exc, "problem", None):
        return " ".join(str(exc).split())
    context = f"{exc.context}: " if getattr(exc, "context", None) else ""
    return f"{context}{exc.problem}, line {mark.line + 1} column {mark.column + 1}"


class _Refused(Exception):
    """A command refused before it started (`main` prints it, exit code 2)."""


def cmd_up(args) -> int:
    """Start (or join) Ray, deploy, serve; on SIGTERM or Ctrl-C drain and exit 0."""
    settings = _settings(args, serve_app=True)
    port = settings.http.port
    if settings.ray.throughput_optimized and not args.address:
        # Read when `ray.serve` is first imported (the handles' transport) and by the
        # processes Ray starts: set before both.
        os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    import ray
    from ray import serve

    from cluster.app import APP_NAME, build_app

    if args.address:
        try:
            ray.init(address=args.address)
        except ConnectionError as exc:
            print(f"no Ray cluster at {args.address}: {exc}", file=sys.stderr)
            return 1
        except ValueError as exc:  # Ray's "Invalid address format": not host:port
            raise _Refused(f"--address {args.address}: {exc}") from None
        metrics = None
    else:
        # Serve's HTTP proxy bounds request heads and answers in our error shape (read by
        # the proxy when it starts, so it must be in the environment Ray starts with).
        os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", EDGE_CALLBACK)
        # ... and cuts a response its client stopped reading, after the stack's own bound
        os.environ.setdefault("SMALL4_WRITE_STALL_S", repr(settings.limits.write_stall_s))
        # ... and bounds the request bodies it holds for requests not yet answered
        os.environ.setdefault("SMALL4_MAX_BODY_BYTES", str(settings.limits.max_body_bytes))
        os.environ.setdefault("SMALL4_EDGE_BODY_BUDGET_BYTES",
                              str(settings.limits.edge_body_budget_bytes))
        # ... and refuses a request without a key before its body, with this profile's keys
        # (never a file left in the environment: it would refuse keys the ingress takes)
        for name in ("SMALL4_KEYS_FILE", "SMALL4_KEYS_RELOAD_S", "SMALL4_CORS_ORIGINS"):
            os.environ.pop(name, None)
        if settings.auth.enabled:
            os.environ["SMALL4_KEYS_FILE"] = str(settings.auth.keys_file.resolve())
            os.environ["SMALL4_KEYS_RELOAD_S"] = repr(settings.auth.reload_s)
            os.environ["SMALL4_CORS_ORIGINS"] = json.dumps(settings.auth.cors_origins)
        # ... and the replicas take a call as large as the stack's limits allow
        from cluster.settings import REPLICA_MESSAGE_BYTES

        os.environ.setdefault("RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH",
                              str(REPLICA_MESSAGE_BYTES))
        ray.init(num_cpus=settings.ray.num_cpus, include_dashboard=False,
                 object_store_memory=settings.ray.object_store_mb * 1024 * 1024,
                 _node_ip_address=settings.ray.node_ip,
                 _metrics_export_port=settings.ray.metrics_port)
        metrics = f"http://{_host(settings.ray.node_ip)}:{settings.ray.metrics_port}/metrics"
    # After ray.init, which installs a SIGTERM handler of its own (exit with the signal number).
    # While deploying, a signal stops the deploy (Serve waits for the app without a deadline:
    # a replica that can never be placed would hold the process for ever); once serving, it
    # starts the drain below.
    stop, serving = threading.Event(), threading.Event()

    def on_signal(signum, _frame):
        if not serving.is_set():
            raise _Interrupted(signum)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    print(f"deploying {settings.profile} (Ctrl-C stops)", flush=True)
    failed = None
    try:
        serve.start(http_options={"host": settings.http.host, "port": port})
        app = build_app(settings)
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # Serve's "Deploying application ... failed: <why>"
            failed = " ".join(str(exc).split())
    except _Interrupted as interrupted:
        print("interrupted while deploying: stopping", flush=True)
        _drain(APP_NAME, settings.drain_s(), owns_ray=not args.address)
        return 128 + interrupted.signum
    if failed is not None:  # a replica that cannot start: say why
        print(f"deploy failed: {failed} (the replicas' errors are in Serve's controller log)",
              file=sys.stderr, flush=True)
        if not args.address:  # our own Ray: remove what did start. On a cluster joined, an
            # app of that name may still serve its earlier version: it stays
            _drain(APP_NAME, settings.drain_s(), owns_ray=True)
        return 1
    serving.set()
    base = f"http://{_host(settings.http.host)}:{port}"
    print(f"small4 ({settings.profile}, engine {settings.engine.kind}) serving {base}/v1",
          flush=True)
    if metrics:
        print(f"metrics (Prometheus): {metrics}", flush=True)
    while not stop.wait(1.0):
        pass
    print(f"draining: open requests get up to {settings.drain_s():g} s", flush=True)
    _drain(APP_NAME, settings.drain_s(), owns_ray=not args.address)
    print("stopped", flush=True)
    return 0


class _Interrupted(BaseException):
    """A signal that arrived while the app was still deploying."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _drain(app: str, timeout_s: float, *, owns_ray: bool) -> None:
    """Delete the app (Serve lets each replica finish its open requests), then stop what
    this process started. A second signal during the drain is ignored: the drain has a
    deadline of its own."""
    import ray
    from ray import serve

    from cluster.app import delete_app

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    done, gone = threading.Event(), []

    def delete() -> None:  # in a thread: a controller that stopped answering cannot hang us
        try:
            gone.append(delete_app(app, timeout_s))
        finally:
            done.set()

    threading.Thread(target=delete, daemon=True).start()
    if not (done.wait(timeout_s + 5) and gone == [True]):
        print(f"drain: {app} not gone after {timeout_s:g} s; stopping anyway", flush=True)
    if owns_ray:
        serve.shutdown()
        ray.shutdown()


def _connect(address: str) -> bool:
    """Join the Ray cluster at `address` (a no-op when this process is already in one); False
    when none answers there, `_Refused` when `address` is not one."""
    import ray

    if ray.is_initialized():
        return True
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except ConnectionError as exc:
        print(f"no Ray cluster at {address}: {exc}", file=sys.stderr)
        return False
    except ValueError as exc:  # Ray's "Invalid address format": not host:port
        raise _Refused(f"--address {address}: {exc}") from None
    return True


def _app(args) -> str:
    from cluster.app import APP_NAME

    return args.app or APP_NAME


def cmd_scale(args) -> int:
    from autoscaling import control

    if args.replicas < 0:
        print("replicas must be 0 or more", file=sys.stderr)
        return 2
    if not _connect(args.address):
        return 1
    app, key = _app(args), (args.pool, args.role)
    known = control.fresh(control.read_status(app))  # roles whose policy runs now
    if known and key not in known:
        print(f"{args.pool}/{args.role} is not autoscaled in {app}; autoscaled: "
              f"{', '.join('/'.join(k) for k in sorted(known))}", file=sys.stderr)
        return 2
    if key in known and not known[key]["min"] <= args.replicas <= known[key]["max"]:
        print(f"{args.pool}/{args.role} scales between {known[key]['min']} and "
              f"{known[key]['max']} replicas; got {args.replicas}", file=sys.stderr)
        return 2
    if not known:
        print(f"no autoscaled role has reported in {app} in the last "
              f"{control.FRESH_S:g} s (autoscaling off, or its policy has not run yet): "
              "nothing to pin", file=sys.stderr)
        return 2
    # the controller refuses a new pin that does not fit the budget (reported by `status`):
    # refuse one that cannot fit even at the other roles' minimums here, where ops see it
    pins = {**control.read_overrides(app), key: args.replicas}
    status = known[key]
    need = status.get("fixed_engines", 0) + sum(pins.get(k, s["min"]) for k, s in known.items())
    if need > status["budget"]:
        print(f"{args.pool}/{args.role} at {args.replicas}: the pins and the other roles' "
              f"minimums would need {need} engines; the budget is {status['budget']}",
              file=sys.stderr)
        return 2
    control.set_override(app, args.pool, args.role, args.replicas)
    print(f"{app}: {args.pool}/{args.role} pinned at {args.replicas} replicas until "
          f"`small4 release {args.pool} {args.role}`")
    return 0


def cmd_release(args) -> int:
    """Release a pin. A name that is neither pinned nor autoscaled (a typo) is refused, naming
    those that are: "had no override" would leave the real pin in place unnoticed."""
    from autoscaling import control

    if not _connect(args.address):
        return 1
    app, key = _app(args), (args.pool, args.role)
    valid = set(control.read_overrides(app)) | set(control.read_status(app))
    if key not in valid:
        print(f"{args.pool}/{args.role} is neither pinned nor autoscaled in {app}; " + (
            f"those that are: {', '.join('/'.join(k) for k in sorted(valid))}" if valid
            else "none is: nothing to release"), file=sys.stderr)
        return 2
    had = control.clear_override(app, args.pool, args.role)
    print(f"{app}: {args.pool}/{args.role} "
          f"{'released to the policy' if had else 'had no override'}")
    return 0


def cmd_status(args) -> int:
    import httpx
    from ray import serve

    from autoscaling import control

    if not args.timeout > 0:  # (NaN too)
        print("--timeout must be positive", file=sys.stderr)
        return 2
    if not _connect(args.address):
        return 1
    try:  # Ray waits on its controller without a deadline: a stuck one would hang us
        serve_status = _within(args.timeout, serve.status)
    except TimeoutError:
        print(f"Serve's controller did not answer within {args.timeout:g} s (busy, or gone); "
              "--timeout waits longer", file=sys.stderr)
        return 1
    for app_name, app in serve_status.applications.items():
        print(f"application {app_name}: {_name(app.status)}")
        for name, dep in app.deployments.items():
            replicas = ", ".join(f"{n} {_name(s)}" for s, n in dep.replica_states.items())
            print(f"  {name:16s} {_name(dep.status):10s} {replicas}")
    # the exit code says whether the application asked for is running: one whose redeploy
    # failed still answers /ready from its old version, and a mistyped --app is no success
    mine = serve_status.applications.get(_app(args))
    problem = (f"no application {_app(args)!r} in Serve (applications: "
               f"{', '.join(serve_status.applications) or 'none'})" if mine is None
               else None if _name(mine.status) == "RUNNING"
               else f"application {_app(args)!r} is {_name(mine.status)}")
    print(status_table(control.read_status(_app(args))))
    bad_metrics = None
    if args.metrics_url is not None:  # the user's own URL: one that gives no metrics is theirs
        rows, bad_metrics = _cache_rows(args.metrics_url)
        if bad_metrics is None:
            from cluster.cache_status import cache_table

            print(cache_table(rows))
        else:
            print(f"--metrics-url {bad_metrics.removeprefix('prefix cache: ')}", file=sys.stderr)
    else:
        print(_cache_view())
    try:
        ready = httpx.get(f"{args.url}/ready", timeout=10).json()
        print(json.dumps(ready, indent=2))
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:  # no answer, not our JSON
        print(f"ingress at {args.url} did not answer: {exc}", file=sys.stderr)
        return 1
    if bad_metrics is not None:
        return 2
    if problem is not None or not ready.get("ready"):
        print(problem or f"ingress at {args.url} is not ready", file=sys.stderr)
        return 1
    return 0


def _within(timeout_s: float, call):
    """`call()`, or `TimeoutError` after `timeout_s`. It runs in a daemon thread: one stuck
    for good must not hold the process at exit (an executor's workers would)."""
    future = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(call())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future.result(timeout_s)


def _cache_view() -> str:
    """The prefix-cache table from Ray's Prometheus endpoints: every live node's (each reports
    the replicas it hosts; the head, where this runs on a cluster, hosts none)."""
    try:
        import ray

        urls = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
                for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]
    except Exception as exc:  # an older or remote driver: say so, show the rest
        return f"prefix cache: no metrics endpoint known ({type(exc).__name__}); --metrics-url"
    return cache_view(urls)


def cache_view(urls: list[str]) -> str:
    """One table of the replicas every endpoint in `urls` reports, and which did not answer."""
    from cluster.cache_status import cache_table

    rows, silent = {}, []
    for url in urls:
        found, problem = _cache_rows(url)
        rows |= found
        if problem:
            silent.append(problem)
    return "\n".join([cache_table(rows), *silent]) if rows or not silent else "\n".join(silent)


def _cache_rows(url: str) -> tuple[dict, str | None]:
    """The replicas `url` reports, or none and why: no answer, an error status, or a page
    that is not Prometheus text (a 404 page, JSON: the parser raises `ValueError`)."""
    import httpx

    from cluster.cache_status import cache_rows

    try:
        response = httpx.get(url, timeout=10)
        if response.status_code != 200:
            return {}, f"prefix cache: {url} answered HTTP {response.status_code}, not metrics"
        return cache_rows(response.text), None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        return {}, f"prefix cache: {url} did not answer ({type(exc).__name__})"
    except ValueError as exc:
        return {}, f"prefix cache: {url} is not a Prometheus endpoint ({_clip(str(exc))})"


def _clip(text: str, limit: int = 80) -> str:
    """`text` on one line, cut at `limit` characters (a parser's error quotes the whole line,
    which on a JSON page is the whole page)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def status_table(rows: dict, now: float | None = None) -> str:
    """The autoscaling view: one line per autoscaled pool and role (one whose policy stopped
    publishing flagged: its figures are old)."""
    from autoscaling.control import FRESH_S, fresh

    if not rows:
        return "autoscaling: no autoscaled role has reported"
    now = time.time() if now is None else now
    live = fresh(rows, now)
    head = (f"{'pool/role':16s} {'replicas':>8s} {'target':>6s} {'wish':>4s} {'queue':>5s} "
            f"{'running':>7s} {'kv use':>7s} {'p90 s':>7s} {'slo s':>6s} {'slo met':>7s} "
            f"{'report':>6s} override")
    lines = [head]
    for (pool, role), r in sorted(rows.items()):
        kv = f"{100 * r['kv_used'] / r['kv_capacity']:.1f}%" if r.get("kv_capacity") else "-"
        p90 = f"{r['latency_p90_s']:.3f}" if r.get("latency_p90_s") is not None else "-"
        met = f"{100 * r['slo_attainment']:.1f}%" if r.get("slo_attainment") is not None else "-"
        pinned = "-" if r.get("override") is None else str(r["override"])
        # how old the stalest replica's load report was when the policy last decided
        age = f"{r['report_age_s']:.1f}s" if r.get("report_age_s") is not None else "-"
        lines.append(f"{pool + '/' + role:16s} {r['replicas']:>8d} {r['target']:>6d} "
                     f"{r['wish']:>4d} {r['queued']:>5d} {r['running']:>7d} {kv:>7s} {p90:>7s} "
                     f"{r['slo_s']:>6.3f} {met:>7s} {age:>6s} {pinned}")
        if r.get("error"):
            lines.append(f"  ! {r['error']}")
        if (pool, role) not in live:
            lines.append(f"  ! no report for {now - r.get('at', 0.0):.0f} s (over {FRESH_S:g}): "
                         "its policy is not running (autoscaling off, the role gone, or its "
                         "replicas' reports missing); these figures are old")
    return "\n".join(lines)


def _name(state) -> str:
    return str(getattr(state, "value", state))


def cmd_plan(args) -> int:
    from cluster.plan import deploy_plan, plan_table
    from cluster.settings import SettingsError

    settings = _settings(args, serve_app=True)
    try:
        entries = deploy_plan(settings)
    except (SettingsError, ValueError, OSError) as exc:
        raise _Refused(str(exc)) from None
    print(json.dumps(entries, indent=2, default=str) if args.json
          else plan_table(settings, entries))
    return 0


def cmd_simulate(args) -> int:
    from cluster.simulate import run

    return run(args)


def cmd_openapi(args) -> int:
    from services.api import openapi

    print(json.dumps(openapi.build(_settings(args).ingress_settings()), indent=2))
    return 0


def cmd_generate(args) -> int:
    from starlette.testclient import TestClient

    from cluster.inprocess import build_inprocess

    settings = _settings(args)
    # in this process, on no socket: the profile's keys guard nothing here (and a production
    # profile's keys file is not on an operator's machine)
    settings = settings.model_copy(update={"auth": settings.auth.model_copy(update={
        "enabled": False})})
    try:  # the engines start here: a missing checkpoint or an engine that is not installed
        ingress = build_inprocess(settings)
    except (ValueError, OSError, RuntimeError, ImportError) as exc:
        print(f"the stack could not start: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    body = {"model": settings.model.name, "max_tokens": args.max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": args.prompt}]}
    if args.effort:
        body["reasoning_effort"] = args.effort
    with TestClient(ingress.build_asgi_app()) as client:
        reply = client.post("/v1/chat/completions", json=body)
    print(json.dumps(reply.json(), indent=2, ensure_ascii=False))
    return 0 if reply.status_code == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
