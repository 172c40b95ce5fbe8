"""A keys file for tests: raw keys and their entries, written as the stack reads them."""

from __future__ import annotations

import yaml

from services.guard.keys import digest


def write_keys(path, keys: dict) -> None:
    """`keys`: raw key -> its entry's other fields (name, tenant, quota, ...)."""
    entries = [{"sha256": digest(k)} | v for k, v in keys.items()]
    path.write_text(yaml.safe_dump({"keys": entries}))
