"""The composition root: settings → the Ray Serve application (what a RayService imports).

Only this module knows Serve's decorators; the deployments are the plain classes of `services`,
and each receives its peers' handles through its constructor.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from cluster.settings import SettingsError, StackSettings, parse_settings
from cluster.topology import deployment_options
from services.ingress import Ingress
from services.workers.decode import DecodeWorker
from services.workers.multimodal import MultimodalWorker
from services.workers.prefill import PrefillWorker

APP_NAME = "small4"


@serve.ingress()
class IngressDeployment(Ingress):
    """The ingress with its FastAPI app built per replica, after construction."""

    def __serve_build_asgi_app__(self):
        return self.build_asgi_app()


def build_app(args: dict[str, Any] | StackSettings | None = None) -> Application:
    """The Serve application for a settings mapping (RayService `args`) or a loaded profile."""
    settings = args if isinstance(args, StackSettings) else parse_settings(args)
    if settings.kv_handoff.backend in ("local", "paired"):
        raise SettingsError(f"kv_handoff.backend {settings.kv_handoff.backend!r} hands the KV "
                            "over inside one process (small4 generate, tests); a Serve app "
                            "needs object_store or sglang")
    decoders = {}
    for name, pool in settings.pools.items():
        prefill = serve.deployment(PrefillWorker, name=f"{name}-prefill",
                                   **settings.role_options(name, "prefill")).bind(
            settings.worker(name))
        decoders[name] = serve.deployment(DecodeWorker, name=f"{name}-decode",
                                          **settings.role_options(name, "decode")).bind(
            settings.worker(name), prefill)
    multimodal = serve.deployment(MultimodalWorker, name="multimodal",
                                  **deployment_options(settings.multimodal)).bind(
        settings.multimodal_settings())
    return serve.deployment(IngressDeployment, name="ingress",
                            **deployment_options(settings.ingress)).bind(
        settings.ingress_settings(), decoders, multimodal)
