"""Shared fixtures: the stand-in tokenizer and model (built once), and one Ray per test run."""

from __future__ import annotations

import os

import pytest

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")  # as `small4 up` runs it
# Test clients reach an ingress through Serve's proxy, never a load balancer that must first
# deregister it: a deleted app need not keep its ingress up for Serve's 30 s draining floor
# (direct ingress, on in throughput-optimized mode), which every module's teardown paid.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH",  # as `small4 up` sets it
                      "services.guard.http_edge:install")
# as `small4 up` sets it: replicas take calls as large as the stack's limits allow
os.environ.setdefault("RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH",
                      str(__import__("cluster.settings").settings.REPLICA_MESSAGE_BYTES))


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where CUDA and the sglang extra are; elsewhere they are skipped, saying
    why."""
    import importlib.util

    import torch

    missing = [why for ok, why in ((torch.cuda.is_available(), "no CUDA device"),
                                   (getattr(importlib.util.find_spec("sglang"), "origin",
                                            None) is not None,
                                    "the 'sglang' extra is not installed")) if not ok]
    if missing:
        skip = pytest.mark.skip(reason="gpu test: " + " and ".join(missing))
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    from services.tokenizer import PromptTokenizer

    return PromptTokenizer()


@pytest.fixture(scope="session")
def standin():
    from services.model.loader import load_model
    from services.settings import ModelSettings

    return load_model(ModelSettings())


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole run (≈5 s), on loopback, shut down at the end; metrics are
    reported every second so tests can read Ray's Prometheus endpoint."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
             logging_level="ERROR", log_to_driver=False,
             _system_config={"metrics_report_interval_ms": 1000})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_url(ray_session):
    """Serve's HTTP proxy on a free loopback port, started once per run; every tier deploys its
    apps under their own route prefix beside the others."""
    from ray import serve

    from bench.ports import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def metrics_url(ray_session):
    node = ray_session._private.worker.global_worker.node
    return f"http://127.0.0.1:{node.metrics_export_port}/metrics"
