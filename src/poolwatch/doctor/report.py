"""Rendering verdicts: JSON (stable, documented schema), HTML without JavaScript, a terminal report.

The three say the same thing. JSON keeps the checklist order; the terminal report puts each
target's problems first (the checklist item number, ``#1`` … ``#11``, keeps the link to the
checklist); the HTML page starts with a list of the problems, linked to their rows.
"""

from __future__ import annotations

import html
import json
import re
import textwrap
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from poolwatch.doctor.model import SEVERITY, Finding, Status, worst

#: Bump only for incompatible changes (a field removed, renamed or changing type). New fields may
#: appear in any release; readers ignore what they do not know.
SCHEMA_VERSION = 1

_COLOURS = {
    Status.OK: "\x1b[32m",
    Status.WARN: "\x1b[33m",
    Status.FAIL: "\x1b[31m",
    Status.UNKNOWN: "\x1b[36m",
}
_RESET, _BOLD, _DIM = "\x1b[0m", "\x1b[1m", "\x1b[2m"

_GLUE = "\x00"
_UNIT = re.compile(r"\d (?:h|min|s|ms|MB)\b")
_QUOTED = re.compile(r"'[^']{1,30}'")
_PAIR = re.compile(r"[\w@.*()-]+: [^\s,;{}]{1,24}")  # "app@app: 0" inside an evidence mapping

_KIND_NAMES = {"pgbouncer": "PgBouncer", "postgres": "PostgreSQL", "poolwatch": "poolwatch itself"}

LEGEND = (
    ("fail", "a checklist item is broken: fix it (poolwatch doctor exits 1)"),
    ("warn", "worth fixing, or a risk the doctor cannot rule out"),
    ("unknown", "poolwatch could not see enough to judge; the line says why (never counted as ok)"),
    ("ok", "the item passes, with the value it saw"),
)


def _by_target(findings: Sequence[Finding]) -> list[tuple[str, str, list[Finding]]]:
    """(target, kind, findings) in first-seen order; a PgBouncer and a PostgreSQL of one name apart."""
    grouped: dict[tuple[str, str], list[Finding]] = {}
    for finding in findings:
        grouped.setdefault((finding.target, finding.kind), []).append(finding)
    return [(target, kind, items) for (target, kind), items in grouped.items()]


def _counts(findings: Sequence[Finding]) -> dict[str, int]:
    counts = {status.label: 0 for status in (Status.OK, Status.WARN, Status.FAIL, Status.UNKNOWN)}
    for finding in findings:
        counts[finding.status.label] += 1
    return counts


def to_document(findings: Sequence[Finding], generated_at: float | None = None) -> dict[str, Any]:
    """The ``/checklist`` JSON document (schema_version 1, documented in the README)."""
    when = datetime.fromtimestamp(generated_at, UTC) if generated_at else datetime.now(UTC)
    return {
        "schema_version": SCHEMA_VERSION,
        "generated_at": when.isoformat(timespec="seconds"),
        "overall": worst(list(findings)).label,
        "counts": _counts(findings),
        "targets": [
            {
                "target": target,
                "kind": kind,
                "status": worst(items).label,
                "findings": [f.to_json() for f in items],
            }
            for target, kind, items in _by_target(findings)
        ],
    }


def to_json(findings: Sequence[Finding], generated_at: float | None = None) -> str:
    return json.dumps(to_document(findings, generated_at), indent=2, sort_keys=False, default=str)


def _text(value: Any) -> str:
    """An evidence value in words: numbers without float noise, booleans as yes/no, nesting in braces."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_text(v) for v in value) + "]" if value else "none"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_text(v)}" for k, v in value.items()) + "}" if value else "none"
    if value == "":
        return '""'
    return str(value)


def evidence_text(evidence: dict[str, Any]) -> str:
    return "; ".join(f"{k} = {_text(v)}" for k, v in evidence.items())


def _heading(target: str, kind: str) -> str:
    if kind == "poolwatch":
        return _KIND_NAMES["poolwatch"]
    return f"{_KIND_NAMES.get(kind, kind)} {target}"


def _severity_first(items: Sequence[Finding]) -> list[Finding]:
    return sorted(items, key=lambda f: -SEVERITY[f.status])  # stable: checklist order within a status


def to_terminal(
    findings: Sequence[Finding], colour: bool, *, width: int = 100, generated_at: float | None = None
) -> str:
    """The ``poolwatch doctor`` report: per target, problems first, each with what was seen and the fix."""

    def paint(text: str, code: str) -> str:
        return f"{code}{text}{_RESET}" if colour else text

    def wrap(text: str, first: str, rest: str) -> list[str]:
        # keep "4 h", "30 s" and short quoted values on one line
        glued = _UNIT.sub(lambda m: m.group(0).replace(" ", _GLUE), text)
        glued = _QUOTED.sub(lambda m: m.group(0).replace(" ", _GLUE), glued)
        glued = _PAIR.sub(lambda m: m.group(0).replace(" ", _GLUE), glued)
        lines = textwrap.wrap(
            glued,
            width=max(width, 60),
            initial_indent=first,
            subsequent_indent=rest,
            break_long_words=False,
            break_on_hyphens=False,
        ) or [first.rstrip()]
        return [line.replace(_GLUE, " ") for line in lines]

    doc = to_document(findings, generated_at)
    counts = doc["counts"]
    overall = worst(list(findings))
    pad = " " * 15  # under the text after "  STATUS  #NN  "
    lines = [
        paint(f"Pool doctor: {overall.label.upper()}", _BOLD + _COLOURS[overall])
        + f"  {counts['fail']} fail, {counts['warn']} warn, {counts['unknown']} unknown, {counts['ok']} ok"
        + paint(f"  ({doc['generated_at'].replace('T', ' ').replace('+00:00', ' UTC')})", _DIM),
        "",
    ]
    for target, kind, items in _by_target(findings):
        status = worst(items)
        heading = _heading(target, kind)
        label = status.label.upper()
        dots = "." * max(3, width - len(heading) - len(label) - 2)
        lines.append(paint(f"{heading} {dots} {label}", _BOLD + _COLOURS[status]))
        for finding in _severity_first(items):
            badge = paint(f"{finding.status.label.upper():<7}", _COLOURS[finding.status])
            number = f"#{finding.item}" if finding.item else ""
            prefix = f"  {badge} {number:<4} "
            plain_prefix = f"  {finding.status.label.upper():<7} {number:<4} "
            if finding.status is Status.OK:
                wrapped = wrap(f"{finding.title}: {finding.summary}", plain_prefix, pad)
                lines.append(prefix + wrapped[0][len(plain_prefix) :])
                lines.extend(wrapped[1:])
                continue
            lines.append(prefix + paint(finding.title, _BOLD))
            lines.extend(wrap(finding.summary, pad, pad))
            if finding.evidence:
                seen = wrap(evidence_text(finding.evidence), pad + "seen: ", pad + "      ")
                lines.extend(paint(line, _DIM) for line in seen)
            if finding.recommendation:
                lines.extend(wrap(finding.recommendation, pad + "fix:  ", pad + "      "))
        lines.append("")
    if not findings:
        lines += ["No verdicts: nothing was evaluated.", ""]
    lines.append("Verdicts:")
    lines.extend(f"  {status.upper():<7} {meaning}" for status, meaning in LEGEND)
    lines.append(
        "Evidence of every check: poolwatch doctor --format json, or /checklist on the running daemon."
    )
    return "\n".join(lines) + "\n"


_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:72rem;padding:0 1rem;color:#1b1f24;
line-height:1.4}
h1{font-size:1.5rem} h2{font-size:1.2rem;margin-top:2.2rem}
table{border-collapse:collapse;width:100%;table-layout:fixed}
th:nth-child(1){width:6.5rem} th:nth-child(2){width:3rem} th:nth-child(3){width:13rem}
td,th{border-bottom:1px solid #d0d7de;padding:.45rem;vertical-align:top;text-align:left}
th{font-size:.85rem;color:#57606a}
.badge{display:inline-block;min-width:5.5rem;text-align:center;border-radius:.3rem;padding:.1rem .4rem;
font-weight:600;color:#fff}
.ok{background:#1a7f37}.warn{background:#9a6700}.fail{background:#cf222e}.unknown{background:#57606a}
.item{color:#57606a;font-size:.85rem;white-space:nowrap}
.summary{margin:0 0 .3rem}
dl.evidence{display:grid;grid-template-columns:max-content 1fr;gap:.1rem .8rem;margin:.3rem 0;
font-family:ui-monospace,monospace;font-size:.82rem;color:#424a53}
dl.evidence dt{font-weight:600} dl.evidence dd{margin:0;overflow-wrap:anywhere}
.fix{margin:.3rem 0;padding:.3rem .5rem;background:#fff8c5;border-left:3px solid #9a6700}
.rule{font-size:.8rem;color:#57606a}
ul.problems li{margin:.25rem 0}
.legend{font-size:.9rem;color:#424a53}
"""


def _anchor(target: str, kind: str, check: str | None = None) -> str:
    base = f"{kind}-{target}"
    return f"{base}-{check}" if check else base


def _evidence_html(evidence: dict[str, Any]) -> str:
    if not evidence:
        return ""
    esc = html.escape
    rows = "".join(f"<dt>{esc(str(k))}</dt><dd>{esc(_text(v))}</dd>" for k, v in evidence.items())
    return f"<dl class='evidence'>{rows}</dl>"


def to_html(findings: Sequence[Finding], generated_at: float | None = None) -> str:
    """A self-contained page: inline CSS, no script; statuses are words, not only colours."""
    doc = to_document(findings, generated_at)
    counts = doc["counts"]
    esc = html.escape
    overall = esc(doc["overall"])
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>poolwatch checklist: {overall.upper()}</title><style>{_CSS}</style></head><body>",
        f"<h1>Pool doctor: <span class='badge {overall}' id='overall'>{overall.upper()}</span></h1>",
        f"<p id='counts'>{counts['fail']} fail, {counts['warn']} warn, {counts['unknown']} unknown, "
        f"{counts['ok']} ok &middot; generated {esc(doc['generated_at'])} &middot; "
        "<a href='checklist?format=json'>JSON</a></p>",
    ]
    problems = [
        (group, finding)
        for group in doc["targets"]
        for finding in group["findings"]
        if finding["status"] != "ok"
    ]
    problems.sort(key=lambda gf: {"fail": 0, "warn": 1, "unknown": 2}[gf[1]["status"]])
    if problems:
        parts.append("<h2 id='problems'>Needs attention</h2><ul class='problems'>")
        for group, finding in problems:
            status = esc(finding["status"])
            link = esc(_anchor(group["target"], group["kind"], finding["check"]))
            parts.append(
                f"<li><span class='badge {status}'>{status.upper()}</span> "
                f"<a href='#{link}'>{esc(_heading(group['target'], group['kind']))}: "
                f"{esc(finding['title'])}</a> &mdash; {esc(finding['summary'])}</li>"
            )
        parts.append("</ul>")
    elif doc["targets"]:
        parts.append("<p id='problems'>Every check passes.</p>")
    for group in doc["targets"]:
        heading = esc(_heading(group["target"], group["kind"]))
        status = esc(group["status"])
        parts.append(
            f"<h2 id='{esc(_anchor(group['target'], group['kind']))}'>{heading} "
            f"<span class='badge {status}'>{status.upper()}</span></h2>"
        )
        parts.append(
            "<table><thead><tr><th>Status</th><th>Item</th><th>Check</th><th>Finding</th></tr></thead><tbody>"
        )
        for finding in group["findings"]:
            fstatus = esc(finding["status"])
            fix = finding["recommendation"]
            parts.append(
                f"<tr class='finding' id='{esc(_anchor(group['target'], group['kind'], finding['check']))}' "
                f"data-check='{esc(finding['check'])}' data-status='{fstatus}'>"
                f"<td><span class='badge {fstatus}'>{fstatus.upper()}</span></td>"
                f"<td class='item'>{'#' + str(finding['item']) if finding['item'] else ''}</td>"
                f"<td>{esc(finding['title'])}</td>"
                f"<td><p class='summary'>{esc(finding['summary'])}</p>"
                + _evidence_html(finding["evidence"])
                + (f"<p class='fix'><strong>Fix:</strong> {esc(fix)}</p>" if fix else "")
                + (f"<p class='rule'>Rule: {esc(finding['reference'])}</p>" if finding["reference"] else "")
                + "</td></tr>"
            )
        parts.append("</tbody></table>")
    if not doc["targets"]:
        parts.append("<p>No verdicts yet: the first collection has not finished.</p>")
    parts.append("<h2 id='legend'>Verdicts</h2><ul class='legend'>")
    parts.extend(
        f"<li><span class='badge {status}'>{status.upper()}</span> {esc(meaning)}</li>"
        for status, meaning in LEGEND
    )
    parts.append("</ul></body></html>")
    return "".join(parts)
