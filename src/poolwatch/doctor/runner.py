"""The doctor at run time: turns each collection into facts, keeps a short history, evaluates.

It runs inside the engine right after the sources answered, so ``poolwatch_check_status`` in a
scrape always matches the data of the same scrape.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from prometheus_client.metrics_core import Metric

from poolwatch.config import Config
from poolwatch.doctor.adapt import pgbouncer_facts, postgres_facts, probe_facts
from poolwatch.doctor.checks import evaluate
from poolwatch.doctor.facts import Facts, PgBouncerFacts, PostgresFacts
from poolwatch.doctor.model import Finding
from poolwatch.metrics import SourceResult, gauge
from poolwatch.probes import ProbeState

HISTORY_SAMPLES = 64


class DoctorRunner:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.findings: list[Finding] = []
        self.evaluated_at: float | None = None
        self._history: dict[str, deque[PgBouncerFacts | PostgresFacts]] = {}

    def observe(self, results: Iterable[SourceResult], probes: Iterable[ProbeState]) -> list[Finding]:
        facts = Facts()
        by_name = {t.name: t for t in self.config.pgbouncers}
        for result in results:
            if result.kind == "pgbouncer":
                target = by_name.get(result.target)
                params = target.connection_params(6432, "pgbouncer") if target else {}
                facts.pgbouncers.append(
                    pgbouncer_facts(result, params.get("host", ""), int(params.get("port", "0") or 0))
                )
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
            past = self._history.setdefault(current.target, deque(maxlen=HISTORY_SAMPLES))
            while past and now - past[0].collected_at > window:
                past.popleft()
            facts.history[current.target] = past  # read before the current sample joins it
        self.findings = evaluate(facts, self.config.doctor.thresholds)
        for current in observed:
            if current.up:
                self._history[current.target].append(current)
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
        for finding in self.findings:
            status.add((finding.target, finding.check), int(finding.status))
            value.add((finding.target, finding.check), finding.value)
        return [b.build() for b in (status, value) if len(b)]
