"""Monitoring files in deploy/ (issue 18, operations): Prometheus alert rules, their unit tests, the scrape config
and the Grafana dashboard are valid, and every metric they name is one the services export.

``promtool`` (Debian package ``prometheus``; scripts/ensure_debian_tools.sh installs it for ``make test``) checks and
unit-tests the rules. The exported names come from the services' own registries (not a copied list), so renaming a
metric in services/ without updating the rules or the dashboard fails here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "far-mesh-alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "far-mesh-dashboard.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: run scripts/ensure_debian_tools.sh "
                                                             "(Debian package 'prometheus'; `make test` does)")

# Series Prometheus itself adds to every scrape.
SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                "offset", "inf", "nan"}


def exported_series() -> set[str]:
    """Every series name the coordinator, discovery and payment tracker (with its deposit watcher) can expose."""
    from prometheus_client import REGISTRY

    import services.coordinator.metrics  # noqa: F401  (register on the default registry, as in the processes)
    import services.deposits.metrics  # noqa: F401
    import services.payouts.metrics  # noqa: F401
    from services.discovery.metrics import DiscoveryMetrics

    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",)}
    names: set[str] = set()
    for registry in (REGISTRY, DiscoveryMetrics().registry):
        for family in registry.collect():
            names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
            names.update(sample.name for sample in family.samples)  # process_*/python_* collectors
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: what is left once strings, label matchers, grouping clauses, range
    selectors, function calls and keywords are taken out."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()", text):
        word = match.group(1)
        if word.lower() not in PROMQL_WORDS:
            names.add(word)
    return names


def test_metric_name_extraction():
    expr = ('sum by (model_id, le) (rate(farmesh_x_bucket{model_id=~"a|b", le="+Inf"}[5m])) / on(instance) '
            'clamp_min(far_y, 1e-9) > 0.2 and time() - max(z_total offset 5m) > 8 * 86400')
    assert metric_names(expr) == {"farmesh_x_bucket", "far_y", "z_total"}


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables replaced by what they stand for at query time."""
    return expr.replace("$__rate_interval", "5m").replace("$model", ".*")


@needs_promtool
def test_promtool_checks_rules_and_config():
    for args in (["check", "rules", str(RULES)], ["check", "config", str(PROM / "prometheus.yml")]):
        result = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_of_alerts():
    tests = sorted(PROM.glob("*.test.yml"))
    assert len(tests) >= 2
    result = subprocess.run([PROMTOOL, "test", "rules", *map(str, tests)], capture_output=True, text=True,
                            timeout=120, cwd=PROM)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {item["alertname"] for path in tests for test in yaml.safe_load(path.read_text())["tests"]
              for item in test["alert_rule_test"] if item.get("exp_alerts")}
    # each of these is shown firing (and quiet before its `for`) by a unit test
    assert {"FarMeshSwarmNotReady", "FarMeshNoBlocksLoaded", "FarMeshHighFailoverRate", "FarMeshSlowFirstToken",
            "FarMeshNodesMissingHeartbeats", "FarMeshPayoutBatchStuck", "FarMeshPayoutFailed"} <= tested


def test_alerts_cover_the_operations_issue():
    rules = {rule["alert"]: rule for rule in alert_rules()}
    for name in ("FarMeshSwarmNotReady", "FarMeshNoBlocksLoaded", "FarMeshHighFailoverRate", "FarMeshSlowFirstToken",
                 "FarMeshPayoutBatchStuck", "FarMeshPayoutFailed", "FarMeshNodesMissingHeartbeats",
                 "FarMeshHeartbeatFlushLagging"):
        assert name in rules, name
        assert rules[name]["labels"]["severity"] in ("page", "warning")
        assert rules[name]["annotations"]["summary"] and rules[name]["annotations"]["description"]


def test_alert_rules_name_only_exported_metrics():
    exported = exported_series() | SCRAPE_SERIES
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, f"{rule['alert']}: no metric in {rule['expr']!r}"
        unknown = names - exported
        assert not unknown, f"{rule['alert']} names metrics no service exports: {sorted(unknown)}"


def test_dashboard_is_valid_and_names_only_exported_metrics(tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exported = exported_series()
    exprs = dashboard_exprs()
    used = set()
    for expr in exprs:
        names = metric_names(grafana_to_promql(expr))
        assert names, f"no metric in {expr!r}"
        unknown = names - exported
        assert not unknown, f"dashboard query names metrics no service exports: {sorted(unknown)} in {expr!r}"
        used |= names
    # the three services each have panels
    assert any(n.startswith("farmesh_") and not n.startswith("farmesh_payouts") for n in used)
    assert any(n.startswith("far_discovery_") for n in used)
    assert any(n.startswith("farmesh_payouts_") for n in used)
    if PROMTOOL:  # the PromQL itself parses: every query as a recording rule through promtool
        rules = {"groups": [{"name": "dashboard", "rules": [
            {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)} for i, expr in enumerate(exprs)]}]}
        path = tmp_path / "dashboard-queries.yml"
        path.write_text(yaml.safe_dump(rules))
        result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
