"""`small4 up` stopped while it deploys: Serve waits for an app without a deadline, so a replica
that can never be placed (here an ingress asking for more CPUs than the node has) would hold the
process for ever if a signal only asked for a drain. Ctrl-C stops the deploy and the process
exits, with the signal's code, having stopped the Ray it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.e2e.conftest import SIM_PROFILE
from tests.e2e.test_cli_e2e import free_port, lines_of, wait_for

pytestmark = pytest.mark.ray


def test_ctrl_c_while_deploying_stops_the_deploy_and_exits(tmp_path):
    profile = SIM_PROFILE | {"profile": "cli-stuck", "ingress": {"num_cpus": 64},
                             "ray": {"num_cpus": 2, "object_store_mb": 128,
                                     "metrics_port": free_port(), "drain_timeout_s": 20}}
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    process = subprocess.Popen([sys.executable, "-m", "cluster.cli", "up", "--config", str(path),
                                "--port", str(free_port())], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)
    (lines, reader), seen = lines_of(process), []
    try:
        wait_for(lines, "deploying cli-stuck", seen, timeout=180)
        time.sleep(5)  # inside serve.run, waiting for an ingress that cannot be placed
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 128 + signal.SIGINT
        wait_for(lines, "interrupted while deploying", seen, timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
        reader.join(timeout=30)
        process.stdout.close()
