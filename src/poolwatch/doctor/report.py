"""Rendering verdicts: JSON (stable, documented schema), HTML without JavaScript, a terminal report."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from poolwatch.doctor.model import Finding, Status, worst

SCHEMA_VERSION = 1

_COLOURS = {
    Status.OK: "\x1b[32m",
    Status.WARN: "\x1b[33m",
    Status.FAIL: "\x1b[31m",
    Status.UNKNOWN: "\x1b[36m",
}
_RESET, _BOLD, _DIM = "\x1b[0m", "\x1b[1m", "\x1b[2m"


def _by_target(findings: Sequence[Finding]) -> dict[str, list[Finding]]:
    grouped: dict[str, list[Finding]] = {}
    for finding in findings:
        grouped.setdefault(finding.target, []).append(finding)
    return grouped


def to_document(findings: Sequence[Finding], generated_at: float | None = None) -> dict[str, Any]:
    """The ``/checklist`` JSON document (schema_version 1, documented in the README)."""
    when = datetime.fromtimestamp(generated_at, UTC) if generated_at else datetime.now(UTC)
    counts = {status.label: 0 for status in (Status.OK, Status.WARN, Status.FAIL, Status.UNKNOWN)}
    for finding in findings:
        counts[finding.status.label] += 1
    return {
        "schema_version": SCHEMA_VERSION,
        "generated_at": when.isoformat(timespec="seconds"),
        "overall": worst(list(findings)).label,
        "counts": counts,
        "targets": [
            {"target": target, "status": worst(items).label, "findings": [f.to_json() for f in items]}
            for target, items in _by_target(findings).items()
        ],
    }


def to_json(findings: Sequence[Finding], generated_at: float | None = None) -> str:
    return json.dumps(to_document(findings, generated_at), indent=2, sort_keys=False, default=str)


def _evidence_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | tuple):
        return ", ".join(_evidence_text(v) for v in value) or "(none)"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_evidence_text(v)}" for k, v in value.items()) or "(none)"
    return str(value)


def to_terminal(findings: Sequence[Finding], colour: bool) -> str:
    def paint(text: str, code: str) -> str:
        return f"{code}{text}{_RESET}" if colour else text

    lines: list[str] = []
    for target, items in _by_target(findings).items():
        status = worst(items)
        lines.append(paint(f"== {target}: {status.label.upper()}", _BOLD + _COLOURS[status]))
        for finding in items:
            badge = paint(f"[{finding.status.label.upper():7}]", _COLOURS[finding.status])
            lines.append(f"{badge} {finding.title}: {finding.summary}")
            if finding.evidence:
                evidence = "; ".join(f"{k}={_evidence_text(v)}" for k, v in finding.evidence.items())
                lines.append(paint(f"          evidence: {evidence}", _DIM))
            if finding.recommendation and finding.status is not Status.OK:
                lines.append(f"          fix: {finding.recommendation}")
        lines.append("")
    counts = to_document(findings)["counts"]
    overall = worst(list(findings))
    lines.append(
        paint(f"overall: {overall.label.upper()}", _BOLD + _COLOURS[overall])
        + f"  ({counts['fail']} fail, {counts['warn']} warn, {counts['unknown']} unknown, {counts['ok']} ok)"
    )
    return "\n".join(lines) + "\n"


_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem;max-width:70rem;color:#1b1f24}
h1{font-size:1.5rem} h2{font-size:1.2rem;margin-top:2rem}
table{border-collapse:collapse;width:100%}
td,th{border-bottom:1px solid #d0d7de;padding:.4rem;vertical-align:top;text-align:left}
.badge{display:inline-block;min-width:5rem;text-align:center;border-radius:.3rem;padding:.1rem .4rem;
font-weight:600;color:#fff}
.ok{background:#1a7f37}.warn{background:#9a6700}.fail{background:#cf222e}.unknown{background:#57606a}
.evidence{font-family:ui-monospace,monospace;font-size:.85rem;color:#57606a}
.fix{margin-top:.3rem}
"""


def to_html(findings: Sequence[Finding], generated_at: float | None = None) -> str:
    doc = to_document(findings, generated_at)
    counts = doc["counts"]
    esc = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>poolwatch checklist: {esc(doc['overall'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>Pool doctor <span class='badge {esc(doc['overall'])}' id='overall'>"
        f"{esc(doc['overall'].upper())}"
        "</span></h1>",
        f"<p>Generated {esc(doc['generated_at'])}. {counts['fail']} fail, {counts['warn']} warn, "
        f"{counts['unknown']} unknown, {counts['ok']} ok. "
        "<a href='checklist?format=json'>JSON</a></p>",
    ]
    for group in doc["targets"]:
        target = esc(group["target"])
        parts.append(
            f"<h2 id='target-{target}'>{target} <span class='badge {esc(group['status'])}'>"
            f"{esc(group['status'].upper())}</span></h2>"
        )
        parts.append("<table><thead><tr><th>Status</th><th>Check</th><th>Finding</th></tr></thead><tbody>")
        for finding in group["findings"]:
            evidence = "; ".join(f"{k}={_evidence_text(v)}" for k, v in finding["evidence"].items())
            fix = finding["recommendation"] if finding["status"] != "ok" else None
            status = esc(finding["status"])
            parts.append(
                f"<tr class='finding' data-check='{esc(finding['check'])}' data-status='{status}'>"
                f"<td><span class='badge {status}'>{status.upper()}</span></td>"
                f"<td>{esc(finding['title'])}</td>"
                f"<td>{esc(finding['summary'])}"
                + (f"<div class='evidence'>{esc(evidence)}</div>" if evidence else "")
                + (f"<div class='fix'><strong>Fix:</strong> {esc(fix)}</div>" if fix else "")
                + (
                    f"<div class='evidence'>Rule: {esc(finding['reference'])}</div>"
                    if finding["reference"]
                    else ""
                )
                + "</td></tr>"
            )
        parts.append("</tbody></table>")
    if not doc["targets"]:
        parts.append("<p>No verdicts yet: the first collection has not finished.</p>")
    parts.append("</body></html>")
    return "".join(parts)
