"""GPU topology: from settings (nodes, GPUs per node, tensor parallel, engines per pool and role)
to engine placements and the Ray placement-group options of each deployment.

An engine is one prefill or decode replica holding `tensor_parallel` GPUs of one node. Engines are
packed first-fit, `gpus_per_node // tensor_parallel` per node. Every prefill engine serves its KV
from a bootstrap port fixed before launch: each pool's prefill role owns one port per replica it
may ever have (`max_replicas`), consecutive from `bootstrap_port_base` in pool order, and replica
rank r binds its pool's r-th port (`services.engines.bootstrap_port`). No two engines of the
cluster share a port, whatever node Ray puts them on, and the whole range is checked against the
other services' ports at load time. A profile that does not fit is refused naming the problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field

from services.settings import DeploymentSettings, PoolSettings, RoleSettings, Strict

RAY_PORTS = {6379: "the Ray GCS", 8265: "the Ray dashboard", 10001: "the Ray client server",
             52365: "the Ray dashboard agent"}


class TopologySettings(Strict):
    """The GPU cluster the engines are placed on."""

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    tensor_parallel: int = Field(1, ge=1)
    bootstrap_port_base: int = Field(8998, gt=1024, lt=65000)

    @property
    def engines_per_node(self) -> int:
        return self.gpus_per_node // self.tensor_parallel


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


def bootstrap_ports(pools: dict[str, PoolSettings],
                    topology: TopologySettings) -> dict[str, list[int]]:
    """Each GPU pool's prefill ports: one per replica the role may ever have, in pool order."""
    ports, first = {}, topology.bootstrap_port_base
    for name, pool in pools.items():
        if pool.prefill.num_gpus > 0:
            ports[name] = list(range(first, first + pool.prefill.highest))
            first += pool.prefill.highest
    return ports


def check_ports(ports: dict[str, list[int]], taken: dict[int, str]) -> None:
    """Refuse a bootstrap port range that holds another service's port or leaves the port space."""
    every = sorted(p for pool in ports.values() for p in pool)
    if not every:
        return
    span = f"bootstrap ports {every[0]}-{every[-1]}"
    if every[-1] > 65535:
        raise TopologyError(f"{span} run past 65535: lower topology.bootstrap_port_base")
    clash = sorted((p, what) for p, what in taken.items() if every[0] <= p <= every[-1])
    if clash:
        raise TopologyError(f"{span} include port {clash[0][0]}, used by {clash[0][1]}")


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
    ports = bootstrap_ports(pools, topology)
    check_ports(ports, {**RAY_PORTS, **taken_ports})
    return [EnginePlacement(pool, role, replica, node=k // per_node,
                            gpus=tuple(range((k % per_node) * tp, (k % per_node + 1) * tp)),
                            bootstrap_port=ports[pool][replica] if role == "prefill" else None)
            for k, (pool, role, replica) in enumerate(engines)]


def deployment_options(role: DeploymentSettings, max_ongoing: int | None = None
                       ) -> dict[str, Any]:
    """Serve options of a deployment: replicas, resources, and for GPU engines one STRICT_PACK
    placement group holding all of an engine's GPUs (so they share a node). `max_ongoing`:
    the cap, where the caller derives it (a role's default depends on its engine)."""
    options: dict[str, Any] = {
        "num_replicas": role.replicas,
        "max_ongoing_requests": max_ongoing or role.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": role.num_cpus, "num_gpus": role.num_gpus},
        "graceful_shutdown_timeout_s": role.drain_deadline_s,
        "graceful_shutdown_wait_loop_s": 1.0}
    if role.num_gpus > 0:
        options["placement_group_bundles"] = [{"CPU": role.num_cpus, "GPU": role.num_gpus}]
        options["placement_group_strategy"] = "STRICT_PACK"
    return options
