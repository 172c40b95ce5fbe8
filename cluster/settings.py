"""The settings root: one YAML document (or the Helm values' `stack:` block), validated once.

Unknown keys anywhere are refused with `SettingsError` naming the key's path. The embedded default
profile (`profiles/local.yaml`) runs the whole stack on one CPU machine with the stand-in model.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from autoscaling.perf import PerfModel
from autoscaling.serve_policy import AutoscalingSettings
from cluster.topology import (RAY_PORTS, TopologyError, TopologySettings, bootstrap_ports,
                              deployment_options, gpu_engines, plan_engines)
from services.kv.backends import SEQUENTIAL
from services.settings import (EngineSettings, IngressSettings, KVHandoffSettings,
                               ModelSettings, MultimodalWorkerSettings, PrefixRoutingSettings,
                               ServiceSettings, Strict, WorkerSettings)

ROLES = ("prefill", "decode")
# What Serve's gRPC between replicas (`ray.throughput_optimized`) takes in one call, read by
# each replica from `RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH`: 4 MiB by default, so a request
# of one 3 MB image failed on its way to the image service (its messages are the call's
# argument), as would decode's call with a long prompt's ids and a KV riding inline. The
# replicas take calls only from the stack's own code, whose sizes the ingress's limits bound;
# gRPC's own ceiling, as Serve's callers already send up to it.
REPLICA_MESSAGE_BYTES = 2**31 - 1


class SettingsError(ValueError):
    """A profile failed validation; `field` is the dotted path of the first bad key."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class RaySettings(Strict):
    """The local Ray instance `small4 up` starts when it does not join one."""

    num_cpus: int | None = Field(None, gt=0)
    object_store_mb: int = Field(512, gt=64)
    node_ip: str = Field("127.0.0.1", description="the address the Ray node `small4 up` starts "
                         "binds to; on loopback, Ray's Prometheus endpoint listens on loopback "
                         "only (it carries every tenant's traffic and has no key)")
    metrics_port: int = Field(8080, gt=0, lt=65536,
                              description="Ray's Prometheus metrics port (`small4 up` prints "
                              "its URL)")
    drain_timeout_s: float = Field(60, gt=0, description="on SIGTERM or Ctrl-C, how long "
                                   "`small4 up` lets open requests finish before it stops, and "
                                   "how long the chart's pods drain (at least the "
                                   "deployments' longest drain_deadline_s)")
    throughput_optimized: bool = Field(
        True, description="Ray Serve's high-throughput mode (gRPC between deployments, user "
        "code on the replica loop; direct ingress where `small4 up` starts Ray on one node, "
        "not in the Helm chart, where it would leave the head the only HTTP proxy)")


class HttpSettings(Strict):
    """Where Serve's HTTP proxy listens."""

    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)


class StackSettings(ServiceSettings):
    """Everything the stack is: the request path's settings plus how the cluster hosts it."""

    profile: str = "custom"
    ray: RaySettings = RaySettings()
    http: HttpSettings = HttpSettings()
    topology: TopologySettings = TopologySettings()
    autoscaling: AutoscalingSettings = AutoscalingSettings()

    @model_validator(mode="after")
    def _engines_fit(self):
        sglang = (self.engine.kind == "sglang", self.kv_handoff.backend == "sglang")
        if any(sglang) and not all(sglang):
            raise ValueError("engine.kind sglang and kv_handoff.backend sglang go together (the "
                             "SGLang engines move the KV themselves)")
        if sglang[0] and not gpu_engines(self.pools, self.topology):
            raise ValueError("engine.kind sglang needs GPUs: give the prefill and decode roles "
                             "num_gpus equal to topology.tensor_parallel")
        if sglang[0] and self.model.source != "checkpoint":
            raise ValueError("engine.kind sglang serves a checkpoint: set model.source "
                             "checkpoint and model.path (the stand-in is built for the CPU "
                             "engines)")
        if sglang[0]:
            from services.engines.sglang_args import server_args  # (imports torch)

            for role in ROLES:  # what a replica would refuse at start, after taking its GPUs
                server_args(self.model, self.engine, role=role,
                            tp_size=self.topology.tensor_parallel, host="<node address>",
                            bootstrap_port=1)
        for field, port in (("http.port", self.http.port),
                            ("ray.metrics_port", self.ray.metrics_port)):
            if port in RAY_PORTS:  # (the chart opens http.port to every client)
                raise ValueError(f"{field}: {port} is the port of {RAY_PORTS[port]} on every "
                                 "node; give another")
        if self.ray.metrics_port == self.http.port:
            raise ValueError(f"ray.metrics_port: {self.ray.metrics_port} is http.port too; "
                             "Ray's metrics export and the HTTP ingress need a port each")
        try:
            self.placements()
        except TopologyError as exc:
            raise ValueError(f"topology: {exc}") from None
        slots = self.topology.engines_per_node * self.topology.nodes
        budget = self.autoscaling.budget_engines
        if gpu_engines(self.pools, self.topology) and budget is not None and budget > slots:
            raise ValueError(f"autoscaling.budget_engines: {budget} engines, but the topology "
                             f"holds {slots} at tensor_parallel {self.topology.tensor_parallel} "
                             "(engines granted beyond it could never be placed)")
        if self.autoscaling.enabled and self.autoscaling.decode_capacity == "perf_model" \
                and self.engine.kind != "sglang":
            raise ValueError("autoscaling.decode_capacity: perf_model times SGLang engines on "
                             f"H200 GPUs (autoscaling/perf.py); this profile's engines are "
                             f"{self.engine.kind!r}: give decode_tokens_per_s_per_replica")
        if self.autoscaling.enabled:
            floor = sum(getattr(p, r).lowest for p in self.pools.values() for r in ROLES)
            if floor > self.budget_engines():
                raise ValueError(f"autoscaling: the roles' min_replicas add up to {floor} "
                                 f"engines; the budget is {self.budget_engines()}")
            # Serve starts every role at `replicas` (and again on each redeploy): engines over
            # the budget would load for minutes, then be shed once they report
            start = sum(getattr(p, r).replicas for p in self.pools.values() for r in ROLES)
            if start > self.budget_engines():
                raise ValueError(f"autoscaling: the roles' replicas add up to {start} engines "
                                 f"at start; the budget is {self.budget_engines()}")
            for name, pool in self.pools.items():
                for role in ROLES:
                    if getattr(pool, role).scalable and getattr(pool, role).lowest == 0:
                        # no replica reports load, so no policy asks for one; Serve's own
                        # start from zero would take an engine the budget does not know of
                        raise ValueError(f"pools.{name}.{role}.min_replicas: 0 cannot scale "
                                         "with autoscaling on; give it 1 or more")
        return self

    def drain_s(self) -> float:
        """How long `small4 up` drains on SIGTERM: `ray.drain_timeout_s`, and at least the
        longest `drain_deadline_s` a deployment was given to finish its requests (stopping Ray
        sooner cut them, where the chart's grace period follows the longest)."""
        deadlines = [self.ingress.drain_deadline_s, self.multimodal.drain_deadline_s]
        deadlines += [getattr(p, r).drain_deadline_s for p in self.pools.values() for r in ROLES]
        return max(self.ray.drain_timeout_s, *deadlines)

    def budget_engines(self) -> int:
        """Engines all prefill and decode roles may hold together."""
        if self.autoscaling.budget_engines is not None:
            return self.autoscaling.budget_engines
        if gpu_engines(self.pools, self.topology):
            return self.topology.engines_per_node * self.topology.nodes
        return sum(getattr(p, r).highest for p in self.pools.values() for r in ROLES)

    def engine_perf(self, base: PerfModel | None = None) -> PerfModel:
        """`base` (the H200 TP2 model by default) timing this profile's engines: the GPUs of
        its tensor parallelism (their compute, bandwidth and HBM, the weights split over
        them) and its batch."""
        base = base or PerfModel()
        tp = self.topology.tensor_parallel
        return base.model_copy(update={
            "gpus_per_engine": tp,
            "weights_bytes_per_gpu": base.weights_bytes_per_gpu * base.gpus_per_engine / tp,
            "max_running": self.engine.max_running_requests})

    def role_options(self, pool: str, role: str) -> dict[str, Any]:
        """Serve options of one pool's prefill or decode deployment: its size, placement, and
        our policy when autoscaling is on and the role may scale."""
        settings = getattr(self.pools[pool], role)
        default = max(2 * self.engine.max_running_requests, 64) if role == "decode" else 64
        options = deployment_options(settings, settings.max_ongoing_requests or default)
        if role == "prefill" and settings.highest > 1:
            options |= prefill_router_options(self.routing.prefix, self.engine, self.model,
                                              self.kv_handoff)
        if not (self.autoscaling.enabled and settings.scalable):
            return options
        options.pop("num_replicas")
        roles, fixed = {}, {}
        for name, p in self.pools.items():
            for r in ROLES:
                s = getattr(p, r)
                if s.scalable:
                    roles[f"{name}/{r}"] = [s.replicas, s.lowest, s.highest]
                else:
                    fixed[f"{name}/{r}"] = s.replicas
        slo = self.pools[pool].slo
        options["autoscaling_config"] = self.autoscaling.serve_config(
            pool=pool, role=role, replicas=settings.replicas, lowest=settings.lowest,
            highest=settings.highest, ttft_slo_s=slo.ttft_s, itl_slo_s=slo.itl_s,
            budget_engines=self.budget_engines(),
            priorities={n: p.priority for n, p in self.pools.items()}, roles=roles, fixed=fixed,
            perf=self.engine_perf() if self.autoscaling.decode_capacity == "perf_model" else None)
        return options

    def placements(self):
        """Where every GPU engine goes (`cluster.topology.plan_engines`)."""
        return plan_engines(self.pools, self.topology,
                            {self.http.port: "the HTTP ingress",
                             self.ray.metrics_port: "Ray's metrics export (ray.metrics_port)"})

    def worker(self, pool: str) -> WorkerSettings:
        """The sub-settings one pool's prefill and decode workers receive."""
        return WorkerSettings(pool=pool, model=self.model, engine=self.engine,
                              kv_handoff=self.kv_handoff, stream=self.stream,
                              telemetry=self.telemetry, slo=self.pools[pool].slo,
                              tensor_parallel=self.topology.tensor_parallel,
                              bootstrap_ports=bootstrap_ports(self.pools, self.topology)
                              .get(pool, []))

    def multimodal_settings(self) -> MultimodalWorkerSettings:
        return MultimodalWorkerSettings(model=self.model, images=self.multimodal.images,
                                        telemetry=self.telemetry,
                                        one_image_size=self.engine.kind == "sglang",
                                        max_held_bytes=self.multimodal.max_held_bytes,
                                        drain_deadline_s=self.multimodal.drain_deadline_s)

    def ingress_settings(self) -> IngressSettings:
        return IngressSettings(model=self.model, engine_kind=self.engine.kind,
                               routing=self.routing, pools=self.pools, limits=self.limits,
                               auth=self.auth, telemetry=self.telemetry,
                               kv_handoff=self.kv_handoff,
                               max_images=self.multimodal.images.max_images,
                               max_image_bytes=self.multimodal.images.max_bytes)


def require_serve_app(settings: StackSettings) -> StackSettings:
    """`settings` if a Serve application can run them (`small4 up`, `plan`, the Helm chart's
    RayService), else `SettingsError`: the in-process KV handoffs hand the KV over inside one
    process (`small4 generate`, tests)."""
    if settings.kv_handoff.backend in ("local", "paired"):
        raise SettingsError(f"kv_handoff.backend {settings.kv_handoff.backend!r} hands the KV "
                            "over inside one process (small4 generate, tests); a Serve app "
                            "needs object_store or sglang")
    return settings


def parse_settings(data: dict[str, Any] | None) -> StackSettings:
    """Validate a settings mapping, raising `SettingsError` that names the first bad field."""
    try:
        return StackSettings.model_validate(data or {})
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"]) or None
        what = {"extra_forbidden": "unknown settings key",
                "missing": "required"}.get(error["type"], error["msg"])
        what = what.removeprefix("Value error, ")  # our validators' own words
        if field == "auth" and error["type"] == "missing":
            what = "required: give auth.keys_file, or auth.enabled: false to serve without keys"
        raise SettingsError(f"{field}: {what}" if field else what, field) from None


def prefill_router_options(prefix: PrefixRoutingSettings, engine: EngineSettings,
                           model: ModelSettings | None = None,
                           kv_handoff: KVHandoffSettings | None = None) -> dict[str, Any]:
    """`request_router_config` of a prefill deployment that may run more than one replica.
    On a concurrent handoff (`paired`, `sglang`) a prefill call stays open until its decode
    stream ends, so Serve's probe of a replica counts streams, not queued prefills: the router
    is told not to read other routers' calls from it."""
    if prefix.router == "serve_default":
        return {}
    if prefix.router == "cache_aware" and engine.kind != "sglang" and not \
            engine.prefix_cache.enabled:  # no cache to route to (SGLang's radix cache is always on)
        return {}
    from ray.serve.config import RequestRouterConfig

    if prefix.router == "ray_prefix_affinity":  # Ray's own, a baseline for bench/prefix_routing
        return {"request_router_config": RequestRouterConfig(
            request_router_class=RAY_PREFIX_ROUTER)}
    cache = engine.prefix_cache
    capacity = (cache.capacity_tokens if cache.capacity_tokens is not None
                else engine.kv_capacity_tokens)
    return {"request_router_config": RequestRouterConfig(
        request_router_class="services.workers.prefix_router.CacheAwareRouter",
        request_router_kwargs={"block_tokens": cache.block_tokens, "capacity_tokens": capacity,
                               "max_imbalance": prefix.max_imbalance,
                               "load_blocks": prefix.load_blocks,
                               "load_half_life_s": prefix.load_half_life_s,
                               "recompute_weight": prefix.recompute_weight,
                               "share_interval_s": prefix.share_interval_s,
                               "probe_others": kv_handoff is None
                               or kv_handoff.backend in SEQUENTIAL,
                               # where the router finds the image marker's id: the tokenizer
                               # its process already loaded (ingress or decode replica)
                               "model": model.model_dump(mode="json") if model else None})}


def multimodal_router_options() -> dict[str, Any]:
    """`request_router_config` of the multimodal deployment: a request's pixels are released
    on the replica that keeps them (`services.workers.owner_router`)."""
    from ray.serve.config import RequestRouterConfig

    return {"request_router_config": RequestRouterConfig(
        request_router_class="services.workers.owner_router.OwnerRouter")}


# Ray's PrefixCacheAffinityRouter without the `ray[llm]` extra's imports (pyarrow) that its
# public path `ray.serve.llm.request_router` pulls in.
RAY_PREFIX_ROUTER = ("ray.llm._internal.serve.routing_policies.prefix_aware."
                     "prefix_aware_router.PrefixCacheAffinityRouter")


def load_settings(path: str | Path | None = None) -> StackSettings:
    """Load a profile file, or the embedded default profile when `path` is None."""
    if path is None:
        text = resources.files("cluster.profiles").joinpath("local.yaml").read_text()
    else:
        text = Path(path).read_text()
    data = yaml.safe_load(text)
    if data is not None and not isinstance(data, dict):
        raise SettingsError("a settings file must hold a mapping at the top level")
    return parse_settings(data)
