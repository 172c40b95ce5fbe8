"""The Helm chart renders with a real Helm, validates offline, and cannot drift from the stack."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from stack_schema import VALUES_SCHEMA, key_entry, stack_defs

from cluster.settings import SettingsError, parse_settings
from tests.promql import fires

CHART = Path(__file__).resolve().parents[2] / "helm" / "small4"
KUBE = "1.32.0"
PROFILES = ["default", "cpu", "h200x16"]
GPU_PROFILES = ["default", "h200x16"]
SCHEMAS = Path(__file__).parent / "schemas"
CRD_SCHEMAS = {kind: json.loads((SCHEMAS / f"{kind.lower()}.json").read_text())
               for kind in ("RayService", "ServiceMonitor", "PodMonitor", "PrometheusRule")}
ALL_OBJECTS = {"monitoring": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True},
                              "prometheusRule": {"enabled": True}},
               "apiKeys": {"create": True, "existingSecret": "",
                           "keys": [{"name": "ci", "tenant": "ci", "sha256": "0" * 64}]}}
TRACING = {"telemetry": {"tracing": {"enabled": True}}}
# Importing Ray Serve emits pydantic v1-style deprecation warnings from Ray's own config models.
RAY_SERVE_IMPORT = pytest.mark.filterwarnings(
    "ignore::pydantic.warnings.PydanticDeprecatedSince20")


def deep_merge(base: dict, extra: dict) -> dict:
    """Overrides on top of a profile's values: maps merge, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def profile_values(profile: str) -> dict:
    if profile == "default":
        return {}
    return yaml.safe_load((CHART / "profiles" / f"{profile}.yaml").read_text())


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def render(chart):
    def go(profile: str = "default", release: str = "rel", **overrides) -> list[dict]:
        values = deep_merge(profile_values(profile), overrides)
        docs = chart.render(values, name=release, namespace="prod")
        return [d for text in docs.values() for d in yaml.safe_load_all(text) if d]
    return go


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def cluster_of(docs: list[dict]) -> dict:
    return one(docs, "RayService")["spec"]["rayClusterConfig"]


def pod_templates(docs: list[dict]) -> list[dict]:
    cluster = cluster_of(docs)
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def containers(docs: list[dict]):
    for template in pod_templates(docs):
        yield from template["spec"]["containers"]


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def serve_config(docs: list[dict]) -> dict:
    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


def serve_args(docs: list[dict]) -> dict:
    (app,) = serve_config(docs)["applications"]
    assert (app["name"], app["import_path"], app["route_prefix"]) == (
        "small4", "cluster.app:build_app", "/")
    return app["args"]


# Rendering, lint and offline validation

@pytest.mark.parametrize("profile", PROFILES)
def test_lint_passes_strict(profile):
    result = helm.lint(CHART, profile_values(profile), strict=True, kube_version=KUBE)
    assert result["errors"] == []
    assert not [m for m in result["messages"] if m["severity"] > 1], result["messages"]


@pytest.mark.parametrize("profile", PROFILES)
def test_every_object_validates_offline(render, profile):
    docs = render(profile, **ALL_OBJECTS)
    assert {"RayService", "Service", "ServiceAccount", "ConfigMap", "Secret", "PrometheusRule",
            "ServiceMonitor", "PodMonitor"} <= {d["kind"] for d in docs}
    for doc in docs:
        if doc["kind"] in CRD_SCHEMAS:
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
        else:
            kubernetes_validate.validate(doc, KUBE, strict=True)
    for template in pod_templates(docs):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                      "metadata": {"name": "t"}, "template": template},
                                     KUBE, strict=True)
    serve_service = one(docs, "RayService")["spec"]["serveService"]
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Service", **serve_service},
                                 KUBE, strict=True)


def test_our_schemas_can_fail(render):
    rayservice = one(render(), "RayService")
    broken = copy.deepcopy(rayservice)
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replica"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, CRD_SCHEMAS["RayService"])
    template = pod_templates(render())[1]
    template["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                      "metadata": {"name": "t"}, "template": template},
                                     KUBE, strict=True)


def test_default_renders_the_expected_objects_and_no_secret(render):
    kinds = sorted(d["kind"] for d in render())
    assert kinds == ["ConfigMap", "NetworkPolicy", "PodDisruptionBudget", "RayService", "Service",
                     "ServiceAccount"]
    assert "PodDisruptionBudget" not in {d["kind"] for d in render("cpu")}


def test_upgrade_strategy_is_the_operators_unless_set(render):
    assert "upgradeStrategy" not in one(render(), "RayService")["spec"]
    rayservice = one(render(upgradeStrategy="None"), "RayService")
    assert rayservice["spec"]["upgradeStrategy"] == {"type": "None"}
    jsonschema.validate(rayservice, CRD_SCHEMAS["RayService"])


def test_an_upgrade_keeps_the_old_cluster_until_its_requests_could_end(render):
    """KubeRay deletes the old cluster 60 s after an upgrade moved traffic unless told: every
    stream still running then was cut. The delay covers the request timeout, or rendering
    fails; the head never takes client traffic."""
    spec = one(render(), "RayService")["spec"]
    assert spec["rayClusterDeletionDelaySeconds"] >= 600
    assert spec["excludeHeadPodFromServeSvc"] is True
    longer = {"limits": {"request_timeout_s": 900}}
    with pytest.raises(Exception, match="shorter than stack.limits.request_timeout_s"):
        render(stack=longer)
    spec = one(render(stack=longer, clusterDeletionDelaySeconds=960), "RayService")["spec"]
    assert spec["rayClusterDeletionDelaySeconds"] == 960
    jsonschema.validate(one(render(), "RayService"), CRD_SCHEMAS["RayService"])


@pytest.mark.parametrize("profile", PROFILES)
def test_every_object_store_fits_its_pods_shared_memory_with_room_left(render, profile):
    """Ray's default store (30 % of the memory limit) is larger than the head's /dev/shm and
    would spill to disk; on the GPU workers it takes 95 % of it, leaving NCCL and the engines
    ~3 GiB. Each group sets its store within its /dev/shm, with room left."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    cluster = cluster_of(render(profile))
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        (shm,) = [v for v in group["template"]["spec"]["volumes"] if v["name"] == "shm"]
        size = shm["emptyDir"]["sizeLimit"]
        shm_bytes = int(size[:-2]) * units[size[-2:]]
        store = int(group["rayStartParams"]["object-store-memory"])
        assert 0 < store <= shm_bytes * 0.75, (group.get("groupName", "head"), store, size)


def test_pod_templates_carry_only_stable_labels(render):
    for template in pod_templates(render()):
        assert set(template["metadata"]["labels"]) == {
            "app.kubernetes.io/name", "app.kubernetes.io/instance", "small4.role"}, (
            "a label that changes with the chart version would rebuild the cluster")


def test_rayservice_name_fits_kuberay_limit(render):
    rayservice = one(render(release="a-release-name-of-fifty-three-characters-for-testing"),
                     "RayService")
    assert len(rayservice["metadata"]["name"]) <= 47
    jsonschema.validate(rayservice, CRD_SCHEMAS["RayService"])


# One schema for local runs and production

def test_values_schema_carries_the_settings_root_schema():
    schema = json.loads(VALUES_SCHEMA.read_text())
    assert schema["properties"]["stack"] == {"$ref": "#/$defs/StackSettings"}
    assert schema["$defs"] == stack_defs(), (
        "values.schema.json is stale: run `python tests/helm/stack_schema.py`")
    assert schema["properties"]["apiKeys"]["properties"]["keys"]["items"] == key_entry(), (
        "values.schema.json is stale: run `python tests/helm/stack_schema.py`")


@pytest.mark.parametrize(("stack", "where"), [
    ({"engine": {"kind": "sglang", "tensor_parallel": 2}}, "/stack/engine"),
    ({"pools": {"fast": {"decode": {"replicas": "two"}}}}, "/stack/pools/fast/decode/replicas"),
    ({"kv_handoff": {"backend": "nccl"}}, "/stack/kv_handoff/backend"),
])
def test_helm_refuses_a_stack_the_settings_root_refuses(render, stack, where):
    with pytest.raises(helm.HelmValuesError, match=where):
        render(stack=stack)


@pytest.mark.parametrize("profile", PROFILES)
def test_stack_of_every_profile_validates_against_the_settings_root(chart, profile):
    stack = chart.merge_values(profile_values(profile))["stack"]
    settings = parse_settings(stack)
    assert settings.profile == ("h200x16" if profile == "default" else profile)


@RAY_SERVE_IMPORT
@pytest.mark.parametrize("profile", PROFILES)
def test_serve_config_is_ray_serves_and_its_args_build_the_app(chart, render, profile):
    import ray
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from cluster.app import build_app

    docs = render(profile)
    ServeDeploySchema.parse_obj(serve_config(docs))
    args = serve_args(docs)
    assert args == chart.merge_values(profile_values(profile))["stack"]
    ray_was_running = ray.is_initialized()
    assert isinstance(build_app(args), Application)
    assert ray.is_initialized() == ray_was_running, "building the application started Ray"


@pytest.mark.parametrize("profile", PROFILES)
def test_serve_listens_on_the_stack_http_port(render, profile):
    for port, docs in [(8000, render(profile)),
                       (8100, render(profile, stack={"http": {"port": 8100}}))]:
        assert serve_config(docs)["http_options"] == {"host": "0.0.0.0", "port": port}
        head, *workers = (t["spec"]["containers"][0] for t in pod_templates(docs))
        ports = {p["name"]: p["containerPort"] for p in head["ports"]}
        assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": port,
                         "metrics": 8080}
        # every node runs a proxy, on the port KubeRay's readiness probe of a worker asks
        assert workers and all({p["name"]: p["containerPort"] for p in w["ports"]} == {
            "serve": port, "metrics": 8080} for w in workers)
        serve_service = one(docs, "RayService")["spec"]["serveService"]
        assert serve_service["spec"]["ports"] == [{"name": "serve", "port": port,
                                                   "protocol": "TCP"}]
        assert serve_service["metadata"]["name"] == one(docs, "RayService")["metadata"]["name"]


def test_ray_version_is_the_one_the_project_pins(chart):
    import ray

    for profile in PROFILES:
        values = chart.merge_values(profile_values(profile))
        assert values["rayVersion"] == ray.__version__
        assert values["image"]["tag"].startswith(values["rayVersion"] + "-")


# GPUs and topology

@pytest.mark.parametrize("profile", GPU_PROFILES)
def test_gpu_requests_equal_tp_times_engines_per_node(render, profile):
    docs = render(profile)
    settings = parse_settings(serve_args(docs))
    topology = settings.topology
    (worker,) = cluster_of(docs)["workerGroupSpecs"]
    (container,) = worker["template"]["spec"]["containers"]
    per_pod = topology.tensor_parallel * topology.engines_per_node
    assert (topology.tensor_parallel, topology.engines_per_node) == (2, 4)
    assert container["resources"]["requests"]["nvidia.com/gpu"] == per_pod == 8
    assert container["resources"]["limits"]["nvidia.com/gpu"] == per_pod
    assert worker["rayStartParams"]["num-gpus"] == str(per_pod)
    assert worker["replicas"] == worker["minReplicas"] == worker["maxReplicas"] == topology.nodes
    engine_gpus = sum(role.replicas * role.num_gpus for pool in settings.pools.values()
                      for role in (pool.prefill, pool.decode))
    assert engine_gpus <= worker["replicas"] * per_pod
    assert engine_gpus == 16 and len(settings.placements()) == 8


def test_gpu_count_follows_the_topology(render):
    docs = render(stack={"topology": {"gpus_per_node": 6, "tensor_parallel": 4},
                         "pools": {name: {role: {"num_gpus": 4, "replicas": 1}
                                          for role in ("prefill", "decode")}
                                   for name in ("fast", "deep")}})
    (worker,) = cluster_of(docs)["workerGroupSpecs"]
    assert worker["template"]["spec"]["containers"][0]["resources"]["requests"][
        "nvidia.com/gpu"] == 4, "one TP4 engine per 6-GPU node uses 4 GPUs"


def test_h200x16_profile_is_the_production_shape(chart):
    values = chart.merge_values(profile_values("h200x16"))
    stack = values["stack"]
    shape = {name: (pool["prefill"]["replicas"], pool["decode"]["replicas"])
             for name, pool in stack["pools"].items()}
    assert shape == {"fast": (1, 2), "deep": (2, 3)}
    assert {r["num_gpus"] for p in stack["pools"].values() for r in (p["prefill"], p["decode"])} == {2}
    assert (stack["engine"]["kind"], stack["kv_handoff"]["backend"]) == ("sglang", "sglang")
    assert stack["model"]["context_length"] == 262144


@pytest.mark.parametrize("profile", GPU_PROFILES)
def test_checkpoint_lies_on_the_mounted_weights_volume(render, chart, profile):
    values = chart.merge_values(profile_values(profile))
    model = values["stack"]["model"]
    mount = values["workers"]["modelVolume"]["mountPath"]
    assert model["source"] == "checkpoint" and "mistral-small-4" in model["path"]
    assert model["path"].startswith(mount.rstrip("/") + "/")
    worker = pod_templates(render(profile))[1]["spec"]["containers"][0]
    assert {"name": "models", "mountPath": mount, "readOnly": True} in worker["volumeMounts"]


def test_cpu_profile_requests_no_gpus(render):
    docs = render("cpu")
    assert "nvidia.com/gpu" not in json.dumps(docs)
    assert cluster_of(docs)["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] == "0"
    assert "nodeSelector" not in pod_templates(docs)[1]["spec"]
    assert parse_settings(serve_args(docs)).engine.kind == "reference"


def test_one_worker_pod_per_topology_node(render):
    with pytest.raises(helm.HelmRenderError, match="must equal stack.topology.nodes"):
        render(workers={"replicas": 3})


# Pods: offline, bounded, non-root

@pytest.mark.parametrize("profile", PROFILES)
def test_every_container_is_offline_bounded_and_non_root(render, profile):
    docs = render(profile)
    for template in pod_templates(docs):
        security = template["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert template["spec"]["automountServiceAccountToken"] is False
    for container in containers(docs):
        env = env_of(container)
        assert (env["RAY_USAGE_STATS_ENABLED"], env["HF_HUB_OFFLINE"]) == ("0", "1")
        # Serve's proxy bounds request heads (431) and answers edge errors as JSON
        callback = env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"]
        assert callback == "services.guard.http_edge:install"
        resources = container["resources"]
        assert set(resources["requests"]) >= {"cpu", "memory"}
        assert set(resources["limits"]) >= {"cpu", "memory"}
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize("optimized", [True, False])
def test_serve_keeps_a_proxy_on_every_node(render, optimized):
    """Ray Serve's throughput mode turns on direct ingress, under which the controller runs
    the only HTTP proxy on the head: the chart keeps the mode's gRPC and event-loop settings
    without it (read from Ray's own constants under each container's environment)."""
    docs = render(stack={"ray": {"throughput_optimized": optimized}})
    envs = {tuple(sorted((k, v) for k, v in env_of(c).items() if isinstance(v, str)))
            for c in containers(docs)}
    for env in map(dict, envs):
        probe = ("from ray.serve._private import constants as c; "
                 "print(c.RAY_SERVE_ENABLE_DIRECT_INGRESS, c.RAY_SERVE_USE_GRPC_BY_DEFAULT)")
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             env={"PATH": os.environ.get("PATH", "")} | env, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == ["False", str(optimized)], out.stdout


def test_otel_env_only_when_enabled(render):
    assert not any(k.startswith("OTEL_") for c in containers(render()) for k in env_of(c))
    assert not any(k.startswith("OTEL_") for c in containers(render("cpu")) for k in env_of(c))
    docs = render(otel={"enabled": True, "endpoint": "http://collector:4318",
                        "resourceAttributes": {"deployment.environment": "prod"}}, stack=TRACING)
    for container in containers(docs):
        env = env_of(container)
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4318"
        assert env["OTEL_SERVICE_NAME"] == "small4"
        attributes = env["OTEL_RESOURCE_ATTRIBUTES"].split(",")
        assert {"deployment.environment=prod", "k8s.namespace.name=prod",
                "k8s.pod.name=$(K8S_POD_NAME)"} <= set(attributes)
        names = [e["name"] for e in container["env"]]
        assert names.index("K8S_POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")
    assert all("OTEL_EXPORTER_OTLP_ENDPOINT" in env_of(c) for c in containers(render("h200x16")))


def test_otel_turns_tracing_on_unless_the_stack_turns_it_off(render):
    docs = render(otel={"enabled": True})  # the environment alone enables tracing
    assert all("OTEL_EXPORTER_OTLP_ENDPOINT" in env_of(c) for c in containers(docs))
    with pytest.raises(helm.HelmRenderError, match="stack.telemetry.tracing.enabled is false"):
        render(otel={"enabled": True}, stack={"telemetry": {"tracing": {"enabled": False}}})


def test_extra_env_from_reaches_every_container(render):
    docs = render(extraEnvFrom=[{"secretRef": {"name": "otlp-auth"}}])
    assert all(c["envFrom"] == [{"secretRef": {"name": "otlp-auth"}}] for c in containers(docs))
    assert not any("envFrom" in c for c in containers(render()))


# API keys

def test_secret_is_never_rendered_with_a_default_key(render):
    for profile in PROFILES:
        docs = render(profile)
        assert not [d for d in docs if d["kind"] == "Secret"]
        assert {v["secret"]["secretName"] for t in pod_templates(docs)
                for v in t["spec"]["volumes"] if v["name"] == "api-keys"} == {"small4-api-keys"}
    with pytest.raises(helm.HelmRenderError, match="apiKeys.keys is empty"):
        render(apiKeys={"create": True, "existingSecret": ""})
    with pytest.raises(helm.HelmValuesError, match="/apiKeys/keys/0"):
        render(apiKeys={"create": True, "existingSecret": "", "keys": ["sk-plaintext-key-0123"]})


def test_created_secret_holds_digests_where_the_stack_reads_them(render):
    from services.guard.keys import KeysFile, digest

    keys = [{"name": "search", "tenant": "search", "sha256": digest("sk-a")},
            {"name": "ops", "tenant": "ops", "sha256": digest("sk-b"), "revoked": True,
             "quota": {"requests_per_s": 5}}]
    docs = render(apiKeys={"create": True, "existingSecret": "", "keys": keys})
    secret = one(docs, "Secret")
    parsed = KeysFile.model_validate(yaml.safe_load(secret["stringData"]["keys.yaml"]))
    assert [k.model_dump(exclude_defaults=True) for k in parsed.keys] == keys
    stack = parse_settings(serve_args(docs))
    for template in pod_templates(docs):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["api-keys"]["secret"]["secretName"] == secret["metadata"]["name"]
        (container,) = template["spec"]["containers"]
        mount = {"name": "api-keys", "mountPath": "/etc/small4/keys", "readOnly": True}
        assert mount in container["volumeMounts"]
        assert str(stack.auth.keys_file).startswith(mount["mountPath"] + "/")


def test_keys_the_stack_would_refuse_are_refused_by_the_chart(render):
    """A keys file the stack refuses keeps every ingress replica from starting (and an upgrade
    that only changes the Secret leaves the last good keys, a key revoked in it still working):
    a quota field misspelt, a quota of 0, a digest listed twice never render."""
    from services.guard.keys import digest

    key = {"name": "search", "tenant": "search", "sha256": digest("sk-a")}
    for quota, where in (({"requests_per_sec": 5}, "/apiKeys/keys/0/quota"),
                         ({"requests_per_s": 0}, "/apiKeys/keys/0/quota")):
        with pytest.raises(helm.HelmValuesError, match=where):
            render(apiKeys={"create": True, "existingSecret": "",
                            "keys": [key | {"quota": quota}]})
    with pytest.raises(helm.HelmRenderError, match="is listed twice"):
        render(apiKeys={"create": True, "existingSecret": "",
                        "keys": [key, key | {"name": "copy", "revoked": True}]})


def test_existing_secret_is_referenced_not_rendered(render):
    docs = render(apiKeys={"existingSecret": "ops-keys"})
    assert not [d for d in docs if d["kind"] == "Secret"]
    for template in pod_templates(docs):
        assert {"name": "api-keys", "secret": {"secretName": "ops-keys"}} in template["spec"]["volumes"]
    with pytest.raises(helm.HelmRenderError, match="not both"):
        render(apiKeys={"existingSecret": "ops-keys", "create": True,
                        "keys": [{"name": "a", "tenant": "a", "sha256": "0" * 64}]})


# Monitoring

def test_monitoring_objects_ship_the_repo_files(render):
    docs = render(monitoring={"prometheusRule": {"enabled": True}})
    rules = yaml.safe_load((CHART / "files" / "alert-rules.yaml").read_text())
    assert one(docs, "PrometheusRule")["spec"]["groups"][1:] == rules["groups"]
    dashboard_map = one(docs, "ConfigMap")
    assert dashboard_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(dashboard_map["data"]["small4.json"])
    assert dashboard == json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    assert {"PrometheusRule", "ServiceMonitor", "PodMonitor"}.isdisjoint(
        d["kind"] for d in render())


def test_monitors_select_the_metrics_port(render):
    docs = render(**ALL_OBJECTS)
    service = next(d for d in docs if d["kind"] == "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    selector = one(docs, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    pod_selector = one(docs, "PodMonitor")["spec"]["selector"]["matchLabels"]
    for template in pod_templates(docs):
        labels = template["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        assert pod_selector.items() <= labels.items()
        assert "metrics" in {p["name"] for p in template["spec"]["containers"][0]["ports"]}
    pdb = one(docs, "PodDisruptionBudget")["spec"]
    # minAvailable as an integer: the only form the disruption controller can evaluate for
    # pods whose controller (a RayCluster) has no scale subresource
    assert "maxUnavailable" not in pdb and pdb["minAvailable"] == 1  # 2 workers, 1 may go
    budget = pdb["selector"]["matchLabels"]
    assert budget.items() <= pod_templates(docs)[1]["metadata"]["labels"].items()
    assert not budget.items() <= pod_templates(docs)[0]["metadata"]["labels"].items()


# Network: who reaches the metrics endpoint and the dashboard

def test_network_policy_lets_only_named_peers_scrape_or_reach_the_dashboard(render):
    policy = one(render(), "NetworkPolicy")["spec"]
    rules = policy["ingress"]
    by_port = {p["port"]: rule.get("from") for rule in rules for p in rule.get("ports", ())}
    assert by_port[8000] is None  # the ingress: anyone (httpFrom empty)
    assert by_port[8080] == [{"namespaceSelector": {
        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert by_port[8265] and by_port[52365] and by_port[8265] != by_port[8080]
    # the operator's pods wherever it runs, not one namespace it may not be in
    assert by_port[8265] == [{"namespaceSelector": {}, "podSelector": {
        "matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]
    peers = [rule for rule in rules if "ports" not in rule]
    assert peers == [{"from": [{"podSelector": {"matchLabels": policy["podSelector"][
        "matchLabels"]}}]}]  # the release's own pods, every port
    closed = one(render(networkPolicy={"enabled": True, "metricsFrom": []}), "NetworkPolicy")
    assert 8080 not in {p["port"] for r in closed["spec"]["ingress"] for p in r.get("ports", ())}
    assert not [d for d in render(networkPolicy={"enabled": False})
                if d["kind"] == "NetworkPolicy"]


def test_the_metrics_port_is_the_stacks_own_everywhere(render):
    """One number, checked by the settings against the HTTP and bootstrap ports: Ray's export
    port on every pod, the container port, the metrics Service and the NetworkPolicy."""
    docs = render(stack={"ray": {"metrics_port": 9400}}, **ALL_OBJECTS)
    cluster = cluster_of(docs)
    assert cluster["headGroupSpec"]["rayStartParams"]["metrics-export-port"] == "9400"
    assert {g["rayStartParams"]["metrics-export-port"] for g in cluster["workerGroupSpecs"]} \
        == {"9400"}
    for container in containers(docs):
        assert {"name": "metrics", "containerPort": 9400} in container["ports"]
    service = next(d for d in docs if d["kind"] == "Service")
    assert service["spec"]["ports"][0]["port"] == 9400
    policy = one(docs, "NetworkPolicy")["spec"]["ingress"]
    assert 9400 in {p["port"] for rule in policy for p in rule.get("ports", ())}
    # a clash is the settings' to find, as for any port of the stack (the app refuses it)
    clash = serve_args(render("h200x16", stack={"ray": {"metrics_port": 8998}}))
    with pytest.raises(SettingsError, match="8998"):
        parse_settings(clash)
    with pytest.raises(helm.HelmValuesError, match="metricsPort"):
        render(metricsPort=9400)  # the old value: refused, not silently ignored


def test_api_keys_are_mounted_only_where_the_stack_reads_them(render):
    open_docs = render(stack={"auth": {"enabled": False}})
    for template in pod_templates(open_docs):
        assert "api-keys" not in {v["name"] for v in template["spec"]["volumes"]}
    with pytest.raises(helm.HelmRenderError, match="not under apiKeys.mountPath"):
        render(apiKeys={"mountPath": "/var/run/keys"})
    mounted = render(apiKeys={"mountPath": "/var/run/keys"},
                     stack={"auth": {"keys_file": "/var/run/keys/keys.yaml"}})
    for container in containers(mounted):
        assert {"name": "api-keys", "mountPath": "/var/run/keys", "readOnly": True} in \
            container["volumeMounts"]
    with pytest.raises(helm.HelmRenderError, match="needs the API keys"):
        render(apiKeys={"existingSecret": ""})


@pytest.mark.parametrize("slos, thresholds", [
    ({}, {"fast": "1", "deep": "4"}),  # the chart's pools: 1 s and 4 s
    ({"fast": 0.3, "deep": 6.0}, {"fast": "0.5", "deep": "10"}),  # the next bucket up
])
def test_ttft_burn_alerts_follow_each_pools_own_slo(render, slos, thresholds):
    """A pool's burn rate is measured against its own slo.ttft_s (a deep pool answering within
    its 4 s paged at a fixed 2.5 s), at the first latency bucket at or above it."""
    from services.telemetry import metrics

    stack = {"pools": {pool: {"slo": {"ttft_s": slo}} for pool, slo in slos.items()}}
    docs = render(monitoring={"prometheusRule": {"enabled": True}}, stack=stack)
    slo_group = one(docs, "PrometheusRule")["spec"]["groups"][0]
    assert slo_group["name"] == "small4-slo"
    by_pool: dict[str, set] = {}
    for rule in slo_group["rules"]:
        pool = rule["labels"]["pool"]
        assert rule["alert"] in {"Small4TTFTBudgetBurnFast", "Small4TTFTBudgetBurnSlow"}
        assert set(re.findall(r'pool="(\w+)"', rule["expr"])) == {pool}
        by_pool.setdefault(pool, set()).update(re.findall(r'le=~"([0-9.]+)\(', rule["expr"]))
        assert set(re.findall(r"\bray_small4_\w+", rule["expr"])) == {
            "ray_small4_ttft_seconds_bucket", "ray_small4_ttft_seconds_count",
            "ray_small4_ttft_missed_total"}
    assert by_pool == {pool: {le} for pool, le in thresholds.items()}
    # the chart's bucket list is the histograms'
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    listed = re.search(r'define "small4.latencyBuckets" -}}\n([0-9.,]+)', helpers).group(1)
    assert [float(b) for b in listed.split(",")] == metrics.LATENCY_BUCKETS
    with pytest.raises(helm.HelmRenderError, match="above the largest latency bucket"):
        render(monitoring={"prometheusRule": {"enabled": True}},
               stack={"pools": {"fast": {"slo": {"ttft_s": 500.0}}}})


def test_ttft_burn_alerts_count_first_tokens_that_never_came(render):
    """Evaluated on the rendered rules (fast pool: 1 s): the TTFT histogram sees only first
    tokens, so a pool whose prefills all stall (every request timing out or abandoned, no
    first token at all) burnt no budget and paged no one; those requests count as misses
    now, beside the slow first tokens, and one pool's misses do not page for another."""
    docs = render(monitoring={"prometheusRule": {"enabled": True}})
    rules = one(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]
    burn = {(r["labels"]["pool"], r["alert"][len("Small4TTFTBudgetBurn"):]): r["expr"]
            for r in rules}

    def ttft(pool: str, within: float, total: float) -> list:
        labels = {"pool": pool, "role": "ingress"}
        return [("ray_small4_ttft_seconds_bucket", labels | {"le": "1.0"}, within),
                ("ray_small4_ttft_seconds_count", labels, total)]

    def missed(pool: str, rate: float) -> list:
        return [("ray_small4_ttft_missed_total", {"pool": pool}, rate)]

    healthy = ttft("fast", 10.0, 10.0)
    assert not any(fires(expr, healthy) for expr in burn.values())
    stalled = missed("fast", 1.0)  # no first token since the replicas started
    assert fires(burn["fast", "Fast"], stalled) and fires(burn["fast", "Slow"], stalled)
    assert not fires(burn["deep", "Fast"], stalled)
    some = healthy + missed("fast", 1.0)  # 1 in 11 (9 %): above the slow rule's 6 %
    assert fires(burn["fast", "Slow"], some) and not fires(burn["fast", "Fast"], some)
    slow = ttft("fast", 8.0, 10.0)  # 20 % of first tokens late, nothing missed
    assert fires(burn["fast", "Fast"], slow)


# Disruptions: node drains and upgrades

@pytest.mark.parametrize(("workers", "budget", "min_available"), [
    (2, 1, 1),          # the default: one worker pod at a time
    (4, 2, 2),
    (2, "50%", 1),
    (4, "50%", 2),
    (3, "50%", 1),      # 1.5 pods may go: rounded up, as the disruption controller rounds it
    (4, "100%", 0),
    (4, "0%", 4),
])
def test_disruption_budget_counts_or_percentages_leave_evictions_allowed(
        render, workers, budget, min_available):
    """A percentage budget becomes the integer minAvailable a RayCluster's pods can be evicted
    under (the chart once converted "50%" with `int`, to 0: no eviction, `kubectl drain` hung)."""
    docs = render("cpu", podDisruptionBudget={"enabled": True, "maxUnavailable": budget},
                  workers={"replicas": workers})
    pdb = one(docs, "PodDisruptionBudget")
    kubernetes_validate.validate(pdb, KUBE, strict=True)
    assert "maxUnavailable" not in pdb["spec"]
    assert pdb["spec"]["minAvailable"] == min_available
    assert cluster_of(docs)["workerGroupSpecs"][0]["replicas"] == workers


@pytest.mark.parametrize("budget", ["50", "one", "150%", "-1%", -1, 1.5])
def test_disruption_budget_refuses_what_it_cannot_count(render, budget):
    with pytest.raises(helm.HelmValuesError, match="/podDisruptionBudget/maxUnavailable"):
        render(podDisruptionBudget={"enabled": True, "maxUnavailable": budget})


def longest_drain_deadline(docs: list[dict]) -> float:
    """The longest graceful_shutdown_timeout_s Serve gives any deployment of the rendered stack,
    as the settings (defaults included) set it."""
    from cluster.topology import deployment_options

    settings = parse_settings(serve_args(docs))
    roles = [settings.ingress, settings.multimodal] + [
        role for pool in settings.pools.values() for role in (pool.prefill, pool.decode)]
    return max(deployment_options(role)["graceful_shutdown_timeout_s"] for role in roles)


def drain_of(docs: list[dict]) -> set[tuple[int, float]]:
    """Each pod's (terminationGracePeriodSeconds, Ray's SIGTERM drain timeout)."""
    return {(t["spec"]["terminationGracePeriodSeconds"],
             float(env_of(t["spec"]["containers"][0])["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"]))
            for t in pod_templates(docs)}


@pytest.mark.parametrize(("profile", "stack", "longest"), [
    ("default", {}, 60),                # every deadline the settings' default
    ("cpu", {}, 60),
    ("default", {"pools": {"deep": {"decode": {"drain_deadline_s": 600}}}}, 600),
    ("default", {"pools": {"fast": {"prefill": {"drain_deadline_s": 90.5}}}}, 90.5),
    ("cpu", {"ingress": {"drain_deadline_s": 240}}, 240),
    ("default", {"multimodal": {"drain_deadline_s": 5},
                 "pools": {"fast": {"decode": {"drain_deadline_s": 10}}}}, 60),
])
def test_pods_outlast_the_longest_drain_deadline(render, profile, stack, longest):
    """Head and workers get Ray's SIGTERM drain (the node draining, its replicas given their
    graceful_shutdown_timeout_s) above the stack's longest drain deadline, and a grace period
    above that: Kubernetes' default 30 s cut every stream a drain or an upgrade met."""
    docs = render(profile, stack=stack)
    assert longest_drain_deadline(docs) == longest
    ((grace, drain),) = drain_of(docs)  # one value for the head and the workers
    assert drain == math.ceil(longest) + 15
    assert grace == drain + 15


def test_the_stacks_ray_drain_timeout_holds_in_the_chart_as_in_small4_up(render):
    docs = render(stack={"ray": {"drain_timeout_s": 300}})
    assert longest_drain_deadline(docs) == 60  # above every deployment's own
    ((grace, drain),) = drain_of(docs)
    assert drain == parse_settings(serve_args(docs)).drain_s() + 15 == 315


def test_grace_period_follows_a_changed_drain_deadline(render):
    before = drain_of(render())
    after = drain_of(render(stack={"pools": {"deep": {"decode": {"drain_deadline_s": 300}}}}))
    assert before == {(90, 75.0)} and after == {(330, 315.0)}


def test_drain_timeout_is_the_one_ray_reads(render):
    """The variable is Ray's own: Ray, under the rendered environment, drains that long."""
    (env,) = {tuple(sorted((k, v) for k, v in env_of(t["spec"]["containers"][0]).items()
                           if isinstance(v, str))) for t in pod_templates(render())}
    probe = ("from ray._private import ray_constants as c; "
             "print(c.RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={"PATH": os.environ.get("PATH", "")} | dict(env), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout) == 75.0


@pytest.mark.parametrize("stack, stall", [({}, 30.0), ({"limits": {"write_stall_s": 12.5}}, 12.5)])
def test_the_proxy_cuts_a_stalled_reader_after_the_stacks_own_bound(render, stack, stall):
    """Serve's proxy owns the client socket here (no direct ingress): the edge callback reads
    the stack's `limits.write_stall_s` from the pods' environment, as it imports it."""
    values = {t["spec"]["containers"][0]["name"]: env_of(t["spec"]["containers"][0])
              for t in pod_templates(render(stack=stack))}
    (env,) = {env["SMALL4_WRITE_STALL_S"] for env in values.values()}  # every pod's proxy
    probe = "from services.guard import http_edge; print(http_edge.WRITE_STALL_S)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=dict(os.environ, SMALL4_WRITE_STALL_S=env), timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout) == stall


@pytest.mark.parametrize("limits", [{}, {"max_body_bytes": 150_000_000,
                                         "edge_body_budget_bytes": 3_000_000_000}])
def test_the_proxy_bounds_bodies_by_the_stacks_own_limits(render, limits):
    """The edge callback reads `limits.max_body_bytes` and `limits.edge_body_budget_bytes`
    from the pods' environment (numbers Helm would print in exponent form unless made
    integers)."""
    from services.settings import LimitSettings

    want = LimitSettings(**limits)
    values = [env_of(t["spec"]["containers"][0])
              for t in pod_templates(render(stack={"limits": limits} if limits else {}))]
    (env,) = {(v["SMALL4_MAX_BODY_BYTES"], v["SMALL4_EDGE_BODY_BUDGET_BYTES"]) for v in values}
    probe = ("from services.guard import http_edge; "
             "print(http_edge.MAX_BODY_BYTES, http_edge.BODY_BUDGET_BYTES)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=dict(os.environ, SMALL4_MAX_BODY_BYTES=env[0],
                                  SMALL4_EDGE_BODY_BUDGET_BYTES=env[1]), timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(want.max_body_bytes), str(want.edge_body_budget_bytes)]


def test_every_pods_proxy_checks_keys_from_the_stacks_keys_file_where_auth_is_on(render):
    """Serve's proxy refuses a request without a valid key before reading its body: every pod
    (a proxy on each) names the file the stack reads keys from and its reload period, as the
    edge callback reads them; with auth off, none."""
    origins = ["https://app.example", "https://b.example"]
    docs = render(stack={"auth": {"reload_s": 2.5, "cors_origins": origins}})
    stack = parse_settings(serve_args(docs))
    names = ("SMALL4_KEYS_FILE", "SMALL4_KEYS_RELOAD_S", "SMALL4_CORS_ORIGINS")
    (env,) = {tuple(e.get(n) for n in names)
              for e in (env_of(t["spec"]["containers"][0]) for t in pod_templates(docs))}
    probe = "from services.guard import http_edge as e; " \
            "print(repr((e.KEYS_FILE, e.KEYS_RELOAD_S, sorted(e.CORS_ORIGINS))))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=dict(os.environ, **dict(zip(names, env))), timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == repr((str(stack.auth.keys_file), stack.auth.reload_s,
                                       sorted(stack.auth.cors_origins)))
    for template in pod_templates(render(stack={"auth": {"enabled": False}})):
        assert "SMALL4_KEYS_FILE" not in env_of(template["spec"]["containers"][0])


def test_replicas_take_calls_as_large_as_the_stacks_limits(render):
    """Serve's gRPC between replicas takes 4 MiB in one call by default: a request of a 3 MB
    image failed on its way to the image service. The pods give Serve what `small4 up` gives
    it, read by Serve itself."""
    from cluster.settings import REPLICA_MESSAGE_BYTES

    docs = render()
    (value,) = {env_of(t["spec"]["containers"][0])["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"]
                for t in pod_templates(docs)}
    assert int(value) == REPLICA_MESSAGE_BYTES
    assert int(value) > parse_settings(serve_args(docs)).limits.max_body_bytes
    probe = ("from ray.serve._private import constants; "
             "print(constants.RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=dict(os.environ, RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH=value),
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == value


def test_a_checkpoint_off_the_model_volume_is_refused(render):
    """A checkpoint path outside the workers' model volume, or no volume, rendered; every
    engine then failed to load its weights, after 16 GPUs were held."""
    with pytest.raises(helm.HelmRenderError, match="is not under workers.modelVolume.mountPath"):
        render(stack={"model": {"path": "/data/mistral-small-4-119b-2603"}})
    with pytest.raises(helm.HelmRenderError, match="modelVolume.enabled is false"):
        render(workers={"modelVolume": {"enabled": False}})
    assert render()  # the default: /models/... on the /models volume


def test_a_draft_model_off_the_model_volume_is_refused(render):
    spec = {"num_steps": 3, "eagle_topk": 1, "num_draft_tokens": 4}
    with pytest.raises(helm.HelmRenderError, match="draft_model_path .* is not under"):
        render(stack={"engine": {"speculative": spec | {"draft_model_path": "/data/eagle"}}})
    assert render(stack={"engine": {"speculative": spec | {
        "draft_model_path": "/models/mistral-small-4-119b-2603-eagle"}}})
    assert render(stack={"engine": {"speculative": None}})  # the settings' own default


@pytest.mark.parametrize("stack, says", [
    ({"http": {"port": 8265}}, "stack.http.port: 8265 is the port of the Ray dashboard"),
    ({"ray": {"metrics_port": 6379}}, "stack.ray.metrics_port: 6379 is the port of the Ray GCS"),
])
def test_a_port_of_rays_own_never_renders(render, stack, says):
    """The stack refuses these only once its app builds in the cluster: by then the chart had
    opened http.port, 8265 the Ray dashboard (which takes jobs), to every client."""
    with pytest.raises(helm.HelmRenderError, match=says):
        render(stack=stack)
    from cluster.topology import RAY_PORTS

    for port in RAY_PORTS:  # the chart's list is the stack's
        with pytest.raises(helm.HelmRenderError, match=f"stack.http.port: {port} is"):
            render(stack={"http": {"port": port}})


def test_a_checkpoint_at_the_root_of_the_model_volume_renders(render):
    assert render(stack={"model": {"path": "/models"}})
