"""`small4 plan`: what a profile will launch, for review before a deploy. Per GPU engine its
pool, role, replica, node, GPUs, KV bootstrap port and the SGLang arguments and environment it
starts with; a profile the stack would refuse is answered with the reason instead."""

from __future__ import annotations

from typing import Any

from cluster.settings import StackSettings
from cluster.topology import bootstrap_ports
from services.engines.sglang_args import engine_env, server_args
from services.telemetry.tracing import resolve as resolve_tracing

NODE_ADDRESS = "<node address>"  # known only once Ray has placed the replica


def deploy_plan(settings: StackSettings) -> list[dict[str, Any]]:
    """One entry per engine the profile starts (its starting replicas)."""
    entries = []
    for p in settings.placements():
        worker = settings.worker(p.pool)
        entry: dict[str, Any] = {"pool": p.pool, "role": p.role, "replica": p.replica,
                                 "node": p.node, "gpus": list(p.gpus),
                                 "bootstrap_port": p.bootstrap_port}
        if settings.engine.kind == "sglang":
            tracing = resolve_tracing(worker.telemetry.tracing)
            entry["sglang_args"] = server_args(
                worker.model, worker.engine, role=p.role, tp_size=worker.tensor_parallel,
                host=NODE_ADDRESS, bootstrap_port=p.bootstrap_port,
                otlp_endpoint=tracing and tracing.otlp_endpoint())
            # a collector's headers are its credentials: shown as set, never printed
            entry["env"] = {k: "<redacted>" if k.endswith("_HEADERS") else v
                            for k, v in engine_env(worker.model, worker.kv_handoff,
                                                   tracing).items()}
        entries.append(entry)
    return entries


def port_ranges(settings: StackSettings) -> dict[str, str]:
    """Each pool's prefill bootstrap ports, for every replica it may scale to."""
    return {pool: f"{ports[0]}-{ports[-1]}" for pool, ports in
            bootstrap_ports(settings.pools, settings.topology).items() if ports}


def plan_table(settings: StackSettings, entries: list[dict[str, Any]]) -> str:
    lines = [f"profile {settings.profile}: {len(entries)} GPU engines on "
             f"{settings.topology.nodes} x {settings.topology.gpus_per_node} GPUs, "
             f"engine {settings.engine.kind}"]
    for pool, span in port_ranges(settings).items():
        lines.append(f"  {pool} prefill bootstrap ports {span} (one per replica up to "
                     f"max_replicas {settings.pools[pool].prefill.highest})")
    lines.append(f"{'pool':<6} {'role':<8} {'replica':>7} {'node':>4} {'gpus':<8} {'port':>6}")
    for e in entries:
        port = e["bootstrap_port"] if e["bootstrap_port"] is not None else "-"
        gpus = ",".join(map(str, e["gpus"]))
        lines.append(f"{e['pool']:<6} {e['role']:<8} {e['replica']:>7} {e['node']:>4} "
                     f"{gpus:<8} {port:>6}")
        if "sglang_args" in e:
            args = " ".join(f"{k}={v}" for k, v in sorted(e["sglang_args"].items()))
            lines.append(f"    sglang: {args}")
            lines.append("    env: " + " ".join(f"{k}={v}" for k, v in sorted(e["env"].items())))
    return "\n".join(lines)
