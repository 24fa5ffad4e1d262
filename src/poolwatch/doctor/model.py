"""Verdicts: what a check found, why (the observed values) and what to change."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any


class Status(IntEnum):
    """Also the value of ``poolwatch_check_status``: alert on ``== 2`` (fail) or ``>= 1``."""

    UNKNOWN = -1
    OK = 0
    WARN = 1
    FAIL = 2

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Finding:
    """One check's verdict for one target."""

    check: str  # stable id, e.g. "recycling"; also the `check` label
    title: str  # the checklist item in words
    target: str  # the `target` label (a PgBouncer or PostgreSQL name, or "poolwatch")
    status: Status
    summary: str  # one sentence: the verdict and the observed value behind it
    evidence: dict[str, Any] = field(default_factory=dict)  # observed values, named
    recommendation: str | None = None  # what to change; None when ok
    reference: str = ""  # where the rule and its threshold come from
    value: float | None = None  # the number behind the verdict, exported as poolwatch_check_value
    kind: str = ""  # "pgbouncer", "postgres" or "poolwatch": a PgBouncer and a PostgreSQL may share a name
    item: int = 0  # the checklist item (1-11) this check belongs to

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.label
        order = ("check", "item", "title", "target", "kind", "status", "summary", "evidence")
        return {**{key: data.pop(key) for key in order}, **data}


SEVERITY = {Status.OK: 0, Status.UNKNOWN: 1, Status.WARN: 2, Status.FAIL: 3}


def worst(findings: list[Finding]) -> Status:
    """FAIL beats WARN beats UNKNOWN beats OK: an unknown is never reported as fine, and no
    findings at all (nothing evaluated yet) is unknown too."""
    return max((f.status for f in findings), key=lambda s: SEVERITY[s], default=Status.UNKNOWN)
