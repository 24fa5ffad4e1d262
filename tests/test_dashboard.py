"""The Grafana dashboard: generated from grafana/dashboard.py, structurally sound, consistent with the rules.

* The committed JSON is exactly what the generator emits.
* Panel ids are unique, panels fit the grid without overlapping, and every panel has a datasource and a
  query.
* Every variable used is defined, and every metric queried is one poolwatch exports.
* The threshold lines equal the thresholds of the alerts in deploy/prometheus/alerts.yml.
* The provisioning files point Grafana at the datasource the dashboard defaults to.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.promql_names import REPO_ROOT, known_metric_names, metric_names

GENERATOR = REPO_ROOT / "grafana" / "dashboard.py"
DASHBOARD = REPO_ROOT / "grafana" / "dashboards" / "poolwatch.json"
PROVISIONING = REPO_ROOT / "grafana" / "provisioning"
RULES = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
ROWS = [
    "Overview",
    "PgBouncer pools",
    "Throughput and latency (SHOW STATS)",
    "PostgreSQL connections",
    "Transaction and connection ages",
    "SELECT 1 probes",
]
#: Grafana's own variables
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__all"}
_VARIABLE = re.compile(r"\$\{(\w+)(?:[:.][^}]*)?\}|\[\[(\w+)(?::\w+)?\]\]|\$(\w+)")


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("poolwatch_grafana_dashboard", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    return _generator()


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """All panels, rows included, collapsed rows' children too."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in _strings(value)]
    return []


def _alert_rules() -> list[dict[str, Any]]:
    return [
        rule
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def test_committed_json_is_what_the_generator_emits(generator: ModuleType) -> None:
    assert DASHBOARD.read_text() == generator.render(), "stale dashboard: run python grafana/dashboard.py"


def test_rows_are_the_documented_ones(dashboard: dict[str, Any]) -> None:
    assert [p["title"] for p in dashboard["panels"] if p["type"] == "row"] == ROWS


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), ids
    assert all(isinstance(i, int) and i > 0 for i in ids)


def test_panels_fit_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_every_panel_has_a_datasource_and_a_query(dashboard: dict[str, Any]) -> None:
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        title = panel["title"]
        assert panel.get("datasource") == datasource, title
        assert panel.get("description"), f"{title}: say what the panel shows"
        targets = panel.get("targets") or []
        assert targets, f"{title} has no query"
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), title
        for target in targets:
            assert target.get("datasource") == datasource, title
            assert target.get("expr", "").strip(), f"{title}: empty query"


def test_every_variable_used_is_defined(dashboard: dict[str, Any]) -> None:
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance", "target", "database", "user"} <= defined
    used = set()
    for text in _strings(dashboard):
        for match in _VARIABLE.finditer(text):
            name = next(group for group in match.groups() if group)
            if name.isdigit():  # label_replace's "$1", a regex back-reference
                continue
            used.add(name)
    assert used - defined - BUILTIN_VARIABLES == set()
    assert defined - used == set(), "variables nothing uses"


def test_variables_chain_and_default_to_all(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("instance", "target", "database", "user"):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["includeAll"] and variable["allValue"] == ".*", name
        assert variable["definition"].startswith("label_values("), name
        assert variable["query"]["query"] == variable["definition"]


def test_dashboard_queries_only_metrics_poolwatch_exports(dashboard: dict[str, Any]) -> None:
    known = known_metric_names()
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["definition"])
            assert match, variable["definition"]
            exprs.append(match.group(1))
    unknown = {name for expr in exprs for name in metric_names(expr)} - known
    assert not unknown, f"names not in tests/rules/metric_names.txt: {unknown}"


def test_threshold_lines_are_the_alert_thresholds(generator: ModuleType, dashboard: dict[str, Any]) -> None:
    rules = _alert_rules()
    for key, threshold in generator.THRESHOLDS.items():
        for alert in threshold.alerts:
            by_severity = {r["labels"]["severity"]: r["expr"] for r in rules if r["alert"] == alert}
            assert by_severity, f"{key}: alerts.yml has no alert {alert}"
            for severity, value in (("warning", threshold.warning), ("critical", threshold.critical)):
                if value is None:
                    assert severity not in by_severity, f"{alert} has a {severity} rule the dashboard lacks"
                    continue
                assert severity in by_severity, f"{alert} has no {severity} rule"
                comparison = re.compile(rf"[<>]=?\s*{re.escape(f'{value:g}')}(?![\d.])")
                assert comparison.search(by_severity[severity]), (
                    f"{alert} ({severity}) does not compare with {value:g}: {by_severity[severity]}"
                )
    panels = {p["title"]: p for p in _panels(dashboard)}
    assert set(generator.PANEL_THRESHOLDS.values()) == set(generator.THRESHOLDS), "unused thresholds"
    for title, key in generator.PANEL_THRESHOLDS.items():
        threshold = generator.THRESHOLDS[key]
        defaults = panels[title]["fieldConfig"]["defaults"]
        steps = [step["value"] for step in defaults["thresholds"]["steps"][1:]]
        expected = [threshold.warning] + ([threshold.critical] if threshold.critical is not None else [])
        assert steps == expected, title
        assert defaults["custom"]["thresholdsStyle"]["mode"] == "dashed", title
        for alert in threshold.alerts:
            assert alert in panels[title]["description"], f"{title}: name the alert its lines come from"


def test_panels_without_threshold_lines_draw_none(generator: ModuleType, dashboard: dict[str, Any]) -> None:
    for panel in _panels(dashboard):
        if panel["type"] != "timeseries" or panel["title"] in generator.PANEL_THRESHOLDS:
            continue
        assert panel["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "off", panel["title"]


def test_provisioning_matches_the_dashboard(generator: ModuleType, dashboard: dict[str, Any]) -> None:
    datasources = [
        ds
        for path in sorted((PROVISIONING / "datasources").glob("*.yml"))
        for ds in yaml.safe_load(path.read_text())["datasources"]
    ]
    prometheus = [ds for ds in datasources if ds["type"] == "prometheus"]
    assert len(prometheus) == 1
    default = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert prometheus[0]["uid"] == default["current"]["value"] == generator.DEFAULT_DATASOURCE_UID
    providers = [
        provider
        for path in sorted((PROVISIONING / "dashboards").glob("*.yml"))
        for provider in yaml.safe_load(path.read_text())["providers"]
    ]
    assert len(providers) == 1
    assert providers[0]["type"] == "file"
    assert providers[0]["options"]["path"]
    assert providers[0]["folder"] == "poolwatch"
    assert dashboard["uid"] == "poolwatch"
