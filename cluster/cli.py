"""`small4`: run the stack locally (`up`), inspect it (`status`), or answer one prompt (`generate`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray must never phone home
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="small4", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start Ray (or join one), deploy the profile, serve HTTP")
    up.add_argument("--config", help="settings YAML (default: the embedded local profile)")
    up.add_argument("--port", type=int, help="HTTP port (default from the profile)")
    up.add_argument("--address", help="join this Ray cluster instead of starting one")
    status = sub.add_parser("status", help="deployments, replicas and pool health")
    status.add_argument("--address", default="auto")
    status.add_argument("--url", default="http://127.0.0.1:8000")
    gen = sub.add_parser("generate", help="answer one prompt through prefill → KV → decode")
    gen.add_argument("prompt")
    gen.add_argument("--config")
    gen.add_argument("--effort", default=None)
    gen.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    return {"up": cmd_up, "status": cmd_status, "generate": cmd_generate}[args.command](args)


def cmd_up(args) -> int:
    import ray
    from ray import serve

    from cluster.app import APP_NAME, build_app
    from cluster.settings import load_settings

    settings = load_settings(args.config)
    port = args.port or settings.http.port
    if args.address:
        ray.init(address=args.address)
    else:
        if settings.ray.throughput_optimized:  # read by Ray's processes when they start
            os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
        ray.init(num_cpus=settings.ray.num_cpus, include_dashboard=False,
                 object_store_memory=settings.ray.object_store_mb * 1024 * 1024)
    serve.start(http_options={"host": settings.http.host, "port": port})
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    base = f"http://{settings.http.host}:{port}"
    print(f"small4 ({settings.profile}, engine {settings.engine.kind}) serving {base}/v1",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
        ray.shutdown()
    return 0


def cmd_status(args) -> int:
    import httpx
    import ray
    from ray import serve

    try:
        ray.init(address=args.address, logging_level="ERROR")
    except ConnectionError as exc:
        print(f"no Ray cluster at {args.address}: {exc}", file=sys.stderr)
        return 1
    for app_name, app in serve.status().applications.items():
        print(f"application {app_name}: {_name(app.status)}")
        for name, dep in app.deployments.items():
            replicas = ", ".join(f"{n} {_name(s)}" for s, n in dep.replica_states.items())
            print(f"  {name:16s} {_name(dep.status):10s} {replicas}")
    try:
        ready = httpx.get(f"{args.url}/ready", timeout=10).json()
        print(json.dumps(ready, indent=2))
    except httpx.HTTPError as exc:
        print(f"ingress at {args.url} did not answer: {exc}", file=sys.stderr)
        return 1
    return 0 if ready.get("ready") else 2


def _name(state) -> str:
    return str(getattr(state, "value", state))


def cmd_generate(args) -> int:
    from starlette.testclient import TestClient

    from cluster.inprocess import build_inprocess
    from cluster.settings import load_settings

    settings = load_settings(args.config)
    ingress = build_inprocess(settings)
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
