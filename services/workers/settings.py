"""The part of the settings a prefill or decode worker receives."""

from __future__ import annotations

from services.settings import (EngineSettings, KVHandoffSettings, ModelSettings, SLOSettings,
                               Strict, StreamSettings, TelemetrySettings)


class WorkerSettings(Strict):
    """One pool's worker: which model and engine it runs, how KV and tokens leave it."""

    pool: str
    model: ModelSettings
    engine: EngineSettings
    kv_handoff: KVHandoffSettings
    stream: StreamSettings
    telemetry: TelemetrySettings = TelemetrySettings()
    slo: SLOSettings = SLOSettings()
    # GPU engines: GPUs per engine, and the KV bootstrap ports a prefill engine may take
    tensor_parallel: int = 1
    bootstrap_ports: list[int] = []
