"""The Prometheus rules in deploy/prometheus/alerts.yml.

promtool accepts them. The promtool unit tests in tests/rules/ pass. Every alert (each severity of it)
has a case where it fires and a case where it stays quiet. Each alert is complete: severity, summary, a
description quoting the value, and a runbook link to an existing section. Rules use only metric names
poolwatch exports.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import unavailable
from tests.promql_names import REPO_ROOT, known_metric_names, metric_names, template_queries

RULES = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = sorted((REPO_ROOT / "tests" / "rules").glob("*_test.yml"))
RUNBOOKS = REPO_ROOT / "docs" / "runbooks.md"
RUNBOOK_BASE = "https://github.com/poolwatch/poolwatch/blob/main/docs/runbooks.md#"
SEVERITIES = {"critical", "warning", "info"}
#: labels an alert may carry: one alert per target (or per poolwatch scrape), never per pool or session
ALERT_LABELS = {"alertname", "severity", "target", "kind", "job", "instance"}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool is missing: apt-get install -y prometheus (scripts/test does)"
        unavailable(message)
    return found


def _groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


def _alerting_rules() -> list[dict[str, Any]]:
    return [rule for group in _groups() for rule in group["rules"] if "alert" in rule]


def _recording_rules() -> list[dict[str, Any]]:
    return [rule for group in _groups() for rule in group["rules"] if "record" in rule]


def _rule_tests() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, group) for path in RULE_TESTS for group in yaml.safe_load(path.read_text())["tests"]]


def _alert_cases() -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(test group name, alertname, expected alerts) for every alert_rule_test."""
    return [
        (group.get("name", path.name), case["alertname"], case.get("exp_alerts") or [])
        for path, group in _rule_tests()
        for case in group.get("alert_rule_test", [])
    ]


def _github_anchor(heading: str) -> str:
    anchor = heading.strip().lower()
    anchor = re.sub(r"[^\w\- ]", "", anchor)
    return anchor.replace(" ", "-")


def _runbook_anchors() -> set[str]:
    return {
        _github_anchor(line.lstrip("#"))
        for line in RUNBOOKS.read_text().splitlines()
        if re.match(r"^#{1,6} ", line)
    }


def test_promtool_check_rules_accepts_the_rules() -> None:
    done = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_pass() -> None:
    assert RULE_TESTS, "no promtool unit tests in tests/rules"
    done = subprocess.run(
        [_promtool(), "test", "rules", *map(str, RULE_TESTS)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_fires_on_a_bad_series_and_stays_quiet_on_a_good_one() -> None:
    """Per alert name and severity: a case expecting it, and a case where it must not appear."""
    wanted = {(rule["alert"], rule["labels"]["severity"]) for rule in _alerting_rules()}
    fires: set[tuple[str, str]] = set()
    quiet: set[tuple[str, str]] = set()
    severities_by_name: dict[str, set[str]] = defaultdict(set)
    for name, severity in wanted:
        severities_by_name[name].add(severity)
    for _group, alertname, expected in _alert_cases():
        seen = {alert.get("exp_labels", {}).get("severity") for alert in expected}
        for severity in severities_by_name.get(alertname, set()):
            (fires if severity in seen else quiet).add((alertname, severity))
    missing_fire = sorted(wanted - fires)
    missing_quiet = sorted(wanted - quiet)
    assert not missing_fire, f"alerts without a firing case in tests/rules: {missing_fire}"
    assert not missing_quiet, f"alerts without a quiet case in tests/rules: {missing_quiet}"


def test_rule_tests_name_only_existing_alerts() -> None:
    """promtool passes `exp_alerts: []` for a misspelled alert name; this does not."""
    names = {rule["alert"] for rule in _alerting_rules()}
    unknown = sorted({alertname for _g, alertname, _e in _alert_cases()} - names)
    assert not unknown, f"tests/rules name alerts that alerts.yml does not define: {unknown}"


def test_firing_cases_check_the_rendered_annotations() -> None:
    incomplete = [
        (group, alertname)
        for group, alertname, expected in _alert_cases()
        for alert in expected
        if set(alert.get("exp_annotations", {})) != {"summary", "description", "runbook_url"}
    ]
    assert not incomplete, f"firing cases without summary/description/runbook_url: {incomplete}"


def test_one_incident_is_one_alert_not_one_per_pool() -> None:
    too_fine = {
        (group, alertname, key)
        for group, alertname, expected in _alert_cases()
        for alert in expected
        for key in set(alert.get("exp_labels", {})) - ALERT_LABELS
    }
    assert not too_fine, f"alerts labelled finer than per target: {sorted(too_fine)}"


def test_every_recording_rule_has_a_value_test_and_is_used() -> None:
    records = {rule["record"] for rule in _recording_rules()}
    tested = {
        name
        for _path, group in _rule_tests()
        for case in group.get("promql_expr_test", [])
        for name in metric_names(case["expr"])
    }
    used = {name for rule in _alerting_rules() for name in metric_names(rule["expr"])}
    assert records - tested == set(), f"recording rules without a promql_expr_test: {records - tested}"
    assert records - used == set(), f"recording rules no alert reads: {records - used}"


@pytest.mark.parametrize("rule", _alerting_rules(), ids=lambda r: f"{r['alert']}-{r['labels']['severity']}")
def test_alert_is_complete(rule: dict[str, Any]) -> None:
    labels, annotations = rule["labels"], rule["annotations"]
    assert labels["severity"] in SEVERITIES
    assert set(annotations) == {"summary", "description", "runbook_url"}
    assert "$value" in annotations["description"], "the description must quote the observed value"
    url = annotations["runbook_url"]
    assert url.startswith(RUNBOOK_BASE), url
    anchor = url[len(RUNBOOK_BASE) :]
    assert anchor == rule["alert"].lower(), "runbook anchor should be the alert's own section"
    assert anchor in _runbook_anchors(), f"docs/runbooks.md has no section #{anchor}"
    if labels["severity"] != "info":
        assert rule.get("for"), "alerts need `for:` so one bad sample does not page"


def test_alerts_of_one_name_share_the_expression_shape_and_differ_in_severity() -> None:
    by_name: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rule in _alerting_rules():
        by_name[rule["alert"]].append(rule)
    for name, rules in by_name.items():
        severities = [r["labels"]["severity"] for r in rules]
        assert len(severities) == len(set(severities)), f"{name}: two rules with the same severity"
        shapes = {re.sub(r"[<>]=?\s*[\d.]+\s*$", "", r["expr"].strip()) for r in rules}
        assert len(shapes) == 1, f"{name}: warning and critical should differ only in the threshold"


def test_rules_use_only_metrics_poolwatch_exports() -> None:
    known = known_metric_names() | {rule["record"] for rule in _recording_rules()}
    unknown: dict[str, set[str]] = {}
    for rule in _recording_rules() + _alerting_rules():
        name = rule.get("alert") or rule["record"]
        exprs = [rule["expr"]] + [
            q for text in rule.get("annotations", {}).values() for q in template_queries(text)
        ]
        for expr in exprs:
            missing = metric_names(expr) - known
            if missing:
                unknown.setdefault(name, set()).update(missing)
    assert not unknown, f"names not in tests/rules/metric_names.txt: {unknown}"


def test_metric_name_extraction_sees_through_promql() -> None:
    expr = (
        'max by (target) (rate(a_total{x="b c"}[5m] offset 1h)) / on (target) group_left () '
        'clamp_min(label_replace(b, "d", "$1", "e", "(.+)"), 1) > 0.5 and c unless absent(d)'
    )
    assert metric_names(expr) == {"a_total", "b", "c", "d"}
