"""The Grafana dashboard's structure, and that every metric it reads is one somebody actually exports.

Whether each query returns data against a live app is tests/integration/test_dashboard_queries.py.
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.observability import (
    RAY_SERVE_METRICS,
    VLLM_METRICS,
    load_dashboard,
    metric_names,
    our_metric_names,
    panels,
    substitute,
    targets,
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@pytest.fixture(scope="module")
def dash() -> dict[str, Any]:
    return load_dashboard()


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # the installed package's location, without importing it
    assert spec is not None and spec.origin is not None, f"{name} is not installed"
    return Path(spec.origin).parent


def test_top_level_fields(dash: dict[str, Any]) -> None:
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == DATASOURCE
            assert var["includeAll"] and var["allValue"] == ".*", "the tests substitute allValue for All"


def test_panels_have_unique_ids_and_fit_the_grid(dash: dict[str, Any]) -> None:
    ps = panels(dash)
    ids = [p["id"] for p in ps]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in ps:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in ("h", "w", "x", "y")), p["title"]
        assert g["w"] > 0 and g["h"] > 0 and 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))


def test_every_panel_queries_through_the_datasource_variable(dash: dict[str, Any]) -> None:
    for p in panels(dash):
        if p["type"] == "row":
            continue
        assert p["datasource"] == DATASOURCE, p["title"]
        assert p.get("targets"), f"panel {p['title']!r} has no queries"
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE and t["expr"].strip(), p["title"]


def test_rates_use_the_rate_interval_variable(dash: dict[str, Any]) -> None:
    """Grafana picks a window that fits the scrape interval (15 s on GKE, 1-2 s locally)."""
    for t in targets(dash):
        if "[" in t.expr:
            windows = {w for w in t.expr.split("[")[1:]}
            assert all(w.startswith("$__rate_interval]") for w in windows), t.label


def test_every_metric_is_ours_or_an_allowed_ray_or_vllm_metric(dash: dict[str, Any]) -> None:
    allowed = our_metric_names() | set(RAY_SERVE_METRICS) | set(VLLM_METRICS)
    seen: set[str] = set()
    for t in targets(dash):
        names = metric_names(t.expr)
        assert names, f"{t.label}: no metric found in {t.expr!r}"
        assert names <= allowed, f"{t.label}: unknown metric(s) {sorted(names - allowed)}"
        seen |= names
    # The allow-lists are for the dashboard: an entry no panel uses is stale.
    assert set(RAY_SERVE_METRICS) | set(VLLM_METRICS) <= seen


def test_dashboard_covers_every_gateway_metric(dash: dict[str, Any]) -> None:
    used = set().union(*(metric_names(t.expr) for t in targets(dash)))
    from serve_app.metrics import SPECS

    missing = [
        s.prometheus_name
        for s in SPECS.values()
        if not any(n == s.prometheus_name or n.startswith(s.prometheus_name + "_") for n in used)
    ]
    assert not missing, f"metrics without a panel: {missing}"


def test_allowed_ray_serve_metrics_exist_in_the_installed_ray() -> None:
    sources = "\n".join(p.read_text() for p in (_package_dir("ray") / "serve" / "_private").glob("*.py"))
    for exported, name in RAY_SERVE_METRICS.items():
        assert exported == f"ray_{name}"
        assert f'"{name}"' in sources, f"Ray Serve no longer defines {name}"


def test_allowed_vllm_metrics_exist_in_the_installed_vllm() -> None:
    """vLLM's Ray stat logger replaces ':' with '_'; Ray adds `ray_`; counters get `_total`."""
    source = (_package_dir("vllm") / "v1" / "metrics" / "loggers.py").read_text()
    for exported, name in VLLM_METRICS.items():
        assert f'name="{name}"' in source, f"vLLM no longer defines {name}"
        base = "ray_" + name.replace(":", "_")
        assert exported in (base, base + "_total", base + "_bucket"), exported


def test_queries_parse(dash: dict[str, Any], tmp_path: Path) -> None:
    """promtool (Debian's prometheus package, `make prometheus`) parses every substituted expression."""
    rules = [
        {"record": f"dashboard:panel{t.panel_id}:{t.ref_id}", "expr": substitute(t.expr, dash, "1m")}
        for t in targets(dash)
    ]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (route) (rate(ray_a_total{model=~"$model", x!="y"}[$__rate_interval]))', {"ray_a_total"}),
        (
            "histogram_quantile(0.95, sum by (le, route) (rate(ray_b_bucket[5m])))",
            {"ray_b_bucket"},
        ),
        ("sum(rate(a[1m])) / sum without (pod) (rate(b[1m]))", {"a", "b"}),
        ("max by (model_name, ReplicaId) (ray_vllm_kv_cache_usage_perc)", {"ray_vllm_kv_cache_usage_perc"}),
        ('label_replace(up, "pool", "$1", "deployment", "LLMServer-(.*)")', {"up"}),
        ("a and on (x) b", {"a", "b"}),
    ],
)
def test_metric_names_extraction(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_substitute_uses_all_values_and_the_window(dash: dict[str, Any]) -> None:
    out = substitute('rate(x{model=~"$model", pool=~"${pool}"}[$__rate_interval])', dash, "30s")
    assert out == 'rate(x{model=~".*", pool=~".*"}[30s])'
