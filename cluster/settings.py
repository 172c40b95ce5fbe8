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

from cluster.topology import TopologyError, TopologySettings, plan_engines
from services.settings import IngressSettings, ServiceSettings, Strict
from services.workers.multimodal import MultimodalWorkerSettings
from services.workers.settings import WorkerSettings


class SettingsError(ValueError):
    """A profile failed validation; `field` is the dotted path of the first bad key."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class RaySettings(Strict):
    """The local Ray instance `small4 up` starts when it does not join one."""

    num_cpus: int | None = Field(None, gt=0)
    object_store_mb: int = Field(512, gt=64)
    throughput_optimized: bool = Field(
        True, description="Ray Serve's high-throughput mode (gRPC between deployments, direct "
        "ingress, user code on the replica loop); applied when `small4 up` starts Ray")


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

    @model_validator(mode="after")
    def _engines_fit(self):
        try:
            self.placements()
        except TopologyError as exc:
            raise ValueError(f"topology: {exc}") from None
        return self

    def placements(self):
        """Where every GPU engine goes (`cluster.topology.plan_engines`)."""
        return plan_engines(self.pools, self.topology, {self.http.port: "the HTTP ingress"})

    def worker(self, pool: str) -> WorkerSettings:
        """The sub-settings one pool's prefill and decode workers receive."""
        return WorkerSettings(pool=pool, model=self.model, engine=self.engine,
                              kv_handoff=self.kv_handoff, stream=self.stream,
                              telemetry=self.telemetry)

    def multimodal_settings(self) -> MultimodalWorkerSettings:
        return MultimodalWorkerSettings(model=self.model, images=self.multimodal.images,
                                        telemetry=self.telemetry)

    def ingress_settings(self) -> IngressSettings:
        return IngressSettings(model=self.model, engine_kind=self.engine.kind,
                               routing=self.routing, pools=self.pools, limits=self.limits,
                               telemetry=self.telemetry)


def parse_settings(data: dict[str, Any] | None) -> StackSettings:
    """Validate a settings mapping, raising `SettingsError` that names the first bad field."""
    try:
        return StackSettings.model_validate(data or {})
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"]) or None
        what = "unknown settings key" if error["type"] == "extra_forbidden" else error["msg"]
        raise SettingsError(f"{field}: {what}" if field else what, field) from None


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
