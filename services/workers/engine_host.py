"""What a prefill and a decode worker share: an engine, the KV handoff, telemetry, control."""

from __future__ import annotations

from services.engines.protocol import EngineStats
from services.engines.registry import build_engine
from services.kv.backends import build_handoff
from services.telemetry import tracing
from services.telemetry.logs import serve_identity
from services.tokenizer import load_tokenizer
from services.workers.load import LoadWindow
from services.settings import WorkerSettings


class EngineHost:
    """Owns one engine of `role` for a pool; `abort` and `stats` are its control calls."""

    role = ""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        tokenizer = load_tokenizer(settings.model.tokenizer_file())
        self.engine = build_engine(settings.model, settings.engine, role=self.role,
                                   tokenizer=tokenizer, worker=settings)
        self.handoff = build_handoff(settings.kv_handoff, engine=self.engine)
        self.tags = {"pool": settings.pool, "role": self.role}
        self.replica = serve_identity().get("replica", "")
        slo = settings.slo.ttft_s if self.role == "prefill" else settings.slo.itl_s
        self.load = LoadWindow(slo)
        tracing.configure(settings.telemetry.tracing, role=self.role, pool=settings.pool)

    async def abort(self, request_id: str) -> bool:
        return await self.engine.abort(request_id)

    async def stats(self) -> EngineStats:
        return self.engine.stats()

    async def replica_name(self) -> str | None:
        """The Ray actor name of this replica (None in-process): ops and fault tests use it."""
        import ray

        # (asking an uninitialised Ray for its runtime context starts a local Ray)
        return ray.get_runtime_context().get_actor_name() if ray.is_initialized() else None

    async def replica_stats(self) -> tuple[str | None, EngineStats]:
        """This replica's name with its stats, from one call: which replica holds what."""
        return await self.replica_name(), self.engine.stats()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's hook for custom autoscaling metrics (`autoscaling.serve_policy`)."""
        return self.load.report(self.engine.stats(), self.settings.engine.max_running_requests)

