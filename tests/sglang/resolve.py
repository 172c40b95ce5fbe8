"""Resolve our `ServerArgs` with SGLang's own resolution pipeline, as `sglang.Engine` does before
it starts anything, collecting every warning it gives (Python warnings and log records)."""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

from cluster.settings import parse_settings
from services.engines.sglang_args import engine_env, server_args
from services.telemetry.tracing import resolve as resolve_tracing

# What resolution may say on this CPU machine and why; anything else fails the tier.
EXPECTED = {
    # the override engine_env sets deliberately (see its docstring)
    "is greater than the derived context_length": "256K served as the model card says",
    # resolving with device="cpu" (the only device here): platform fallbacks
    "does not support Intel AMX": "CPU resolution only",
    "support AWQ currently": "CPU resolution only",
    "support GGUF quantization currently": "CPU resolution only",
    "Radix cache is disabled for decode server": "SGLang's PD default for decode",
    "SGLANG_USE_CUDA_IPC_TRANSPORT is deprecated": "set by SGLang itself for decode on CPU",
    "Missing validation function in 'RotaryEmbeddingConfigMixin'": "transformers 5.19 on "
    "SGLang's own deepseek_yarn rope type",
}


class Heard(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextmanager
def listening():
    """Every warning and WARNING+ log record given inside the block."""
    heard, root = Heard(), logging.getLogger()
    root.addHandler(heard)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield heard.messages
        finally:
            root.removeHandler(heard)
            heard.messages += [str(w.message) for w in caught if not _import_noise(w)]


def _import_noise(w: warnings.WarningMessage) -> bool:
    """A deprecation inside a kernel library SGLang imports lazily while resolving (CUTLASS's
    renamed helpers, SWIG's types): the pyproject's warning filters scope these out of the
    suite too. A deprecated field or value of ours would still be heard."""
    return issubclass(w.category, DeprecationWarning) and str(w.message).startswith(
        ("cutlass.", "builtin type "))


def unexpected(messages: list[str]) -> list[str]:
    return [m for m in messages if not any(known in m for known in EXPECTED)]


def profile_args(profile: dict, pool: str, role: str, checkpoint: Path, port: int | None = None,
                 **changes):
    """Our `ServerArgs` keywords and engine environment for one engine of `profile` (a settings
    document), pointed at `checkpoint`."""
    settings = parse_settings(profile)
    worker = settings.worker(pool)
    model = worker.model.model_copy(update={"path": checkpoint})
    engine = worker.engine.model_copy(update=changes)
    args = server_args(model, engine, role=role, tp_size=worker.tensor_parallel,
                       host="10.0.0.7", bootstrap_port=port)
    env = engine_env(model, worker.kv_handoff, resolve_tracing(worker.telemetry.tracing))
    return args, env, worker


@contextmanager
def environment(env: dict[str, str]):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def resolve(args: dict, env: dict[str, str]):
    """SGLang's resolved `ServerArgs` (on the CPU: device "cpu" is the one change)."""
    from sglang.srt.server_args import ServerArgs

    with environment(env):
        resolved = ServerArgs(**(args | {"device": "cpu"}))
        resolved.resolve_once()
    return resolved
