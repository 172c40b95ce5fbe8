"""The layers (pyproject's import-linter contracts, drawn in docs/architecture.md) hold: no module
imports upward, engines know nothing of workers, services and autoscaling never import cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT = [str(Path(sys.executable).parent / "lint-imports")]


def lint(cwd: Path, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(LINT + [str(config), "--no-cache"], cwd=cwd, text=True,
                          capture_output=True, timeout=120,
                          env={"PYTHONPATH": str(cwd), "PATH": str(Path(sys.executable).parent)})


def test_the_code_keeps_its_layers():
    result = lint(ROOT, ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_contracts(tmp_path):
    """The same contracts, on a tree where an engine imports a worker and autoscaling imports
    cluster: both are reported."""
    tree = {"cluster/__init__.py": "", "autoscaling/__init__.py": "",
            "autoscaling/policy.py": "import cluster\n", "services/__init__.py": "",
            "services/workers/__init__.py": "", "services/workers/decode.py": "",
            "services/engines/__init__.py": "",
            "services/engines/reference.py": "from services.workers import decode\n"}
    for name in ("ingress", "api", "guard", "kv", "multimodal", "routing", "telemetry",
                 "context", "grammar", "tokenizer", "model", "errors", "settings"):
        tree[f"services/{name}.py"] = ""
    for path, text in tree.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    lines = [f"root_packages = {json.dumps(config['root_packages'])}"]
    for contract in config["contracts"]:  # JSON strings and lists are TOML ones
        lines.append("[[tool.importlinter.contracts]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in contract.items()]
    (tmp_path / "lint.toml").write_text("[tool.importlinter]\n" + "\n".join(lines) + "\n")
    result = lint(tmp_path, tmp_path / "lint.toml")
    assert result.returncode != 0
    assert "autoscaling.policy -> cluster" in result.stdout
    assert "services.engines.reference -> services.workers.decode" in result.stdout
