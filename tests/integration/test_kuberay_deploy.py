"""Deploy the local-test overlay the way KubeRay does, against a real local Ray cluster.

KubeRay renders serveConfigV2 and PUTs it as JSON to the head's dashboard
(`/api/serve/applications/`, port 8265). This test does the same with the serveConfigV2 that
`kubectl kustomize kuberay/overlays/local-test` renders, on a `ray start --head` cluster of its own
(token auth on, like a KubeRay cluster with authOptions.mode=token), then talks to the app through
the Serve proxy with the openai SDK — and PUTs a changed route table to check the in-place gateway
reconfiguration that docs/gke.md promises (the engine replica must survive it).

The cluster is a separate process tree in its own session and temp dir: it is stopped by signalling
that session, never with `ray stop` (which stops every Ray process on the machine).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support import free_port, wait_for
from tests.unit.kuberay_manifests import group, pod_templates, ray_container, serve_config

pytestmark = pytest.mark.ray

CLIENT_KEY = "sk-kuberay-test-0123456789"
GATEWAY_GROUP_RESOURCES = {"gateway": 100}
APP = "serve_app"


def manifest_ray_env(overlay: str) -> dict[str, str]:
    """The literal RAY_* env values of the overlay's Ray containers (they must agree across pods)."""
    found: dict[str, str] = {}
    for name, template in pod_templates(overlay).items():
        for e in ray_container(template).get("env", []):
            if e["name"].startswith("RAY_") and "value" in e:
                assert found.setdefault(e["name"], e["value"]) == e["value"], (name, e)
    return found


class LocalRayHead:
    """`ray start --head --block` in its own session, on free ports, with token auth."""

    def __init__(self) -> None:
        # Short path: Ray puts unix sockets under the temp dir (108-byte limit).
        self.temp_dir = tempfile.mkdtemp(prefix="rk", dir="/tmp")
        self.dashboard_port = free_port()
        self.token = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(manifest_ray_env("local-test"))  # proxy guard + Ray fast path, from the pods' env
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            # What the Kubernetes Secrets provide on the pods; replicas inherit the raylet's env.
            SERVE_APP_API_KEYS=CLIENT_KEY,
            GEMINI_API_KEY="unused-in-this-test",
            GEMINI_BASE_URL=f"http://127.0.0.1:{free_port()}",  # nothing listens: no request leaves
        )
        ray_bin = Path(sys.executable).parent / "ray"
        cmd = [str(ray_bin), "start", "--head", "--block", "--disable-usage-stats", "--num-cpus", "4"]
        cmd += ["--node-ip-address", "127.0.0.1", "--temp-dir", self.temp_dir]
        cmd += ["--port", str(free_port()), "--dashboard-host", "127.0.0.1"]
        cmd += ["--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(free_port())]
        self.agent_port = free_port()
        cmd += ["--dashboard-agent-listen-port", str(self.agent_port), "--metrics-export-port", str(free_port())]
        # Like the gateway worker group (rayStartParams.resources): the Gateway deployment asks for it.
        cmd += ["--resources", json.dumps(GATEWAY_GROUP_RESOURCES)]
        self.log = open(Path(self.temp_dir) / "ray-start.log", "wb")  # closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        self.headers = {"Authorization": f"Bearer {self.token}"}

    def serve_status(self) -> dict[str, Any] | None:
        try:
            r = httpx.get(f"{self.url}/api/serve/applications/", headers=self.headers, timeout=5)
        except httpx.TransportError:
            return None
        return r.json() if r.status_code == 200 else None

    def put_config(self, config: dict[str, Any]) -> None:
        r = httpx.put(f"{self.url}/api/serve/applications/", json=config, headers=self.headers, timeout=60)
        assert r.status_code == 200, r.text

    def app_status(self) -> str | None:
        status = self.serve_status()
        app = (status or {}).get("applications", {}).get(APP)
        return app["status"] if app else None

    def replica_ids(self, deployment: str) -> set[str]:
        status = self.serve_status() or {}
        replicas = status["applications"][APP]["deployments"][deployment]["replicas"]
        return {r["replica_id"] for r in replicas}

    def stop(self) -> None:
        # `ray start --block` stops the processes it started on SIGTERM; the session kill catches the rest.
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self.log.close()

    def tail(self) -> str:
        return (Path(self.temp_dir) / "ray-start.log").read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def ray_head() -> Iterator[LocalRayHead]:
    head = LocalRayHead()
    try:
        wait_for(lambda: head.proc.poll() is not None or head.serve_status() is not None, 120, 0.5, "dashboard")
        assert head.proc.poll() is None, head.tail()
        yield head
    finally:
        head.stop()
        shutil.rmtree(head.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def deployed(ray_head: LocalRayHead) -> dict[str, Any]:
    config = copy.deepcopy(serve_config("local-test"))  # rendered by kustomize, as KubeRay gets it
    http_port = free_port()
    # The only edits: a free local port for the proxy instead of the pod's 0.0.0.0:8000.
    config["http_options"] = {**config["http_options"], "host": "127.0.0.1", "port": http_port}
    ray_head.put_config(config)
    status = wait_for(lambda: ray_head.app_status() in {"RUNNING", "DEPLOY_FAILED"}, 180, 1.0, "RUNNING")
    app = (ray_head.serve_status() or {}).get("applications", {}).get(APP, {})
    assert status and app.get("status") == "RUNNING", (app.get("message"), app.get("deployments"))
    return {"config": config, "base_url": f"http://127.0.0.1:{http_port}/v1"}


def test_serve_runs_the_manifests_fast_path(ray_head: LocalRayHead, deployed: dict[str, Any]) -> None:
    # The env the pods carry reaches Ray Serve: the Gateway's handles to the engines use gRPC, and the
    # controller announces the throughput-optimized transport without direct ingress.
    assert manifest_ray_env("local-test")["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    r = httpx.get(
        deployed["base_url"].removesuffix("/v1") + "/admin/pools",
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["transport"] == "grpc", r.text
    logs = [p for p in Path(ray_head.temp_dir).glob("session_latest/logs/**/*") if p.is_file()]
    text = "".join(p.read_text(errors="replace") for p in logs if p.suffix in {".log", ".err", ".out"})
    start = text.find("Throughput optimized Ray Serve enabled")
    assert start >= 0, "the controller never announced the throughput-optimized transport"
    announced = text[start : start + 600]
    assert "gRPC communication enabled" in announced
    assert "Direct ingress enabled" not in announced


def test_dashboard_rejects_a_put_without_the_token(ray_head: LocalRayHead, deployed: dict[str, Any]) -> None:
    r = httpx.put(f"{ray_head.url}/api/serve/applications/", json=deployed["config"], timeout=30)
    assert r.status_code in {401, 403}, r.text


def test_chat_completion_through_the_deployed_config(deployed: dict[str, Any]) -> None:
    client = openai.OpenAI(base_url=deployed["base_url"], api_key=CLIENT_KEY, max_retries=0, timeout=60)
    resp = client.chat.completions.create(
        model="sim-llm", messages=[{"role": "user", "content": "hello"}], max_tokens=6
    )
    assert resp.model == "sim-llm"
    assert resp.choices[0].message.content and resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 6
    chunks = client.chat.completions.create(
        model="sim-llm", messages=[{"role": "user", "content": "stream"}], max_tokens=4, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text


def test_client_key_from_the_secret_env_is_enforced(deployed: dict[str, Any]) -> None:
    client = openai.OpenAI(base_url=deployed["base_url"], api_key="sk-wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="sim-llm", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_route_change_reconfigures_gateway_without_restarting_the_engine(
    ray_head: LocalRayHead, deployed: dict[str, Any]
) -> None:
    engines_before = ray_head.replica_ids("LLMServer-sim")
    config = copy.deepcopy(deployed["config"])
    # A routing change as docs/gke.md describes it: an edit to the Gateway's user_config only.
    (gateway,) = config["applications"][0]["deployments"]
    gateway["user_config"]["routes"]["sim-llm-v2"] = {"policy": "self_hosted_only", "pool": "sim"}
    ray_head.put_config(config)
    client = openai.OpenAI(base_url=deployed["base_url"], api_key=CLIENT_KEY, max_retries=0, timeout=30)

    def new_alias_served() -> bool:
        try:
            client.chat.completions.create(
                model="sim-llm-v2", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        except openai.NotFoundError:
            return False
        return True

    wait_for(new_alias_served, 60, 0.5, "the new route alias")
    wait_for(lambda: ray_head.app_status() == "RUNNING", 60, 0.5, "RUNNING after the update")
    assert ray_head.replica_ids("LLMServer-sim") == engines_before


def run_llm_readiness_probe(
    head: LocalRayHead, proxy_url: str, token: str, pod_ip: str
) -> subprocess.CompletedProcess[str]:
    """The llm group's readinessProbe script from the rendered manifest, pointed at this local cluster."""
    command = ray_container(group("local-test", "llm")["template"])["readinessProbe"]["exec"]["command"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PROBE_"))}
    env.update(PROBE_HEAD_URL=head.url, PROBE_AGENT_URL=f"http://127.0.0.1:{head.agent_port}")
    env.update(PROBE_PROXY_URL=proxy_url, RAY_AUTH_TOKEN=token, SERVE_APP_POD_IP=pod_ip)
    return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, text=True, timeout=60)


def test_llm_readiness_probe_against_the_real_cluster(ray_head: LocalRayHead, deployed: dict[str, Any]) -> None:
    # The real raylet health endpoint, Serve proxy and token-protected Serve REST API: the engine replica
    # runs on this (only) node, so the probe passes; without the token or on another IP it fails.
    # This node's IP as Ray reports it (the Serve controller runs here too): on a pod, status.podIP.
    node_ip = (ray_head.serve_status() or {})["controller_info"]["node_ip"]
    proxy = deployed["base_url"].removesuffix("/v1")
    ok = run_llm_readiness_probe(ray_head, proxy, ray_head.token, node_ip)
    assert ok.returncode == 0, ok.stderr
    assert run_llm_readiness_probe(ray_head, proxy, "wrong-token", node_ip).returncode != 0
    elsewhere = run_llm_readiness_probe(ray_head, proxy, ray_head.token, "10.255.255.1")
    assert elsewhere.returncode != 0 and "none" in elsewhere.stderr


def test_gateway_replica_runs_on_the_gateway_resource(ray_head: LocalRayHead, deployed: dict[str, Any]) -> None:
    # Serve placed the Gateway only because this node offers the `gateway` resource it asks for.
    status = ray_head.serve_status() or {}
    gateway = status["applications"][APP]["deployments"]["Gateway"]
    assert gateway["deployment_config"]["ray_actor_options"]["resources"] == {"gateway": 1.0}
    assert {r["state"] for r in gateway["replicas"]} == {"RUNNING"}
