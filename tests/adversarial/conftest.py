"""The adversarial tier's edge stack: auth on, the simulated engine, small limits so each attack
is cheap, deployed per module under `/adv-edge` beside the other tiers' apps."""

from __future__ import annotations

import pytest
from edge_kit import KEYS, ROUTE, digest, edge_profile, wait_health


@pytest.fixture(scope="module")
def edge(serve_url, tmp_path_factory):
    """The edge app's base URL (auth on; `KEYS` hold the keys by name); deployed per module
    and deleted after it, so the tiers after this one get the CPUs back."""
    import yaml
    from tests.e2e.conftest import deploy, undeploy

    keys_file = tmp_path_factory.mktemp("edge") / "keys.yaml"
    entries = [{"name": "alpha", "tenant": "t-alpha", "sha256": digest(KEYS["alpha"]),
                "quota": {"requests_per_s": 0.2}},
               # the same name on another key: a label, not an identity
               {"name": "alpha", "tenant": "t-alpha", "sha256": digest(KEYS["alpha-twin"]),
                "quota": {"requests_per_s": 0.2}},
               {"name": "beta", "tenant": "t-beta", "sha256": digest(KEYS["beta"])},
               {"name": "slow", "tenant": "t-slow", "sha256": digest(KEYS["slow"])}]
    keys_file.write_text(yaml.safe_dump({"keys": entries}))
    deploy(edge_profile(str(keys_file)), "adv-edge", ROUTE)
    try:
        url = f"{serve_url}{ROUTE}"
        wait_health(url)
        yield url
    finally:
        undeploy("adv-edge")


