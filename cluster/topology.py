"""GPU topology: from settings (nodes, GPUs per node, tensor parallel, engines per pool and role)
to engine placements and the Ray placement-group options of each deployment.

An engine is one prefill or decode replica holding `tensor_parallel` GPUs of one node. Engines are
packed first-fit, `gpus_per_node // tensor_parallel` per node. Each prefill engine on a node needs
its own KV bootstrap port: a replica takes a free port in `[bootstrap_port_base,
bootstrap_port_base + engines per node)` when it starts (Ray decides which node it lands on),
so that range must hold no other service's port. A profile that does not fit is refused with a
message naming the problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field

from services.settings import DeploymentSettings, PoolSettings, RoleSettings, Strict

RAY_PORTS = {6379: "the Ray GCS", 8080: "Ray's metrics export", 8265: "the Ray dashboard",
             10001: "the Ray client server"}


class TopologySettings(Strict):
    """The GPU cluster the engines are placed on."""

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    tensor_parallel: int = Field(1, ge=1)
    bootstrap_port_base: int = Field(8998, gt=1024, lt=65000)

    @property
    def engines_per_node(self) -> int:
        return self.gpus_per_node // self.tensor_parallel

    def bootstrap_ports(self) -> list[int]:
        return list(range(self.bootstrap_port_base,
                          self.bootstrap_port_base + max(self.engines_per_node, 1)))


class TopologyError(ValueError):
    """A profile's engines do not fit its GPUs, or its ports collide."""


@dataclass(frozen=True)
class EnginePlacement:
    """Where one engine runs: node index, GPU indices on that node, its bootstrap port slot."""

    pool: str
    role: str
    replica: int
    node: int
    gpus: tuple[int, ...]
    bootstrap_port: int | None


def gpu_engines(pools: dict[str, PoolSettings], topology: TopologySettings) -> list[tuple]:
    """(pool, role, replica) of every engine that holds GPUs, checking each holds one TP group."""
    engines = []
    for name, pool in pools.items():
        for role_name in ("prefill", "decode"):
            role: RoleSettings = getattr(pool, role_name)
            if role.num_gpus == 0:
                continue
            if role.num_gpus != topology.tensor_parallel:
                raise TopologyError(
                    f"pools.{name}.{role_name}.num_gpus is {role.num_gpus:g}, but an engine at "
                    f"tensor_parallel {topology.tensor_parallel} holds exactly "
                    f"{topology.tensor_parallel} GPUs")
            engines += [(name, role_name, i) for i in range(role.replicas)]
    return engines


def plan_engines(pools: dict[str, PoolSettings], topology: TopologySettings,
                 taken_ports: dict[int, str]) -> list[EnginePlacement]:
    """Pack every GPU engine onto the nodes, or raise `TopologyError` saying why it cannot."""
    engines = gpu_engines(pools, topology)
    if not engines:
        return []
    tp, per_node = topology.tensor_parallel, topology.engines_per_node
    if per_node == 0:
        raise TopologyError(f"tensor_parallel {tp} does not fit a node of "
                            f"{topology.gpus_per_node} GPUs")
    capacity = per_node * topology.nodes
    if len(engines) > capacity:
        raise TopologyError(
            f"{len(engines)} engines at tensor_parallel {tp} need {len(engines) * tp} GPUs; the "
            f"cluster has {topology.nodes} x {topology.gpus_per_node} = "
            f"{topology.nodes * topology.gpus_per_node} ({capacity} engines)")
    clash = {p: what for p, what in ({**RAY_PORTS, **taken_ports}).items()
             if p in topology.bootstrap_ports()}
    if clash:
        port, what = sorted(clash.items())[0]
        raise TopologyError(f"bootstrap ports {topology.bootstrap_ports()[0]}-"
                            f"{topology.bootstrap_ports()[-1]} include port {port}, used by {what}")
    return [EnginePlacement(pool, role, replica, node=k // per_node,
                            gpus=tuple(range((k % per_node) * tp, (k % per_node + 1) * tp)),
                            bootstrap_port=topology.bootstrap_ports()[k % per_node]
                            if role == "prefill" else None)
            for k, (pool, role, replica) in enumerate(engines)]


def deployment_options(role: DeploymentSettings) -> dict[str, Any]:
    """Serve options of a deployment: replicas, resources, and for GPU engines one STRICT_PACK
    placement group holding all of an engine's GPUs (so they share a node)."""
    options: dict[str, Any] = {
        "num_replicas": role.replicas, "max_ongoing_requests": role.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": role.num_cpus, "num_gpus": role.num_gpus},
        "graceful_shutdown_timeout_s": role.drain_deadline_s,
        "graceful_shutdown_wait_loop_s": 1.0}
    if role.num_gpus > 0:
        options["placement_group_bundles"] = [{"CPU": role.num_cpus, "GPU": role.num_gpus}]
        options["placement_group_strategy"] = "STRICT_PACK"
    return options
