"""helm/tandem, rendered offline by the real Helm v4 engine (helm-python-sdk) and checked.

Core objects (Service, ConfigMap, Secret, PodDisruptionBudget, and each RayCluster pod template
as a PodTemplate) are validated against Kubernetes' own OpenAPI schemas by kubernetes-validate,
strict. KubeRay's RayCluster and the Prometheus Operator's ServiceMonitor are CRDs it has no schema
for: their structure is checked here against the fields of KubeRay's ray.io/v1 API
(ray-operator/apis/ray/v1/raycluster_types.go) and monitoring.coreos.com/v1. tandem.yaml from the
ConfigMap is loaded by PipelineConfig itself.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tandem.services.config import PipelineConfig

CHART = Path(__file__).resolve().parents[3] / "helm" / "tandem"
KUBE_VERSION = "1.30.0"  # a version kubernetes-validate ships schemas for; gRPC probes are GA since 1.27
RELEASE, NAMESPACE = "demo", "llm"
CLUSTER = "demo-tandem"  # the RayCluster's name: RELEASE-CHART

# The fields of KubeRay's ray.io/v1 types (json tags in raycluster_types.go, KubeRay 1.6).
RAYCLUSTER_SPEC = {"upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
                   "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                   "historyServerOptions", "networkPolicy", "tlsOptions", "headGroupSpec", "rayVersion",
                   "workerGroupSpecs"}
HEAD_GROUP_SPEC = {"template", "headService", "enableIngress", "ingressOptions", "resources", "labels",
                   "rayStartParams", "serviceType"}
WORKER_GROUP_SPEC = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                     "priority", "resources", "labels", "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
AUTOSCALER_OPTIONS = {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
                      "upscalingMode", "version", "env", "envFrom", "volumeMounts", "command", "args"}
CRD_KINDS = {"RayCluster", "ServiceMonitor"}
OWNED_KEYS = {"model", "host", "service_host", "grpc_port", "http_port", "gateway_resources", "dashboard", "drain_grace_s",
              "ray_address", "internal_token"}  # the token comes from the internalToken Secret, never the ConfigMap

GPU_VALUES = yaml.safe_load((CHART / "values-gpu.yaml").read_text())
PARALLEL_VALUES = yaml.safe_load((CHART / "values-parallel.yaml").read_text())
EVERYTHING = {"serviceMonitor": {"enabled": True}, "podDisruptionBudget": {"enabled": True},
              "apiKeys": {"enabled": True, "keys": ["sk-one", "sk-two"]}, "autoscaling": {"enabled": True},
              "workers": {"gpu": {"enabled": True}},
              "model": {"name": "/models/m.gguf",
                        "volume": {"enabled": True, "source": {"persistentVolumeClaim": {"claimName": "models"}}}}}
VALUE_SETS = {"default": None, "gpu": GPU_VALUES, "parallel": PARALLEL_VALUES, "everything": EVERYTHING}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values=None) -> dict[str, list[dict]]:
    """Template path -> the objects it renders (NOTES.txt under "NOTES" as text)."""
    out: dict[str, list] = {}
    for path, text in chart.render(values, name=RELEASE, namespace=NAMESPACE).items():
        name = path.split("/templates/", 1)[1]
        out[name] = [text] if name == "NOTES.txt" else [doc for doc in yaml.safe_load_all(text) if doc]
    return out


def objects(rendered: dict) -> list[dict]:
    return [doc for name, docs in rendered.items() if name != "NOTES.txt" for doc in docs]


def one(rendered: dict, kind: str, name_suffix: str = "") -> dict:
    found = [d for d in objects(rendered) if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def containers(pod_template: dict) -> dict[str, dict]:
    return {c["name"]: c for c in pod_template["spec"]["containers"]}


def load_config(rendered: dict, tmp_path: Path) -> PipelineConfig:
    path = tmp_path / "tandem.yaml"
    path.write_text(one(rendered, "ConfigMap", "-config")["data"]["tandem.yaml"])
    return PipelineConfig.load(path)


# -- Helm's own checks -------------------------------------------------------------------------
@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_lint_finds_no_warnings_or_errors(values):
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert not problems and not report["errors"], problems


def test_lint_reports_bad_values():
    report = helm.lint(CHART, {"config": {"mode": "sideways"}})
    assert any("/config/mode" in e for e in report["errors"])


# -- what renders ------------------------------------------------------------------------------
def test_default_renders_the_cluster_its_config_and_the_gateway_service(chart):
    rendered = render(chart)
    assert sorted(d["kind"] for d in objects(rendered)) == ["ConfigMap", "NetworkPolicy", "NetworkPolicy", "RayCluster",
                                                           "Secret", "Service"]  # the Secret: the pipeline token
    for name, docs in rendered.items():  # templates are named KIND-COMPONENT.yaml
        if name.endswith(".yaml") and docs:
            assert name.split("-")[0] == docs[0]["kind"].lower() or name.startswith("pdb-"), name


def test_optional_objects_render_only_when_enabled(chart):
    kinds = sorted(d["kind"] for d in objects(render(chart, EVERYTHING)))
    assert kinds == ["ConfigMap", "NetworkPolicy", "NetworkPolicy", "PodDisruptionBudget", "PodDisruptionBudget",
                     "RayCluster", "Secret", "Secret", "Service", "ServiceMonitor"]
    fewest = {"networkPolicy": {"enabled": False}, "internalToken": {"existingSecret": "mine"}}
    assert sorted(d["kind"] for d in objects(render(chart, fewest))) == ["ConfigMap", "RayCluster", "Service"]


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_core_objects_and_pod_templates_validate_against_kubernetes_schemas(chart, values):
    rendered = render(chart, values)
    for obj in objects(rendered):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "tandem" and labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm" and labels["helm.sh/chart"] == "tandem-0.1.0"
        assert "app.kubernetes.io/version" in labels
        if obj["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    cluster = one(rendered, "RayCluster")["spec"]
    for template in [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster.get("workerGroupSpecs", []))]:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": template}, KUBE_VERSION, strict=True)


def test_strict_validation_can_fail():
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
               "spec": {"ports": [{"port": 80, "targetPorts": "http"}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBE_VERSION, strict=True)


# -- the RayCluster against KubeRay's ray.io/v1 API --------------------------------------------
def check_raycluster(cluster: dict) -> None:
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["metadata"]["name"] == CLUSTER
    spec = cluster["spec"]
    assert set(spec) <= RAYCLUSTER_SPEC and "headGroupSpec" in spec
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_SPEC and {"template", "rayStartParams"} <= set(head)
    groups = spec.get("workerGroupSpecs", [])
    for group in [head, *groups]:
        params = group["rayStartParams"]  # map[string]string: the API server rejects anything else
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()), params
        assert group["template"]["spec"]["containers"], "KubeRay runs Ray in the first container"
    assert head["template"]["spec"]["containers"][0]["name"] == "ray-head"
    for group in groups:
        assert set(group) <= WORKER_GROUP_SPEC
        assert {"groupName", "minReplicas", "maxReplicas", "template"} <= set(group)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["template"]["spec"]["containers"][0]["name"] == "ray-worker"
    assert len({g["groupName"] for g in groups}) == len(groups)


def gpu_limit(group: dict) -> int:
    return int(group["template"]["spec"]["containers"][0]["resources"].get("limits", {}).get("nvidia.com/gpu", 0))


def test_default_cluster_is_a_head_and_a_cpu_worker_group(chart):
    cluster = one(render(chart), "RayCluster")
    check_raycluster(cluster)
    groups = cluster["spec"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["cpu"] and gpu_limit(groups[0]) == 0
    assert "nvidia.com/gpu" not in json.dumps(cluster)
    assert cluster["spec"]["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in cluster["spec"]


def test_gpu_values_add_a_gpu_group_with_gpus_tolerations_and_the_cuda_image(chart):
    cluster = one(render(chart, GPU_VALUES), "RayCluster")
    check_raycluster(cluster)
    (group,) = cluster["spec"]["workerGroupSpecs"]  # values-gpu.yaml leaves the CPU group out
    assert group["groupName"] == "gpu" and gpu_limit(group) == 1 and group["minReplicas"] >= 1
    pod = group["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["containers"][0]["image"].endswith(":0.1.0-cuda")
    assert cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == "tandem:0.1.0"


def test_both_groups_and_autoscaling(chart):
    cluster = one(render(chart, EVERYTHING), "RayCluster")
    check_raycluster(cluster)
    assert [(g["groupName"], gpu_limit(g)) for g in cluster["spec"]["workerGroupSpecs"]] == [("cpu", 0), ("gpu", 1)]
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert cluster["spec"]["autoscalerOptions"] == {"upscalingMode": "Default", "idleTimeoutSeconds": 60}


def test_head_offers_the_resource_the_gateway_asks_for(chart, tmp_path):
    rendered = render(chart)
    params = one(rendered, "RayCluster")["spec"]["headGroupSpec"]["rayStartParams"]
    # KubeRay writes `--resources=VALUE` into the bash command that starts Ray: the shell strips
    # the outer quotes and escapes, and ray start gets JSON.
    (arg,) = shlex.split(f"--resources={params['resources']}")
    offered = json.loads(arg.removeprefix("--resources="))
    assert offered == load_config(rendered, tmp_path).gateway_resources == {"tandem_gateway": 1}
    assert params["num-cpus"] == "0"  # no worker actor (one CPU each) lands on the head


# -- the head pod: Ray's head and the tandem driver --------------------------------------------
@pytest.mark.parametrize("gateway, grace", [({}, 30), ({"drainGraceSeconds": 90, "preStopSleepSeconds": 0}, 90)])
def test_the_pods_grace_covers_the_prestop_sleep_and_tandems_drain(chart, tmp_path, gateway, grace):
    """SIGTERM after the preStop sleep; tandem then drains for drain_grace_s; the pod's
    terminationGracePeriodSeconds leaves room for all of it, so Kubernetes never SIGKILLs a drain."""
    rendered = render(chart, {"gateway": gateway} if gateway else None)
    pod = one(rendered, "RayCluster")["spec"]["headGroupSpec"]["template"]
    sleep = int(containers(pod)["tandem"]["lifecycle"]["preStop"]["exec"]["command"][1])
    assert sleep == gateway.get("preStopSleepSeconds", 5)
    assert load_config(rendered, tmp_path).drain_grace_s == grace
    assert pod["spec"]["terminationGracePeriodSeconds"] >= sleep + grace + 15  # ray_launcher.STOP_MARGIN_S


def test_driver_waits_for_the_local_gcs_then_serves_the_mounted_config(chart):
    rendered = render(chart)
    pod = one(rendered, "RayCluster")["spec"]["headGroupSpec"]["template"]
    driver = containers(pod)["tandem"]
    script = driver["args"][0]
    assert "ray health-check --address" in script
    assert script.index("ray health-check") < script.index("exec tandem serve --config /etc/tandem/tandem.yaml")
    env = {e["name"]: e for e in driver["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["RAY_ADDRESS"]["value"] == "$(POD_IP):6379" and '--ray-address "$RAY_ADDRESS"' in script
    mount = next(m for m in driver["volumeMounts"] if m["mountPath"] == "/etc/tandem")
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == one(rendered, "ConfigMap")["metadata"]["name"]
    # A driver finds its raylet among the node's processes and reaches it through /tmp/ray.
    assert pod["spec"]["shareProcessNamespace"] is True
    for container in containers(pod).values():
        assert {"name": "ray-tmp", "mountPath": "/tmp/ray"} in container["volumeMounts"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # the gateway's /health
        assert driver[probe]["httpGet"] == {"path": "/health", "port": "http", "scheme": "HTTP"}
    assert driver["startupProbe"]["periodSeconds"] * driver["startupProbe"]["failureThreshold"] == 900


def test_a_tls_gateway_is_probed_and_scraped_over_https(chart):
    rendered = render(chart, {"config": {"extraConfig": {"tls_cert": "/tls/tls.crt", "tls_key": "/tls/tls.key"}},
                              "serviceMonitor": {"enabled": True, "tlsConfig": {"insecureSkipVerify": True}},
                              "head": {"volumes": [{"name": "tls", "secret": {"secretName": "gateway-tls"}}],
                                       "volumeMounts": [{"name": "tls", "mountPath": "/tls", "readOnly": True}]}})
    pod = one(rendered, "RayCluster")["spec"]["headGroupSpec"]["template"]
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                  "template": pod}, KUBE_VERSION, strict=True)
    assert {"name": "tls", "secret": {"secretName": "gateway-tls"}} in pod["spec"]["volumes"]
    for container in containers(pod).values():  # the gateway reads the files in ray-head
        assert {"name": "tls", "mountPath": "/tls", "readOnly": True} in container["volumeMounts"]
    driver = containers(pod)["tandem"]
    assert {driver[p]["httpGet"]["scheme"] for p in ("startupProbe", "readinessProbe", "livenessProbe")} == {"HTTPS"}
    (endpoint,) = one(rendered, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https" and endpoint["tlsConfig"] == {"insecureSkipVerify": True}


def test_extra_args_reach_tandem_serve(chart):
    pod = one(render(chart, {"gateway": {"extraArgs": ["--replicas", "decode=2"]}}), "RayCluster")
    args = containers(pod["spec"]["headGroupSpec"]["template"])["tandem"]["args"]
    assert args[1:] == ["tandem", "--replicas", "decode=2"] and '"$@"' in args[0]


# -- tandem.yaml -------------------------------------------------------------------------------
def test_config_loads_with_the_cluster_settings(chart, tmp_path):
    config = load_config(render(chart), tmp_path)
    assert (config.host, config.service_host) == ("0.0.0.0", "0.0.0.0")
    assert (config.grpc_port, config.http_port) == (50051, 8000)
    assert config.mode == "disaggregated" and config.replicas == {"prefill": 1, "decode": 1}
    assert config.model == "smollm2-135m" and config.num_threads == 2 and config.quantization is None
    assert config.ray_address is None  # the driver's flag: the head pod's own IP


def test_parallel_values_split_each_worker_over_pods(chart, tmp_path):
    """values-parallel.yaml: two workers of tensor 4 x pipeline 2 ranks, on four 8-CPU worker pods
    (16 ranks of one CPU bundle each), aggregated; its config loads."""
    rendered = render(chart, PARALLEL_VALUES)
    config = load_config(rendered, tmp_path)
    assert (config.tensor_parallel_size, config.pipeline_parallel_size, config.mode) == (4, 2, "aggregated")
    assert config.parallel.world_size == 8 and config.worker_threads() == 2
    (group,) = one(rendered, "RayCluster")["spec"]["workerGroupSpecs"]
    cpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert group["replicas"] * cpus >= config.replicas["decode"] * config.parallel.world_size * config.num_threads
    assert cpus >= config.tensor_parallel_size * config.num_threads  # a stage's ranks fit one pod
    with pytest.raises(helm.HelmRenderError, match="runs aggregated"):
        chart.render({"config": {"mode": "disaggregated", "tensor_parallel_size": 2}}, name=RELEASE,
                      namespace=NAMESPACE)


def test_config_follows_values_and_extra_config(chart, tmp_path):
    values = {"config": {"mode": "aggregated", "replicas": {"decode": 3}, "quantization": "int8",
                         "speculative": {"method": "ngram", "k": 5},
                         "extraConfig": {"rag_hybrid": False, "engine": {"block_size": 32}, "num_threads": None}},
              "gateway": {"grpcPort": 6000, "httpPort": 6001}, "rayCluster": {"dashboard": True}}
    config = load_config(render(chart, values), tmp_path)
    assert config.mode == "aggregated" and config.replicas == {"prefill": 1, "decode": 3}
    assert config.quantization == "int8" and config.speculative == {"method": "ngram", "k": 5}
    assert config.rag_hybrid is False and config.engine == {"block_size": 32}  # false overrides true
    assert config.num_threads is None  # null in extraConfig: tandem's default
    assert (config.grpc_port, config.http_port, config.dashboard) == (6000, 6001, True)


def test_model_volume_is_mounted_in_every_ray_container(chart, tmp_path):
    rendered = render(chart, EVERYTHING)
    assert load_config(rendered, tmp_path).model == "/models/m.gguf"
    cluster = one(rendered, "RayCluster")["spec"]
    for template in [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]:
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "models"}
        for container in template["spec"]["containers"]:
            assert {"name": "models", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]


# -- the gateway Service, the ServiceMonitor, the PodDisruptionBudgets -------------------------
def kuberay_pod_labels(cluster: dict, template: dict, node_type: str) -> dict:
    """The labels KubeRay gives a pod: the template's, then ray.io/cluster and ray.io/node-type."""
    return {**template["metadata"].get("labels", {}), "ray.io/cluster": cluster["metadata"]["name"],
            "ray.io/node-type": node_type}


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_service_selects_the_head_pod_and_targets_the_gateway_ports(chart, values, tmp_path):
    rendered = render(chart, values)
    cluster, service = one(rendered, "RayCluster"), one(rendered, "Service", "-gateway")
    head = cluster["spec"]["headGroupSpec"]["template"]
    selector = service["spec"]["selector"]
    assert matches(selector, kuberay_pod_labels(cluster, head, "head"))
    for group in cluster["spec"].get("workerGroupSpecs", []):
        assert not matches(selector, kuberay_pod_labels(cluster, group["template"], "worker"))
    ports = {p["name"]: p["containerPort"] for c in head["spec"]["containers"] for p in c.get("ports", [])}
    targets = {p["name"]: ports[p["targetPort"]] for p in service["spec"]["ports"]}
    config = load_config(rendered, tmp_path)
    assert targets == {"grpc": config.grpc_port, "http": config.http_port}


def test_service_type_and_ports_are_configurable(chart):
    service = one(render(chart, {"gateway": {"service": {"type": "NodePort", "httpPort": 80,
                                                         "nodePorts": {"grpc": 30051}}}}), "Service")
    assert service["spec"]["type"] == "NodePort"
    assert {p["name"]: (p["port"], p.get("nodePort")) for p in service["spec"]["ports"]} == \
        {"grpc": (50051, 30051), "http": (80, None)}


def test_service_monitor_scrapes_metrics_on_the_gateway_services_http_port(chart):
    rendered = render(chart, {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}})
    monitor, service = one(rendered, "ServiceMonitor"), one(rendered, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["labels"]["release"] == "prom"
    assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["port"] == "http" and endpoint["scheme"] == "http"


def test_disruption_budgets_select_the_head_and_the_workers(chart):
    rendered = render(chart, {"podDisruptionBudget": {"enabled": True}})
    cluster = one(rendered, "RayCluster")
    head = kuberay_pod_labels(cluster, cluster["spec"]["headGroupSpec"]["template"], "head")
    worker = kuberay_pod_labels(cluster, cluster["spec"]["workerGroupSpecs"][0]["template"], "worker")
    head_pdb, workers_pdb = one(rendered, "PodDisruptionBudget", "-head"), one(rendered, "PodDisruptionBudget", "-workers")
    assert head_pdb["spec"]["minAvailable"] == 1 and workers_pdb["spec"]["maxUnavailable"] == 1
    assert matches(head_pdb["spec"]["selector"]["matchLabels"], head)
    assert not matches(head_pdb["spec"]["selector"]["matchLabels"], worker)
    assert matches(workers_pdb["spec"]["selector"]["matchLabels"], worker)
    assert not matches(workers_pdb["spec"]["selector"]["matchLabels"], head)


# -- API keys ----------------------------------------------------------------------------------
def api_key_refs(rendered: dict) -> dict[str, dict]:
    pod = one(rendered, "RayCluster")["spec"]["headGroupSpec"]["template"]
    return {name: next(e for e in c.get("env", []) if e["name"] == "TANDEM_API_KEYS")["valueFrom"]["secretKeyRef"]
            for name, c in containers(pod).items() if any(e["name"] == "TANDEM_API_KEYS" for e in c.get("env", []))}


def test_api_keys_from_an_existing_secret_reach_both_head_containers(chart):
    rendered = render(chart, {"apiKeys": {"enabled": True, "existingSecret": "my-keys", "secretKey": "keys"}})
    assert not [d for d in objects(rendered) if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-apikeys")]
    # ray-head: the gateway actor runs in a process Ray starts there; tandem: the driver reports it.
    assert api_key_refs(rendered) == {"ray-head": {"name": "my-keys", "key": "keys"},
                                      "tandem": {"name": "my-keys", "key": "keys"}}


def test_api_keys_in_a_chart_created_secret(chart):
    rendered = render(chart, EVERYTHING)
    secret = one(rendered, "Secret", "-apikeys")
    assert secret["stringData"] == {"api-keys": "sk-one,sk-two"}
    refs = api_key_refs(rendered)
    assert set(refs) == {"ray-head", "tandem"}
    assert all(ref == {"name": secret["metadata"]["name"], "key": "api-keys"} for ref in refs.values())


def test_no_api_keys_by_default(chart):
    assert api_key_refs(render(chart)) == {}


# -- pipeline credentials and the NetworkPolicy -----------------------------------------------
def token_refs(rendered: dict) -> dict[str, dict]:
    """Container -> the Secret reference of its TANDEM_INTERNAL_TOKEN, over every Ray pod."""
    cluster = one(rendered, "RayCluster")["spec"]
    pods = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster.get("workerGroupSpecs", []))]
    return {f"{pod_i}/{name}": next(e["valueFrom"]["secretKeyRef"] for e in c.get("env", [])
                                    if e["name"] == "TANDEM_INTERNAL_TOKEN")
            for pod_i, pod in enumerate(pods) for name, c in containers(pod).items()
            if any(e["name"] == "TANDEM_INTERNAL_TOKEN" for e in c.get("env", []))}


def test_every_ray_container_gets_the_pipeline_token_from_a_generated_secret(chart):
    rendered = render(chart, EVERYTHING)
    secret = one(rendered, "Secret", "-internal-token")
    (token,) = secret["stringData"].values()
    assert len(token) == 32 and token.isalnum()
    assert token != one(render(chart), "Secret", "-internal-token")["stringData"]["token"]  # random per install
    refs = token_refs(rendered)
    # head: ray-head (the actors Ray starts there) and tandem (the driver); a worker of each group
    assert set(refs) == {"0/ray-head", "0/tandem", "1/ray-worker", "2/ray-worker"}
    assert all(ref == {"name": secret["metadata"]["name"], "key": "token"} for ref in refs.values())
    assert token not in json.dumps(one(rendered, "ConfigMap"))  # never in tandem.yaml


def test_the_pipeline_token_from_values_or_an_existing_secret(chart):
    given = render(chart, {"internalToken": {"value": "t" * 20}})
    assert one(given, "Secret", "-internal-token")["stringData"] == {"token": "t" * 20}
    existing = render(chart, {"internalToken": {"existingSecret": "mine", "secretKey": "tok"}})
    assert not [d for d in objects(existing) if d["kind"] == "Secret"]
    refs = token_refs(existing)
    assert len(refs) == 3 and all(ref == {"name": "mine", "key": "tok"} for ref in refs.values())


def test_network_policy_keeps_internal_ports_to_the_release_and_opens_the_gateway(chart):
    rendered = render(chart)
    internal, gateway = one(rendered, "NetworkPolicy", "-internal"), one(rendered, "NetworkPolicy", "-gateway")
    release_pods = {"matchLabels": {"ray.io/cluster": CLUSTER}}  # KubeRay's label on every pod of the cluster
    assert internal["spec"]["podSelector"] == release_pods and internal["spec"]["policyTypes"] == ["Ingress"]
    assert internal["spec"]["ingress"] == [{"from": [{"podSelector": release_pods}]}]  # no ports open to others
    head = one(rendered, "Service", "-gateway")["spec"]["selector"]
    assert gateway["spec"]["podSelector"] == {"matchLabels": head}
    (rule,) = gateway["spec"]["ingress"]
    assert "from" not in rule  # anyone, on these ports only
    assert rule["ports"] == [{"port": 50051, "protocol": "TCP"}, {"port": 8000, "protocol": "TCP"}]
    narrowed = render(chart, {"networkPolicy": {"enabled": True, "gatewayFrom": [{"namespaceSelector": {}}],
                                                "extraIngress": [{"ports": [{"port": 8080}]}]},
                              "gateway": {"grpcPort": 9000}})
    (rule,) = one(narrowed, "NetworkPolicy", "-gateway")["spec"]["ingress"]
    assert rule["from"] == [{"namespaceSelector": {}}] and rule["ports"][0]["port"] == 9000
    assert one(narrowed, "NetworkPolicy", "-internal")["spec"]["ingress"][1] == {"ports": [{"port": 8080}]}


# -- values.schema.json ------------------------------------------------------------------------
BAD_VALUES = {
    "negative replica count": {"config": {"replicas": {"decode": -1}}},
    "zero replicas": {"config": {"replicas": {"prefill": 0}}},
    "unknown role": {"config": {"replicas": {"verify": 1}}},
    "unknown mode": {"config": {"mode": "sideways"}},
    "negative worker pods": {"workers": {"cpu": {"replicas": -1}}},
    "replicas above maxReplicas": {"workers": {"cpu": {"replicas": 9, "maxReplicas": 4}}},
    "unknown dtype": {"config": {"dtype": "float8"}},
    "speculative k out of range": {"config": {"speculative": {"method": "ngram", "k": 99}}},
    "a port out of range": {"gateway": {"grpcPort": 70000}},
    "unknown service type": {"gateway": {"service": {"type": "Ingress"}}},
    "a ray start parameter not a string": {"head": {"rayStartParams": {"num-cpus": 0}}},
    "extraConfig sets a key the chart owns": {"config": {"extraConfig": {"host": "127.0.0.1"}}},
    "extraConfig key tandem does not know": {"config": {"extraConfig": {"kv_cache_bytes": 1}}},
    "a typo at the top level": {"workrs": {}},
    "a typo in a component": {"serviceMonitor": {"enable": True}},
    "an API key with a comma": {"apiKeys": {"enabled": True, "keys": ["a,b"]}},
    "API keys on, none given": {"apiKeys": {"enabled": True}},
    "a model volume without a source": {"model": {"volume": {"enabled": True}}},
    "unknown upgrade strategy": {"rayCluster": {"upgradeStrategy": "Rolling"}},
    "a short pipeline token": {"internalToken": {"value": "secret"}},
    "a pipeline token with a space": {"internalToken": {"value": "a token with spaces in it"}},
    "the pipeline token in the ConfigMap": {"config": {"extraConfig": {"internal_token": "x" * 32}}},
    "network policy without enabled": {"networkPolicy": {"enabled": None}},
}


@pytest.mark.parametrize("values", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_fail_rendering(chart, values):
    with pytest.raises((helm.HelmValuesError, helm.HelmRenderError)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_schema_knows_exactly_the_config_keys_tandem_has():
    schema = json.loads((CHART / "values.schema.json").read_text())
    config = schema["properties"]["config"]["properties"]
    fields = {f.name for f in dataclasses.fields(PipelineConfig)}
    assert set(config) - {"extraConfig"} <= fields - OWNED_KEYS
    assert set(config["extraConfig"]["propertyNames"]["enum"]) == fields - OWNED_KEYS


def undocumented_keys(text: str) -> list[str]:
    """helm-docs style: the keys of a values file that neither have a `# --` comment block right
    above them nor sit under a key that has one."""
    lines = text.splitlines()
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    missing = []
    for i, line in enumerate(lines):
        key = line.strip()
        if not key or key.startswith(("#", "- ")) or ":" not in key:
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        above = i
        while above and lines[above - 1].strip().startswith("#"):
            above -= 1
        own = any(lines[j].strip().startswith("# --") for j in range(above, i))
        documented = own or any(d for _, d in stack)
        if not documented and not key.endswith(":"):
            missing.append(key)
        stack.append((indent, documented))
    return missing


def test_values_yaml_documents_every_key():
    assert undocumented_keys((CHART / "values.yaml").read_text()) == []
    assert undocumented_keys("a:\n  # -- doc\n  b: 1\n  c: 2\n") == ["c: 2"]


# -- NOTES.txt ---------------------------------------------------------------------------------
def test_notes_say_how_to_reach_the_gateway(chart):
    notes = render(chart)["NOTES.txt"][0]
    assert f"kubectl port-forward -n {NAMESPACE} svc/{CLUSTER}-gateway 50051:50051 8000:8000" in notes
    assert "curl http://localhost:8000/v1/models" in notes
    assert "tandem generate --server localhost:50051" in notes
    keyed = render(chart, {"apiKeys": {"enabled": True, "existingSecret": "k"}})["NOTES.txt"][0]
    assert 'Authorization: Bearer $TANDEM_API_KEY' in keyed and "accepts every caller" not in keyed


def test_ray_workers_run_at_nice_zero_in_every_pod(chart):
    """Ray's default worker niceness (15) makes the engine yield to every other process at each
    token; every Ray container of the chart sets it to 0, as `tandem serve` does locally."""
    cluster = one(render(chart, EVERYTHING), "RayCluster")["spec"]
    pods = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster.get("workerGroupSpecs", []))]
    ray_containers = [containers(pod)[name] for pod in pods for name in containers(pod) if name.startswith("ray-")]
    assert len(ray_containers) >= 2
    for container in ray_containers:
        assert {"name": "RAY_worker_niceness", "value": "0"} in container["env"]
