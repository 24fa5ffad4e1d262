"""What the doctor reads: plain facts per target, independent of the driver-level observations.

Keeping the checks on these small types (instead of the sources' observation classes) makes each
check a pure function that a test can feed by hand, and confines the mapping from SHOW columns
and catalog rows to one adapter (``poolwatch.doctor.adapt``).

"Not readable" is always kept apart from "empty": a check that cannot see its data says
``unknown`` and why, it never falls back to ``ok``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


def columns(rows: Sequence[Mapping[str, Any]], *names: str) -> list[Sequence[Any]]:
    """The values of ``names`` in ``rows``, one sequence per name (None where a row lacks it).

    A source ``Table`` hands out whole columns (transposed once, in C) instead of one dict per row:
    at 10,000 pools the doctor's row-by-row reading was most of its cost. Plain lists of dicts (the
    tests, hand-made facts) are read row by row, with the same result.
    """
    column = getattr(rows, "column", None)
    if column is not None:
        out: list[Sequence[Any]] = []
        for name in names:
            values = column(name)
            out.append(values if values is not None else (None,) * len(rows))
        return out
    return [[row.get(name) for row in rows] for name in names]


@dataclass
class ActivityRow:
    datname: str
    usename: str
    application_name: str
    state: str
    count: int
    oldest_xact_age: float | None = None
    max_state_age: float | None = None
    oldest_backend_age: float | None = None


@dataclass
class PostgresFacts:
    target: str
    up: bool
    collected_at: float
    down_detail: str | None = None
    version_num: int | None = None
    max_connections: int | None = None
    superuser_reserved: int = 0
    reserved: int = 0
    #: server default in seconds; 0 = unset; None = unknown (also when an ALTER ROLE/DATABASE ... SET
    #: on poolwatch's own role or database hides the server-wide value)
    statement_timeout: float | None = None
    idle_in_transaction_timeout: float | None = None
    #: (database or "", role or "", setting name, value in seconds) from pg_db_role_setting
    role_settings: list[tuple[str, str, str, float]] = field(default_factory=list)
    role_settings_readable: bool = True
    activity: list[ActivityRow] = field(default_factory=list)
    activity_readable: bool = True  # False when the role lacks pg_monitor (or the query failed)
    #: client backends: (client_addr or "local", client_port or -1, application_name)
    backends: list[tuple[str, int, str]] = field(default_factory=list)
    backends_readable: bool = True
    client_backends: int | None = None
    sessions: float | None = None  # pg_stat_database sessions, all databases (PG14+)
    sessions_abandoned: float | None = None
    xacts: float | None = None  # commits + rollbacks, all databases
    #: the role poolwatch is connected as (named in "grant pg_monitor to ..." advice)
    role: str | None = None

    @property
    def usable_connections(self) -> int | None:
        if self.max_connections is None:
            return None
        return self.max_connections - self.superuser_reserved - self.reserved

    def connections_by_application(self) -> dict[str, int]:
        # asked once per application per past sample by the growth check: computed once (the
        # activity rows of a collection never change afterwards)
        cached: dict[str, int] | None = self.__dict__.get("_by_application")
        if cached is None:
            cached = {}
            for row in self.activity:
                cached[row.application_name] = cached.get(row.application_name, 0) + row.count
            self.__dict__["_by_application"] = cached
        return cached


@dataclass
class PgBouncerFacts:
    target: str
    up: bool
    collected_at: float
    host: str = ""
    port: int = 0
    down_detail: str | None = None
    version: tuple[int, int, int] | None = None
    #: SHOW CONFIG exactly as printed (1.25's ``<empty>`` kept apart from ``""``)
    config: dict[str, str] = field(default_factory=dict)
    config_readable: bool = True
    #: SHOW DATABASES / SHOW POOLS rows: the source's ``Table`` (read with ``columns``) or dicts
    databases: Sequence[Mapping[str, Any]] = field(default_factory=list)
    pools: Sequence[Mapping[str, Any]] = field(default_factory=list)
    totals: dict[str, float] = field(default_factory=dict)  # SHOW STATS totals summed over databases
    #: (local_addr, local_port) of PgBouncer's server connections, to tell pooled backends apart
    server_endpoints: set[tuple[str, int]] = field(default_factory=set)
    servers_readable: bool = True  # SHOW SERVERS answered
    #: SHOW LISTS ``peers`` (1.21+): entries in the [peers] section; None when not reported
    peers: int | None = None
    #: results derived from the rows and computed once per collection (``checks.max_server_connections``);
    #: not an init field, so ``dataclasses.replace`` starts a fresh one
    derived: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    #: name → (inputs, result) of derived results, kept by the ``DoctorRunner`` from one collection
    #: of this PgBouncer to the next (``checks._carried``): a result is reused while its inputs are
    #: equal. Fresh (empty) on hand-made facts and on history samples.
    memo: dict[str, tuple[Any, Any]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def setting(self, key: str) -> str | None:
        return self.config.get(key)

    def number(self, key: str) -> float | None:
        value = self.config.get(key)
        if value is None:
            return None
        try:
            return float(value)
        except ValueError:
            return None

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version)) if self.version else "unknown"


@dataclass
class ProbeFacts:
    target: str
    kind: str
    database: str
    success: bool | None
    detail: str | None = None
    last_duration: float | None = None


@dataclass
class Facts:
    """Everything one doctor run looks at, plus history for rates and trends."""

    pgbouncers: list[PgBouncerFacts] = field(default_factory=list)
    postgres: list[PostgresFacts] = field(default_factory=list)
    probes: list[ProbeFacts] = field(default_factory=list)
    #: pgbouncer target → postgres target behind it
    links: dict[str, str] = field(default_factory=dict)
    #: target → whether a SELECT 1 check is configured for it
    probes_configured: dict[str, bool] = field(default_factory=dict)
    history: dict[str, deque[Any]] = field(default_factory=dict)

    def postgres_named(self, name: str | None) -> PostgresFacts | None:
        return next((p for p in self.postgres if p.target == name), None)

    def pgbouncers_in_front_of(self, postgres: str) -> list[PgBouncerFacts]:
        return [b for b in self.pgbouncers if self.links.get(b.target) == postgres]

    def past(self, target: str) -> list[Any]:
        return list(self.history.get(target, ()))

    # a PgBouncer and a PostgreSQL target may share a name: each reads only its own kind's samples
    def past_postgres(self, target: str) -> list[PostgresFacts]:
        return [p for p in self.past(target) if isinstance(p, PostgresFacts)]

    def past_pgbouncer(self, target: str) -> list[PgBouncerFacts]:
        return [p for p in self.past(target) if isinstance(p, PgBouncerFacts)]
