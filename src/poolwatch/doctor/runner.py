"""The doctor at run time: turns each collection into facts, keeps a short history, evaluates.

It runs inside the engine right after the sources answered, so ``poolwatch_check_status`` in a
scrape always matches the data of the same scrape.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from prometheus_client.metrics_core import Metric

from poolwatch.config import Config
from poolwatch.doctor.adapt import pgbouncer_facts, postgres_facts, probe_facts
from poolwatch.doctor.checks import evaluate
from poolwatch.doctor.facts import Facts, PgBouncerFacts, PostgresFacts
from poolwatch.doctor.model import SEVERITY, Finding
from poolwatch.metrics import SourceResult, gauge
from poolwatch.probes import ProbeState

HISTORY_SAMPLES = 64


class DoctorRunner:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.findings: list[Finding] = []
        self.evaluated_at: float | None = None
        self._history: dict[str, deque[PgBouncerFacts | PostgresFacts]] = {}
        #: per PgBouncer target: the checks' results carried from one collection to the next
        #: (``PgBouncerFacts.memo``)
        self._memo: dict[str, dict[str, tuple[Any, Any]]] = {}

    def observe(self, results: Iterable[SourceResult], probes: Iterable[ProbeState]) -> list[Finding]:
        facts = Facts()
        by_name = {t.name: t for t in self.config.pgbouncers}
        for result in results:
            if result.kind == "pgbouncer":
                target = by_name.get(result.target)
                params = target.connection_params(6432, "pgbouncer") if target else {}
                bouncer = pgbouncer_facts(result, params.get("host", ""), int(params.get("port", "0") or 0))
                bouncer.memo = self._memo.setdefault(_key(bouncer), {})
                facts.pgbouncers.append(bouncer)
            elif result.kind == "postgres":
                facts.postgres.append(postgres_facts(result))
        facts.probes = [probe_facts(p) for p in probes]
        for pgb in self.config.pgbouncers:
            behind = self.config.postgres_behind(pgb)
            if behind is not None:
                facts.links[pgb.name] = behind.name
            facts.probes_configured[pgb.name] = pgb.probe.databases != []
        for pg in self.config.postgres:
            facts.probes_configured[pg.name] = pg.probe
        window = max(
            t.history_window for t in [self.config.doctor.defaults, *self.config.doctor.targets.values()]
        )
        now = time.time()
        observed: list[PgBouncerFacts | PostgresFacts] = [*facts.pgbouncers, *facts.postgres]
        for current in observed:
            past = self._history.setdefault(_key(current), deque(maxlen=HISTORY_SAMPLES))
            while past and now - past[0].collected_at > window:
                past.popleft()
            # read before the current sample joins it; a PgBouncer and a PostgreSQL target may share
            # a name, the checks pick their own kind (Facts.past_postgres / past_pgbouncer)
            facts.history.setdefault(current.target, deque()).extend(past)
        self.findings = evaluate(facts, self.config.doctor.thresholds)
        for current in observed:
            if current.up:
                self._history[_key(current)].append(_for_history(current))
        self.evaluated_at = now
        return self.findings

    def families(self) -> list[Metric]:
        status = gauge(
            "poolwatch_check_status",
            "Pool doctor verdict per check: 0 ok, 1 warn, 2 fail, -1 unknown",
            ("target", "check"),
        )
        value = gauge(
            "poolwatch_check_value",
            "The observed value behind the pool doctor's verdict (see /checklist for its meaning)",
            ("target", "check"),
        )
        # a PgBouncer and a PostgreSQL target of the same name would give two series with one label
        # set: the worse verdict is exported (the JSON tells them apart by `kind`)
        chosen: dict[tuple[str, str], Finding] = {}
        for finding in self.findings:
            key = (finding.target, finding.check)
            if key not in chosen or SEVERITY[finding.status] > SEVERITY[chosen[key].status]:
                chosen[key] = finding
        for key, finding in chosen.items():
            status.add(key, int(finding.status))
            value.add(key, finding.value)
        return [b.build() for b in (status, value) if len(b)]


def _key(facts: PgBouncerFacts | PostgresFacts) -> str:
    return ("pgbouncer/" if isinstance(facts, PgBouncerFacts) else "postgres/") + facts.target


def _for_history(current: PgBouncerFacts | PostgresFacts) -> PgBouncerFacts | PostgresFacts:
    """What rates and trends read from past samples, without the per-pool and per-backend rows.

    At 10,000 pools a full sample is megabytes; 64 of them were most of poolwatch's memory.
    """
    if isinstance(current, PgBouncerFacts):
        return replace(current, pools=[], databases=[], server_endpoints=set())
    kept = replace(current, backends=[])
    # the growth check reads a sample's connections per application again at each of the next
    # collections: hand over what it already computed (the activity rows are the same)
    by_application = current.__dict__.get("_by_application")
    if by_application is not None:
        kept.__dict__["_by_application"] = by_application
    return kept
