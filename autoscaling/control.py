"""Where ops and the running policy meet: manual overrides and published status, in Ray's KV.

The ops CLI writes an override (`small4 scale POOL ROLE N`) and removes it (`release`); the
policy, running inside the Serve controller, reads the overrides and pins them in the arbiter
until released, and publishes what it saw and decided so `small4 status` can show it. Both
sides use the GCS key-value store of the Ray cluster they are connected to, under the
`small4` namespace, keyed by application: nothing else needs to be running.
"""

from __future__ import annotations

import json
import time
from typing import Any

from autoscaling.metrics import Key

NAMESPACE = "small4"
# a role's policy publishes every second while it runs; a status this old is a role whose
# policy stopped (autoscaling turned off, the role or its application gone)
FRESH_S = 30.0


def _kv():
    from ray.experimental import internal_kv

    if not internal_kv._internal_kv_initialized():
        raise RuntimeError("not connected to a Ray cluster")
    return internal_kv


def _key(kind: str, app: str, pool: str = "", role: str = "") -> str:
    return "/".join(p for p in ("autoscaling", kind, app, pool, role) if p)


def set_override(app: str, pool: str, role: str, replicas: int) -> None:
    _kv()._internal_kv_put(_key("override", app, pool, role), str(int(replicas)),
                           overwrite=True, namespace=NAMESPACE)


def clear_override(app: str, pool: str, role: str) -> bool:
    """Remove an override; whether there was one."""
    return bool(_kv()._internal_kv_del(_key("override", app, pool, role), namespace=NAMESPACE))


def _entries(kind: str, app: str) -> dict[Key, bytes]:
    kv, prefix = _kv(), _key(kind, app) + "/"
    out = {}
    for raw in kv._internal_kv_list(prefix, namespace=NAMESPACE):
        name = raw.decode()
        pool, _, role = name[len(prefix):].partition("/")
        value = kv._internal_kv_get(name, namespace=NAMESPACE)
        if value is not None and role:
            out[(pool, role)] = value
    return out


def read_overrides(app: str) -> dict[Key, int]:
    return {k: int(v) for k, v in _entries("override", app).items()}


def publish_status(app: str, key: Key, status: dict[str, Any]) -> None:
    _kv()._internal_kv_put(_key("status", app, *key), json.dumps(status), overwrite=True,
                           namespace=NAMESPACE)


def read_status(app: str) -> dict[Key, dict[str, Any]]:
    return {k: json.loads(v) for k, v in _entries("status", app).items()}


def fresh(rows: dict[Key, dict[str, Any]], now: float | None = None) -> dict[Key, dict[str, Any]]:
    """The statuses a running policy published within `FRESH_S`."""
    now = time.time() if now is None else now
    return {k: v for k, v in rows.items() if now - v.get("at", 0.0) <= FRESH_S}
