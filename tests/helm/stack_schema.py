"""The settings root's JSON schema inside the chart's values.schema.json, so Helm checks `stack:`.

`python tests/helm/stack_schema.py` rewrites the schema's `$defs` from `cluster.settings`; the
chart tests fail when the file and the settings root disagree.
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


def main() -> None:
    schema = json.loads(VALUES_SCHEMA.read_text())
    schema["$defs"] = stack_defs()
    VALUES_SCHEMA.write_text(json.dumps(schema, indent=2) + "\n")
    print(f"wrote {VALUES_SCHEMA}")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(VALUES_SCHEMA.parents[2]))
    main()
