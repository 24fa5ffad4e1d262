#!/usr/bin/env python3
"""Generate deploy/kubernetes/prometheusrule.yaml from deploy/prometheus/alerts.yml.

The alert and recording rules have one source, the Prometheus rule file
``deploy/prometheus/alerts.yml`` (``promtool check rules`` reads it; deploy/compose mounts it).
For the Prometheus Operator the same groups are wrapped in a ``PrometheusRule`` resource:

    .venv/bin/python scripts/gen-prometheusrule.py            # (re)write the PrometheusRule
    .venv/bin/python scripts/gen-prometheusrule.py --check    # exit 1 when it is stale

Run it after every change to alerts.yml; tests/test_deploy_manifests.py fails while the
generated file is stale. Needs PyYAML (in the project's venv).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
OUTPUT = REPO / "deploy" / "kubernetes" / "prometheusrule.yaml"
RULE_KEYS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
REGENERATE = ".venv/bin/python scripts/gen-prometheusrule.py"
GROUP_KEYS = {"name", "interval", "limit", "query_offset", "labels", "rules"}


class RuleFileError(Exception):
    pass


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (PromQL stays readable), key order kept."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> Any:
        return super().increase_indent(flow, False)  # indent list items under their key


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str)


def _where(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def load_groups(path: Path) -> list[dict[str, Any]]:
    """The rule groups of a Prometheus rule file, checked enough to be a valid PrometheusRule."""
    where = _where(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RuleFileError(f"{where}: invalid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("groups"), list) or not data["groups"]:
        raise RuleFileError(f"{where}: expected a mapping with a non-empty 'groups' list")
    unknown_top = set(data) - {"groups"}
    if unknown_top:
        raise RuleFileError(f"{where}: unknown top-level keys {sorted(unknown_top)}")
    names: set[str] = set()
    for i, group in enumerate(data["groups"]):
        if not isinstance(group, dict) or not isinstance(group.get("name"), str) or not group["name"]:
            raise RuleFileError(f"{where}: groups[{i}]: needs a name")
        if group["name"] in names:
            raise RuleFileError(f"{where}: group name {group['name']!r} is used twice")
        names.add(group["name"])
        unknown = set(group) - GROUP_KEYS
        if unknown:
            raise RuleFileError(f"{where}: group {group['name']!r}: unknown keys {sorted(unknown)}")
        rules = group.get("rules")
        if not isinstance(rules, list) or not rules:
            raise RuleFileError(f"{where}: group {group['name']!r}: needs a non-empty 'rules' list")
        for j, rule in enumerate(rules):
            at = f"{where}: group {group['name']!r} rules[{j}]"
            if not isinstance(rule, dict):
                raise RuleFileError(f"{at}: not a mapping")
            if ("alert" in rule) == ("record" in rule):
                raise RuleFileError(f"{at}: needs exactly one of 'alert' or 'record'")
            if not isinstance(rule.get("expr"), str) or not rule["expr"].strip():
                raise RuleFileError(f"{at}: needs an 'expr'")
            if set(rule) - RULE_KEYS:
                raise RuleFileError(f"{at}: unknown keys {sorted(set(rule) - RULE_KEYS)}")
    groups: list[dict[str, Any]] = data["groups"]
    return groups


def render(groups: list[dict[str, Any]], source: Path) -> str:
    resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "poolwatch",
            "labels": {"app.kubernetes.io/name": "poolwatch"},
        },
        "spec": {"groups": groups},
    }
    header = (
        f"# GENERATED from {_where(source)} by scripts/gen-prometheusrule.py: do not edit.\n"
        f"# Regenerate after changing the rules:  {REGENERATE}\n"
        "# If your Prometheus selects rules by label (kube-prometheus-stack: release=<name>),\n"
        "# add it with kustomize (labels:) rather than here.\n"
    )
    body = yaml.dump(resource, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=4096)
    return header + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alerts", type=Path, default=ALERTS, help=f"rule file ({_where(ALERTS)})")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"PrometheusRule ({_where(OUTPUT)})")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 when the output is stale")
    args = parser.parse_args(argv)
    if not args.alerts.exists():
        print(f"gen-prometheusrule: {_where(args.alerts)} does not exist", file=sys.stderr)
        return 2
    try:
        text = render(load_groups(args.alerts), args.alerts)
    except RuleFileError as exc:
        print(f"gen-prometheusrule: {exc}", file=sys.stderr)
        return 2
    current = args.output.read_text(encoding="utf-8") if args.output.exists() else None
    if args.check:
        if current != text:
            print(f"gen-prometheusrule: {_where(args.output)} is stale: run {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    if current != text:
        args.output.write_text(text, encoding="utf-8")
        print(f"wrote {_where(args.output)}")
    else:
        print(f"{_where(args.output)} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
