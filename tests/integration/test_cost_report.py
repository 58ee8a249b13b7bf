"""`serve-app cost` on real metrics: load through the app (simulated pool + Gemini stand-in), scrape Ray's
metrics port, and check the report's token counts equal what the responses said was served."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_app.cli import main
from serve_app.testing.gemini_standin import running_standin
from tests.integration.conftest import GEMINI_TEST_KEY, GEMINI_TEST_KEY_ENV, deploy
from tests.support import sim_pool, wait_for

APP = "cost"
SELF, HOSTED = "cost-self", "cost-gem"


def test_cost_report_counts_what_was_served(
    ray_cluster: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ray import serve

    with running_standin(api_key=GEMINI_TEST_KEY) as standin:
        config = {
            "pools": {"cp": sim_pool()},
            "routes": {
                SELF: {"policy": "self_hosted_only", "pool": "cp"},
                HOSTED: {"policy": "hosted_only", "gemini_model": "gemini-2.5-flash"},
            },
            "gemini": {"api_key_env": GEMINI_TEST_KEY_ENV, "base_url": standin.base_url},
            "gateway": {"num_cpus": 0.1},
        }
        base = deploy(ray_cluster, APP, config)
        try:
            sent: dict[tuple[str, str], int] = {}
            for model, n, max_tokens in ((SELF, 3, 7), (HOSTED, 2, 5)):
                for i in range(n):
                    body = {
                        "model": model,
                        "messages": [{"role": "user", "content": f"count {i} words"}],
                        "max_tokens": max_tokens,
                    }
                    usage = httpx.post(f"{base}/chat/completions", json=body, timeout=30).json()["usage"]
                    route = "self_hosted" if model == SELF else "gemini"
                    for kind in ("prompt", "completion"):
                        key = (route, kind)
                        sent[key] = sent.get(key, 0) + usage[f"{kind}_tokens"]
        finally:
            serve.delete(APP)

    metrics_url = f"http://127.0.0.1:{ray_cluster['metrics_port']}/metrics"

    def report() -> dict[str, Any] | None:
        snapshot = tmp_path / "metrics.txt"
        snapshot.write_text(httpx.get(metrics_url, timeout=10).text)
        capsys.readouterr()
        assert main(["cost", "--metrics-file", str(snapshot), "--window", "1h", "--replicas", "1", "--json"]) == 0
        data: dict[str, Any] = json.loads(capsys.readouterr().out)
        got = {
            (row["route"], kind): row[kind]
            for row in data["tokens"]
            if row["model"] in (SELF, HOSTED)
            for kind in ("prompt", "completion")
        }
        return data if got == {k: float(v) for k, v in sent.items()} else None

    data = wait_for(report, timeout=45, interval=2, what="exported token counters matching what was served")
    assert data["self_hosted_cost_usd"] > 0 and data["spilled_cost_usd"] > 0
