"""The Helm chart renders with a real Helm, validates offline, and cannot drift from the stack."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from cluster.settings import parse_settings

CHART = Path(__file__).resolve().parents[2] / "helm" / "small4"
KUBE = "1.32.0"
PROFILES = ["default", "cpu", "h200x16"]
CRD_SCHEMAS = {
    "RayService": json.loads((Path(__file__).parent / "rayservice.schema.json").read_text()),
    "ServiceMonitor": {"type": "object", "required": ["spec"], "properties": {"spec": {
        "type": "object", "required": ["selector", "endpoints"]}}},
    "PodMonitor": {"type": "object", "required": ["spec"], "properties": {"spec": {
        "type": "object", "required": ["selector", "podMetricsEndpoints"]}}},
    "PrometheusRule": {"type": "object", "required": ["spec"], "properties": {"spec": {
        "type": "object", "required": ["groups"], "properties": {"groups": {
            "type": "array", "minItems": 1, "items": {"type": "object", "required": ["name", "rules"]}}}}}},
}


def merge(base: dict, extra: dict) -> dict:
    """Helm's values merge: maps merge, anything else replaces, null deletes the key."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def profile_values(profile: str) -> dict:
    return {} if profile == "default" else yaml.safe_load((CHART / "profiles" / f"{profile}.yaml").read_text())


@pytest.fixture(scope="module")
def render():
    with helm.Chart.load(CHART) as chart:
        def go(profile: str = "default", **overrides) -> list[dict]:
            docs = chart.render(merge(profile_values(profile), overrides), name="rel",
                                namespace="prod")
            return [d for text in docs.values() for d in yaml.safe_load_all(text) if d]
        yield go


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def pod_templates(rayservice: dict) -> list[dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def serve_args(docs: list[dict]) -> dict:
    config = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    assert app["import_path"] == "cluster.app:build_app"
    return app["args"]


@pytest.mark.parametrize("profile", PROFILES)
def test_lint_passes(profile):
    result = helm.lint(CHART, profile_values(profile), strict=True, kube_version=KUBE)
    assert result["errors"] == []
    assert not [m for m in result["messages"] if m["severity"] > 1], result["messages"]


@pytest.mark.parametrize("profile", PROFILES)
def test_every_object_validates(render, profile):
    docs = render(profile, monitoring={"serviceMonitor": {"enabled": True},
                                       "podMonitor": {"enabled": True},
                                       "prometheusRule": {"enabled": True}})
    kinds = {d["kind"] for d in docs}
    assert {"RayService", "Service", "ServiceAccount", "ConfigMap", "PrometheusRule",
            "ServiceMonitor", "PodMonitor"} <= kinds
    for doc in docs:
        if doc["kind"] in CRD_SCHEMAS:
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
        else:
            kubernetes_validate.validate(doc, KUBE, strict=True)
    for template in pod_templates(one(docs, "RayService")):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                   "template": template}
        kubernetes_validate.validate(wrapped, KUBE, strict=True)


@pytest.mark.parametrize("profile", PROFILES)
def test_serve_args_are_the_stack_settings_and_build_an_app(render, profile):
    from ray.serve import Application

    from cluster.app import build_app

    args = serve_args(render(profile))
    merged = merge(yaml.safe_load((CHART / "values.yaml").read_text()), profile_values(profile))
    assert args == merged["stack"]
    settings = parse_settings(args)
    assert settings.profile == ("h200x16" if profile == "default" else profile)
    assert isinstance(build_app(args), Application)


@pytest.mark.parametrize("profile", ["default", "h200x16"])
def test_gpu_requests_equal_tp_times_engines_per_node(render, profile):
    docs = render(profile)
    settings = parse_settings(serve_args(docs))
    topology = settings.topology
    (worker,) = one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (container,) = worker["template"]["spec"]["containers"]
    per_pod = topology.tensor_parallel * topology.engines_per_node
    assert worker["replicas"] == topology.nodes == 2
    assert container["resources"]["requests"]["nvidia.com/gpu"] == per_pod == 8
    assert container["resources"]["limits"]["nvidia.com/gpu"] == per_pod
    assert worker["rayStartParams"]["num-gpus"] == str(per_pod)
    engines_gpus = sum(role.replicas * role.num_gpus for pool in settings.pools.values()
                       for role in (pool.prefill, pool.decode))
    assert engines_gpus == worker["replicas"] * per_pod == 16


def test_cpu_profile_requests_no_gpus(render):
    text = json.dumps(render("cpu"))
    assert "nvidia.com/gpu" not in text
    assert parse_settings(serve_args(render("cpu"))).engine.kind == "reference"


def test_one_worker_pod_per_topology_node(render):
    with pytest.raises(helm.HelmError, match="must equal stack.topology.nodes"):
        render(workers={"replicas": 3})


def containers(docs):
    for template in pod_templates(one(docs, "RayService")):
        yield from template["spec"]["containers"]


def env_of(container) -> dict:
    return {e["name"]: e.get("value") for e in container["env"]}


@pytest.mark.parametrize("profile", PROFILES)
def test_every_container_is_offline_bounded_and_non_root(render, profile):
    docs = render(profile)
    for template in pod_templates(one(docs, "RayService")):
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
    for container in containers(docs):
        assert env_of(container)["RAY_USAGE_STATS_ENABLED"] == "0"
        assert container["resources"]["requests"] and container["resources"]["limits"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_otel_env_only_when_enabled(render):
    assert not any(k.startswith("OTEL_") for c in containers(render()) for k in env_of(c))
    docs = render(otel={"enabled": True, "endpoint": "http://collector:4318",
                        "resourceAttributes": {"deployment.environment": "prod"}})
    for container in containers(docs):
        env = env_of(container)
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4318"
        assert "deployment.environment=prod" in env["OTEL_RESOURCE_ATTRIBUTES"]


def test_secret_is_never_rendered_with_a_default_key(render):
    assert not [d for d in render() if d["kind"] == "Secret"]
    assert not [d for d in render("cpu") if d["kind"] == "Secret"]
    with pytest.raises(helm.HelmError, match="apiKeys.keys is empty"):
        render(apiKeys={"create": True})
    docs = render(apiKeys={"create": True, "keys": ["sk-test-0123456789abcdef"]})
    secret = one(docs, "Secret")
    assert secret["stringData"]["api-keys"].split() == ["sk-test-0123456789abcdef"]
    for template in pod_templates(one(docs, "RayService")):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["api-keys"]["secret"]["secretName"] == secret["metadata"]["name"]
    existing = render(apiKeys={"existingSecret": "ops-keys"})
    assert not [d for d in existing if d["kind"] == "Secret"]
    template = pod_templates(one(existing, "RayService"))[0]
    assert {"name": "api-keys", "secret": {"secretName": "ops-keys"}} in template["spec"]["volumes"]


def test_monitoring_objects_ship_the_repo_files(render):
    docs = render(monitoring={"prometheusRule": {"enabled": True}})
    rules = yaml.safe_load((CHART / "files" / "alert-rules.yaml").read_text())
    assert one(docs, "PrometheusRule")["spec"] == rules
    dashboard = json.loads(one(docs, "ConfigMap")["data"]["small4.json"])
    assert dashboard == json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
