"""The same composition as `build_app`, as plain objects in one process (no Ray).

Used by `small4 generate` and by tests that exercise the whole request path cheaply: the object
store handoff becomes the in-process one (its other settings kept; `paired` and `sglang` work in
one process as they are), every other part is the one the Serve app runs.
"""

from __future__ import annotations

from cluster.settings import StackSettings
from services.ingress import Ingress
from services.workers.decode import DecodeWorker
from services.workers.multimodal import MultimodalWorker
from services.workers.prefill import PrefillWorker


def build_inprocess(settings: StackSettings) -> Ingress:
    """An `Ingress` whose pools are in-process prefill and decode workers sharing one handoff."""
    backend = settings.kv_handoff.backend
    if backend == "object_store":  # no Ray here; the other backends work in one process
        backend = "local"
    local = settings.model_copy(update={
        "kv_handoff": settings.kv_handoff.model_copy(update={"backend": backend})})
    decoders, prefills = {}, {}
    for name in settings.pools:
        worker = local.worker(name)
        prefills[name] = PrefillWorker(worker)
        decoders[name] = DecodeWorker(worker, prefills[name])
    return Ingress(local.ingress_settings(), decoders,
                   MultimodalWorker(settings.multimodal_settings()), prefills)
