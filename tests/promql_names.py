"""Metric names in PromQL expressions, for tests that check rules and dashboards against poolwatch's metrics.

Not a PromQL parser: it strips what cannot hold a metric name (strings, label matchers, ranges, grouping
clauses, function names, keywords) and keeps the identifiers left. Good enough for the expressions this
repository writes; `promtool check rules` and the end-to-end test parse them for real.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
METRIC_NAMES_FILE = REPO_ROOT / "tests" / "rules" / "metric_names.txt"

_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "bool",
        "inf",
        "nan",
        "Inf",
        "NaN",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![A-Za-z0-9_:.$])([A-Za-z_:][A-Za-z0-9_:]*)(?![A-Za-z0-9_:])(?!\s*\()")


def known_metric_names() -> set[str]:
    """tests/rules/metric_names.txt: one name a line, # comments."""
    names = set()
    for line in METRIC_NAMES_FILE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(line)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric (or recording rule) names an expression selects."""
    if "__name__" in expr:
        raise ValueError(f"cannot check a __name__ matcher: {expr}")
    text = "\n".join(line.split("#", 1)[0] for line in expr.splitlines())
    text = _STRING.sub('""', text)
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _GROUPING.sub("", text)
    return {name for name in _IDENT.findall(text) if name not in _KEYWORDS}


def template_queries(annotation: str) -> list[str]:
    """The PromQL inside ``printf `...` ... | query`` calls of an alert annotation, placeholders filled."""
    queries = []
    for match in re.finditer(r"printf\s+`([^`]*)`", annotation):
        queries.append(match.group(1).replace("%q", '"x"'))
    return queries
