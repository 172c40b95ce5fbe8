"""What a prefill and a decode worker share: an engine, the KV handoff, telemetry, control."""

from __future__ import annotations

import asyncio
import time

from services.engines.protocol import EngineStats
from services.engines.registry import build_engine
from services.kv.backends import build_handoff
from services.telemetry import metrics, tracing
from services.telemetry.logs import configure_logging, serve_identity
from services.tokenizer import load_tokenizer
from services.workers.load import LoadWindow
from services.settings import WorkerSettings


GAUGE_S = metrics.GAUGE_REPUBLISH_S  # an engine's load gauges, once it has had a request
# how long an engine stays unhealthy before this replica fails Serve's health check (which
# then replaces it after its own 3 failed checks, ~30 s more): longer than a probe's timeout
UNHEALTHY_FOR_S = 60.0
# and none fails it in its first minutes: an engine's first tokens may wait on compilation and
# lazy set-up (sglang.Engine warms up nothing), whose probes time out meanwhile
STARTUP_GRACE_S = 300.0


class EngineHost:
    """Owns one engine of `role` for a pool; `abort` and `stats` are its control calls."""

    role = ""
    _gauges: asyncio.Task | None = None
    _unhealthy_since: float | None = None
    _started = float("-inf")

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        configure_logging(settings.telemetry.json_logs)  # its `small4.*` lines, as the ingress's
        tokenizer = load_tokenizer(settings.model.tokenizer_file())
        self.engine = build_engine(settings.model, settings.engine, role=self.role,
                                   tokenizer=tokenizer, worker=settings)
        self.handoff = build_handoff(settings.kv_handoff, engine=self.engine)
        self.tags = {"pool": settings.pool, "role": self.role}
        self.replica = serve_identity().get("replica", "")
        slo = settings.slo.ttft_s if self.role == "prefill" else settings.slo.itl_s
        self.load = LoadWindow(slo)
        tracing.configure(settings.telemetry.tracing, role=self.role, pool=settings.pool)
        # the start-up grace counts from the engine loaded (SGLang loads the weights in its
        # constructor: minutes from a cold volume would have used up the grace before any
        # first token could wait on compilation)
        self._started = time.monotonic()

    def arrived(self, prompt_tokens: int) -> None:
        """A request reached this worker: counted in its load window, and from the first one
        on its engine's gauges are published every `GAUGE_S` (as well as when a request ends),
        so a hung engine's queue shows as it grows instead of freezing at the last finish."""
        self.load.arrived(prompt_tokens)
        if self._gauges is None or self._gauges.done():
            self._gauges = asyncio.get_running_loop().create_task(self._publish_gauges())

    async def _publish_gauges(self) -> None:
        while True:
            # (per replica only what a prefill's cache reports, as the request path does)
            metrics.record_engine(self.engine.stats(), self.settings.pool,
                                  self.replica if self.role == "prefill" else "")
            await asyncio.sleep(GAUGE_S)

    async def check_health(self) -> None:
        """Serve's health check: without it Serve checks only that this replica's loop answers,
        so a hung engine (an SGLang scheduler stuck, its process dead) kept its replica RUNNING
        and routed to, every stream on it waiting out its deadline. An engine unhealthy for
        `UNHEALTHY_FOR_S` fails it; Serve replaces the replica and the streams it cuts are
        resumed elsewhere. Not within `STARTUP_GRACE_S` of start (a first token may wait on
        compilation). A CPU engine's health is its decode steps': the last one failed, or the
        one running now has run `STEP_STALL_S`; one that failed with nothing running since is
        idle, not hung (the next request tests it again)."""
        stats = self.engine.stats()
        idle = not (stats.running or stats.waiting)
        if stats.healthy or (idle and not self.engine.probed_health):
            self._unhealthy_since = None
            return
        now = time.monotonic()
        if self._unhealthy_since is None:
            self._unhealthy_since = now
        if now - self._unhealthy_since >= UNHEALTHY_FOR_S \
                and now - self._started >= STARTUP_GRACE_S:
            raise RuntimeError(f"the {self.role} engine has been unhealthy for "
                               f"{now - self._unhealthy_since:.0f} s: {stats.detail}")

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

