"""Tracing settings: explicit settings win, the SDK's OTEL_* environment fills what they leave."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
from services.settings import TracingSettings
from services.telemetry import tracing
tracing.configure(TracingSettings(enabled=True, exporter="none", **{kwargs}), role="ingress")
span = tracing.start("x", None)
print(span.resource.attributes["service.name"], span.resource.attributes["small4.role"])
"""


def service_name(kwargs: str, env: dict[str, str]) -> str:
    """Configure tracing in a fresh process (the provider is once per process)."""
    out = subprocess.run([sys.executable, "-c", SCRIPT.replace("{kwargs}", kwargs)],
                         capture_output=True, text=True, env=env, check=True)
    return out.stdout.split()


def test_settings_win_over_the_environment():
    import os

    env = dict(os.environ, OTEL_SERVICE_NAME="from-env")
    assert service_name("{'service_name': 'from-settings'}", env) == ["from-settings", "ingress"]
    assert service_name("{}", env) == ["from-env", "ingress"]
    env.pop("OTEL_SERVICE_NAME")
    assert service_name("{}", env) == ["small4", "ingress"]
