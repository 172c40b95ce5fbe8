"""The part of the settings a prefill or decode worker receives: `services.settings.WorkerSettings`
(the settings models live in one module; engines read it too)."""

from services.settings import WorkerSettings

__all__ = ["WorkerSettings"]
