"""KubeRay/GKE hardening: token auth, gateway pinning, the NetworkPolicy, the engine-following readiness
probe and the GKE Gateway API component — all on the manifests kustomize renders (no cluster).

The probe is a Python script inside the RayService; it runs here against a local HTTP server that
answers like Ray's dashboard agent, Serve proxy and head dashboard (with token auth).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import yaml
from packaging.version import Version

from serve_app.app import build_app, pool_deployment_options
from tests.unit.kuberay_manifests import (
    OVERLAYS,
    app_config,
    cluster,
    crd_errors,
    group,
    one,
    pod_templates,
    ray_container,
    render,
    serve_config,
)

SERVE_PORT, METRICS_PORT, DASHBOARD_PORT = 8000, 8080, 8265


# ---------------------------------------------------------------------------------------- token auth
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_token_auth_is_on(overlay: str) -> None:
    rc = cluster(overlay)
    # KubeRay 1.7: mode token needs Ray >= 2.52; enableK8sTokenAuth is rejected on a RayService, and
    # spec.networkPolicy needs an alpha feature gate (we ship a plain NetworkPolicy instead).
    assert rc["authOptions"] == {"mode": "token"}
    assert Version(rc["rayVersion"]) >= Version("2.52.0")
    assert "networkPolicy" not in rc


# ----------------------------------------------------------------------------------- gateway pinning
def start_param_resources(value: str) -> list[dict[str, Any]]:
    """The group's custom resources as each reader parses rayStartParams.resources."""
    kuberay = json.loads(value.strip("'\"` "))  # KubeRay's getResourcesMap
    (flag,) = shlex.split(f"--resources={value}")  # the `ray start ...` line runs through a shell
    ray_start = json.loads(flag.removeprefix("--resources="))
    autoscaler = json.loads(value[1:-1].replace("\\", ""))  # ray autoscaler's _get_custom_resources
    assert all(isinstance(v, int) for v in autoscaler.values())  # the autoscaler insists on ints
    return [kuberay, ray_start, autoscaler]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_replicas_can_only_land_on_the_gateway_group(overlay: str) -> None:
    gateway = app_config(overlay).gateway
    assert gateway.resources, "the Gateway deployment must ask for the gateway group's resource"
    offered = start_param_resources(group(overlay, "gateway")["rayStartParams"]["resources"])
    assert offered[0] == offered[1] == offered[2]
    for name, amount in gateway.resources.items():
        assert offered[0].get(name, 0) >= amount * gateway.num_replicas, name
    # No other group offers it, so Serve cannot place a gateway replica there.
    others = [g["rayStartParams"] for g in cluster(overlay)["workerGroupSpecs"] if g["groupName"] != "gateway"]
    for params in [cluster(overlay)["headGroupSpec"]["rayStartParams"], *others]:
        if "resources" in params:
            assert not set(gateway.resources) & set(start_param_resources(params["resources"])[0])


def test_build_app_passes_gateway_resources_to_ray() -> None:
    (app,) = serve_config("gke-l4")["applications"]
    ingress = build_app(app["args"])._bound_deployment  # what `serve deploy` would create
    assert ingress.name == "Gateway"
    assert ingress.ray_actor_options["resources"] == {"gateway": 1.0}
    assert ingress.ray_actor_options["num_cpus"] == app["args"]["gateway"]["num_cpus"]


# ------------------------------------------------------------------------------------ NetworkPolicy
def policies(overlay: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d["spec"] for d in render(f"overlays/{overlay}") if d["kind"] == "NetworkPolicy"}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector
    return selector.get("matchLabels", {}).items() <= labels.items()


# Labels KubeRay adds to every Ray pod (and ray.io/node-type: head|worker).
def pod_labels(name: str, template: dict[str, Any]) -> dict[str, str]:
    kind = "head" if name == "head" else "worker"
    return {**template["metadata"]["labels"], "ray.io/is-ray-node": "yes", "ray.io/node-type": kind}


def peer(namespace: str, name: str) -> str:
    selector = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": name}},
    }
    return json.dumps(selector, sort_keys=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_only_the_serve_port_from_outside(overlay: str) -> None:
    specs = policies(overlay)
    templates = {name: pod_labels(name, t) for name, t in pod_templates(overlay).items()}
    # What each Ray pod accepts from a client outside the RayService: (port, source namespace/pod labels).
    outside: dict[str, set[tuple[int, str]]] = {name: set() for name in templates}
    for spec in specs.values():
        assert spec["policyTypes"] == ["Ingress"]
        for name, labels in templates.items():
            if not selects(spec["podSelector"], labels):
                continue
            for rule in spec["ingress"]:
                peers = rule.get("from")
                if peers and all("podSelector" in p and "namespaceSelector" not in p for p in peers):
                    # Same-namespace pods: must be exactly the Ray pods of this RayService.
                    assert all(selects(p["podSelector"], templates["head"]) for p in peers)
                    assert all(p["podSelector"]["matchLabels"]["ray.io/is-ray-node"] == "yes" for p in peers)
                    continue
                sources = [json.dumps(p, sort_keys=True) for p in peers] if peers else ["anywhere"]
                for port in rule["ports"]:
                    assert port["protocol"] == "TCP"
                    outside[name] |= {(port["port"], s) for s in sources}
    gmp = peer("gmp-system", "collector")
    operator = peer("kuberay-system", "kuberay-operator")
    workers = {(SERVE_PORT, "anywhere"), (METRICS_PORT, gmp)}
    assert outside == {"head": workers | {(DASHBOARD_PORT, operator)}, "llm": workers, "gateway": workers}
    # The ports are the ones the pods actually name.
    for name, template in pod_templates(overlay).items():
        ports = {p["name"]: p["containerPort"] for p in ray_container(template)["ports"]}
        assert ports["serve"] == SERVE_PORT and ports["metrics"] == METRICS_PORT, name
    assert serve_config(overlay)["http_options"]["port"] == SERVE_PORT


# ------------------------------------------------------------------- readiness follows the engine
class FakeRay:
    """Dashboard agent, Serve proxy and head dashboard in one server, configured per test case."""

    def __init__(self) -> None:
        self.raylet, self.proxy, self.token = 200, 200, "tok-123"
        self.replicas: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/api/local_raylet_healthz":
                    self.reply(fake.raylet, "success" if fake.raylet == 200 else "Local Raylet failed")
                elif self.path == "/-/healthz":
                    self.reply(fake.proxy, "success" if fake.proxy == 200 else "draining")
                elif self.path == "/api/serve/applications/":
                    if self.headers.get("Authorization") != f"Bearer {fake.token}":
                        self.reply(401, "Unauthorized")
                        return
                    deployments: dict[str, Any] = {}
                    for r in fake.replicas:
                        deployments.setdefault(r["deployment"], {"replicas": []})["replicas"].append(r)
                    self.reply(200, json.dumps({"applications": {"serve_app": {"deployments": deployments}}}))
                else:
                    self.reply(404, "")

            def reply(self, status: int, text: str) -> None:
                self.send_response(status)
                self.end_headers()
                self.wfile.write(text.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def fake_ray() -> Iterator[FakeRay]:
    fake = FakeRay()
    thread = threading.Thread(target=fake.server.serve_forever, daemon=True)
    thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def run_probe(probe: dict[str, Any], fake: FakeRay, token: str, pod_ip: str = "10.0.0.7") -> int:
    command = probe["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PROBE_", "FQ_RAY"))}
    env.update(PROBE_HEAD_URL=fake.url, PROBE_AGENT_URL=fake.url, PROBE_PROXY_URL=fake.url)
    env.update(RAY_AUTH_TOKEN=token, SERVE_APP_POD_IP=pod_ip)
    return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30).returncode


def replica(state: str, ip: str = "10.0.0.7", deployment: str = "LLMServer-llama-8b") -> dict[str, Any]:
    return {"deployment": deployment, "node_ip": ip, "state": state, "replica_id": f"{deployment}#{state}{ip}"}


@pytest.mark.parametrize(
    ("replicas", "raylet", "proxy", "token", "ready"),
    [
        ([replica("RUNNING")], 200, 200, "tok-123", True),
        ([replica("RUNNING"), replica("RUNNING", ip="10.0.0.8")], 200, 200, "tok-123", True),
        ([replica("STARTING")], 200, 200, "tok-123", False),  # engine still loading
        ([replica("RECOVERING")], 200, 200, "tok-123", False),  # failed health check, being replaced
        ([replica("RUNNING"), replica("STOPPING")], 200, 200, "tok-123", False),
        ([replica("RUNNING", ip="10.0.0.8")], 200, 200, "tok-123", False),  # no engine on this pod
        ([replica("RUNNING", deployment="Gateway")], 200, 200, "tok-123", False),  # a gateway is no engine
        ([], 200, 200, "tok-123", False),
        ([replica("RUNNING")], 503, 200, "tok-123", False),  # raylet down (KubeRay's default check)
        ([replica("RUNNING")], 200, 503, "tok-123", False),  # Serve proxy down (KubeRay's default check)
        ([replica("RUNNING")], 200, 200, "wrong-token", False),  # token auth: the probe must send it
    ],
)
def test_llm_readiness_probe_follows_the_engine(
    fake_ray: FakeRay, replicas: list[dict[str, Any]], raylet: int, proxy: int, token: str, ready: bool
) -> None:
    fake_ray.replicas, fake_ray.raylet, fake_ray.proxy = replicas, raylet, proxy
    probe = ray_container(group("gke-l4", "llm")["template"])["readinessProbe"]
    assert (run_probe(probe, fake_ray, token) == 0) is ready


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probe_wiring(overlay: str) -> None:
    templates = pod_templates(overlay)
    llm = ray_container(templates["llm"])
    probe = llm["readinessProbe"]
    assert probe["failureThreshold"] == 1 and probe["timeoutSeconds"] >= 5  # leave the Service at once
    env = {e["name"]: e for e in llm["env"]}
    assert env["SERVE_APP_POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    # Liveness stays KubeRay's raylet check everywhere; head and gateway keep KubeRay's readiness too.
    assert all("livenessProbe" not in ray_container(t) for t in templates.values())
    assert all("readinessProbe" not in ray_container(templates[n]) for n in ("head", "gateway"))
    # The probe names the deployment prefix and port build_app and the Serve config really use.
    script = probe["exec"]["command"][2]
    assert '"LLMServer-"' in script and f"localhost:{SERVE_PORT}" in script
    for name, pool in app_config(overlay).pools.items():
        assert pool_deployment_options(name, pool)["name"].startswith("LLMServer-")


# ----------------------------------------------------------------------------- GKE Gateway API
GATEWAY_API = "gke-gateway-api"


def gateway_api_docs() -> dict[str, dict[str, Any]]:
    docs = render(f"overlays/{GATEWAY_API}")
    return {kind: one(docs, kind) for kind in ("Gateway", "HTTPRoute", "GCPBackendPolicy", "HealthCheckPolicy")}


@pytest.mark.parametrize("kind", ["Gateway", "HTTPRoute", "GCPBackendPolicy", "HealthCheckPolicy"])
def test_gateway_api_objects_match_their_crds_strictly(kind: str) -> None:
    doc = gateway_api_docs()[kind]
    assert doc["metadata"]["namespace"] == one(render(f"overlays/{GATEWAY_API}"), "RayService")["metadata"]["namespace"]
    assert crd_errors(doc) == []
    bad = json.loads(json.dumps(doc))
    bad["spec"]["typo"] = 1
    assert crd_errors(bad), "the strict schema must reject unknown fields"


def test_gateway_api_points_at_the_kuberay_serve_service() -> None:
    docs = gateway_api_docs()
    rayservice = one(render(f"overlays/{GATEWAY_API}"), "RayService")
    service = {"group": "", "kind": "Service", "name": f"{rayservice['metadata']['name']}-serve-svc"}  # KubeRay's
    gateway, route = docs["Gateway"], docs["HTTPRoute"]
    (listener,) = gateway["spec"]["listeners"]
    assert listener["protocol"] == "HTTPS" and listener["tls"]["certificateRefs"]
    assert gateway["spec"]["gatewayClassName"].startswith("gke-l7-")
    (parent,) = route["spec"]["parentRefs"]
    assert parent["name"] == gateway["metadata"]["name"] and parent["sectionName"] == listener["name"]
    (rule,) = route["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    assert {k: backend[k] for k in ("kind", "name")} == {"kind": "Service", "name": service["name"]}
    assert backend["port"] == serve_config(GATEWAY_API)["http_options"]["port"]
    for kind in ("GCPBackendPolicy", "HealthCheckPolicy"):
        assert docs[kind]["spec"]["targetRef"] == service, kind


def test_backend_timeout_outlasts_a_long_stream_and_health_check_uses_readiness() -> None:
    docs = gateway_api_docs()
    default = docs["GCPBackendPolicy"]["spec"]["default"]
    config = app_config(GATEWAY_API)
    assert config.gemini is not None
    # The timeout bounds a whole streamed response: minutes, and longer than any upstream timeout.
    assert default["timeoutSec"] >= 1800 > config.gemini.timeout_s
    assert (
        default["connectionDraining"]["drainingTimeoutSec"]
        <= group(GATEWAY_API, "llm")["template"]["spec"]["terminationGracePeriodSeconds"]
    )
    check = docs["HealthCheckPolicy"]["spec"]["default"]
    assert check["config"]["type"] == "HTTP"
    assert check["config"]["httpHealthCheck"] == {"port": SERVE_PORT, "requestPath": "/health/ready"}
    assert check["timeoutSec"] <= check["checkIntervalSec"]


def test_component_is_only_in_its_overlay() -> None:
    for overlay in OVERLAYS:
        kinds = {d["kind"] for d in render(f"overlays/{overlay}")}
        assert ("HTTPRoute" in kinds) is (overlay == GATEWAY_API), overlay
    text = yaml.safe_dump(list(render(f"overlays/{GATEWAY_API}")))
    assert "/health/ready" in text
