"""Metric families as plain data: what every source returns and what the server renders.

Sources never touch a registry. They turn rows into ``Metric`` objects (prometheus-client's own
family type) through ``FamilyBuilder``, which refuses duplicate label sets: PgBouncer forks and
some versions return duplicate rows, and Prometheus rejects a whole scrape with a duplicate series.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from prometheus_client.metrics_core import Metric

MetricKind = Literal["gauge", "counter", "info"]

#: The small fixed set of reasons a collection or a check can fail for. Keeping it closed keeps
#: ``poolwatch_errors_total{reason}`` low-cardinality and alertable.
ErrorReason = Literal["connect", "auth", "timeout", "query", "privilege", "config"]
ERROR_REASONS: tuple[ErrorReason, ...] = ("connect", "auth", "timeout", "query", "privilege", "config")


def as_float(value: object) -> float | None:
    """Numbers as the console and asyncpg hand them over (int, Decimal, str, bool, None)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if not math.isnan(number) else None


def label_text(value: object) -> str:
    """A label value: NULL becomes the empty string, everything else its text form."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class FamilyBuilder:
    """Collects samples for one family; the first sample of a label set wins, later ones are counted."""

    __slots__ = ("_samples", "documentation", "duplicates", "kind", "labelnames", "name", "unit")

    def __init__(
        self,
        name: str,
        documentation: str,
        kind: MetricKind,
        labelnames: Sequence[str] = (),
        unit: str = "",
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.kind: MetricKind = kind
        self.labelnames = tuple(labelnames)
        self.unit = unit
        self._samples: dict[tuple[str, ...], float] = {}
        self.duplicates = 0

    def add(self, labelvalues: Sequence[object], value: object) -> None:
        number = as_float(value)
        if number is None:
            return
        key = tuple(label_text(v) for v in labelvalues)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(key)} label values for {len(self.labelnames)} labels")
        if key in self._samples:
            self.duplicates += 1
            return
        self._samples[key] = number

    def add_prepared(self, key: tuple[str, ...], number: float) -> None:
        """``add`` for hot loops whose caller already has str label values and a non-NaN float.

        Skips the per-sample conversions of ``add`` (a SHOW POOLS of 10,000 rows makes 120,000
        samples); duplicates are still refused the same way.
        """
        if key in self._samples:
            self.duplicates += 1
            return
        self._samples[key] = number

    def __len__(self) -> int:
        return len(self._samples)

    def build(self) -> Metric:
        typ = {"gauge": "gauge", "counter": "counter", "info": "info"}[self.kind]
        family = Metric(self.name, self.documentation, typ, self.unit)
        suffix = {"gauge": "", "counter": "_total", "info": "_info"}[self.kind]
        sample_name = self.name + suffix
        names = self.labelnames
        for key, value in self._samples.items():
            family.add_sample(sample_name, dict(zip(names, key, strict=True)), value)
        return family


def gauge(name: str, documentation: str, labelnames: Sequence[str] = ()) -> FamilyBuilder:
    return FamilyBuilder(name, documentation, "gauge", labelnames)


def counter(name: str, documentation: str, labelnames: Sequence[str] = ()) -> FamilyBuilder:
    """``name`` without ``_total``: prometheus-client appends it to the sample."""
    if name.endswith("_total"):
        name = name[: -len("_total")]
    return FamilyBuilder(name, documentation, "counter", labelnames)


def build_all(builders: Iterable[FamilyBuilder], *, keep_empty: bool = False) -> list[Metric]:
    return [b.build() for b in builders if keep_empty or len(b)]


@dataclass(slots=True)
class CollectorOutcome:
    """How one query of one source went: feeds ``poolwatch_collector_success{target,collector}``."""

    collector: str
    ok: bool
    seconds: float = 0.0
    reason: ErrorReason | None = None
    #: a human explanation, safe to show: never a password, never a raw DSN
    detail: str | None = None


@dataclass(slots=True)
class SourceResult:
    """What one collection of one target produced."""

    target: str
    kind: str
    up: bool
    families: list[Metric] = field(default_factory=list)
    outcomes: list[CollectorOutcome] = field(default_factory=list)
    reason: ErrorReason | None = None
    detail: str | None = None
    seconds: float = 0.0
    #: the typed observation the doctor reads (PgBouncerObservation, PostgresObservation), or None
    observation: object | None = None
