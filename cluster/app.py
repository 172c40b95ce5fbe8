"""The composition root: settings → the Ray Serve application (what a RayService imports).

Only this module knows Serve's decorators; the deployments are the plain classes of `services`,
and each receives its peers' handles through its constructor.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig

from cluster.settings import (StackSettings, multimodal_router_options, parse_settings,
                              require_serve_app)
from cluster.topology import deployment_options
from services.ingress import Ingress
from services.workers.decode import DecodeWorker
from services.workers.multimodal import MultimodalWorker
from services.workers.prefill import PrefillWorker

APP_NAME = "small4"
BACKPRESSURE_RETRY_S = 1.0  # the Retry-After of a request refused for a full ingress queue


class StartupHeapFrozen:
    """A replica whose heap at the end of its construction (tokenizer, model, libraries) is
    moved out of the cycle collector's reach (`gc.freeze`): a full collection then scans only
    what came later (the requests' objects, the FastAPI app, the grammar view built in the
    background), not the tokenizer's vocabulary (~150 ms measured in a process holding the
    tokenizer and its grammar view), for Python's own collections and for the one a replica
    runs after cancelling calls (`services.workers.peer.close_stream`). Serve replicas only: an in-process
    stack shares its process with others, whose garbage a freeze would keep for ever."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        gc.freeze()


class PrefillDeployment(StartupHeapFrozen, PrefillWorker):
    pass


class DecodeDeployment(StartupHeapFrozen, DecodeWorker):
    pass


class MultimodalDeployment(StartupHeapFrozen, MultimodalWorker):
    async def __del__(self):
        """Serve awaits this once the replica's calls drained, within its
        `graceful_shutdown_timeout_s`: the pixels it keeps go with it (`MultimodalWorker.drain`).
        (Here, not on the worker: an in-process worker collected by Python would get a
        coroutine nobody awaits.)"""
        await self.drain()


@serve.ingress()
class IngressDeployment(StartupHeapFrozen, Ingress):
    """The ingress with its FastAPI app built per replica, after construction."""

    def __serve_build_asgi_app__(self):
        return self.build_asgi_app()


def build_app(args: dict[str, Any] | StackSettings | None = None) -> Application:
    """The Serve application for a settings mapping (RayService `args`) or a loaded profile."""
    settings = require_serve_app(args if isinstance(args, StackSettings)
                                 else parse_settings(args))
    decoders, prefills = {}, {}
    for name, pool in settings.pools.items():
        prefills[name] = serve.deployment(PrefillDeployment, name=f"{name}-prefill",
                                          **settings.role_options(name, "prefill")).bind(
            settings.worker(name))
        decoders[name] = serve.deployment(DecodeDeployment, name=f"{name}-decode",
                                          **settings.role_options(name, "decode")).bind(
            settings.worker(name), prefills[name])
    multimodal = serve.deployment(MultimodalDeployment, name="multimodal",
                                  **deployment_options(settings.multimodal),
                                  **multimodal_router_options()).bind(
        settings.multimodal_settings())
    queue = settings.ingress.max_queued_requests
    bounded = {} if queue is None else {"max_queued_requests": queue, "backpressure_config":
                                        BackpressureConfig(status_code=503,
                                                           retry_after_s=BACKPRESSURE_RETRY_S)}
    return serve.deployment(IngressDeployment, name="ingress",
                            **deployment_options(settings.ingress), **bounded).bind(
        settings.ingress_settings(), decoders, multimodal, prefills)


def delete_app(name: str, timeout_s: float) -> bool:
    """Delete the Serve app `name` and wait up to `timeout_s` for it to be gone (False if it is
    not). Serve's own blocking delete gives up after a fixed 60 s, raising, where a replica may
    rightly take longer: an ingress in direct-ingress mode (throughput-optimized) stays up for
    Serve's draining floor (`RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S`, 30 s by default,
    for load balancers to deregister it) and then for its open requests, and every replica
    gets its `graceful_shutdown_timeout_s` (its role's `drain_deadline_s`) for those."""
    serve.delete(name, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while name in serve.status().applications:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    return True


def run_app(app: Application, name: str, route_prefix: str, timeout_s: float = 240.0) -> None:
    """`serve.run` with a deadline: Serve waits forever for an app whose replicas the cluster
    cannot place (and that app keeps the CPUs it did get). One not running in `timeout_s` is
    deleted, and the error names what did not start and the CPUs that were free. For drivers
    that deploy and go on (benches, tests); `small4 up` deploys in the foreground."""
    import ray

    failed: list[BaseException] = []

    def run() -> None:
        try:
            serve.run(app, name=name, route_prefix=route_prefix)
        except BaseException as error:  # reported below, from the caller's thread
            failed.append(error)

    thread = threading.Thread(target=run, name=f"deploy-{name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive() or failed:
        status = serve.status().applications.get(name)
        waiting = {deployment: (state.status, state.replica_states)
                   for deployment, state in (status.deployments.items() if status else ())
                   if state.status != "HEALTHY"}
        free = ray.available_resources().get("CPU", 0.0)
        # a replica still waiting for resources can take longer to go than Serve's own
        # blocking delete waits (60 s)
        delete_app(name, 300)
        raise RuntimeError(f"app {name!r} not running in {timeout_s:.0f}s: {waiting}; "
                           f"{free:.2f} CPUs were free") from (failed[0] if failed else None)
