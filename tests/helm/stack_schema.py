"""The settings root's JSON schema inside the chart's values.schema.json, so Helm checks `stack:`,
and the keys file's entry schema under `apiKeys.keys` (a key the stack would refuse, as a quota
field misspelt, kept every ingress replica from starting: the chart rendered it).

`python tests/helm/stack_schema.py` rewrites the schema's `$defs` from `cluster.settings` and
the key entries from `services.guard.keys`; the chart tests fail when they disagree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VALUES_SCHEMA = Path(__file__).resolve().parents[2] / "helm" / "small4" / "values.schema.json"


def _untitled(node: Any) -> Any:
    """The schema without pydantic's generated titles (noise that churns with field names)."""
    if isinstance(node, list):
        return [_untitled(n) for n in node]
    if not isinstance(node, dict):
        return node
    return {key: ({name: _untitled(sub) for name, sub in value.items()}
                  if key in ("properties", "$defs") else _untitled(value))
            for key, value in node.items() if key != "title"}


def stack_defs() -> dict[str, Any]:
    """`$defs` for values.schema.json: the settings models, the root as `StackSettings`."""
    from cluster.settings import StackSettings

    root = StackSettings.model_json_schema()
    defs = root.pop("$defs")
    defs["StackSettings"] = root
    return _untitled(dict(sorted(defs.items())))


def key_entry() -> dict[str, Any]:
    """One `apiKeys.keys` entry, as the keys file takes it (its quota the settings' own)."""
    from services.guard.keys import KeyEntry

    entry = KeyEntry.model_json_schema()
    defs = entry.pop("$defs")
    assert set(defs) <= set(stack_defs()), "a key entry's model is not among the settings'"
    return _untitled(entry)


def main() -> None:
    schema = json.loads(VALUES_SCHEMA.read_text())
    schema["$defs"] = stack_defs()
    schema["properties"]["apiKeys"]["properties"]["keys"]["items"] = key_entry()
    VALUES_SCHEMA.write_text(json.dumps(schema, indent=2) + "\n")
    print(f"wrote {VALUES_SCHEMA}")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(VALUES_SCHEMA.parents[2]))
    main()
