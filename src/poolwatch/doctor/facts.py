"""What the doctor reads: plain facts per target, independent of the driver-level observations.

Keeping the checks on these small types (instead of the sources' observation classes) makes each
check a pure function that a test can feed by hand, and confines the mapping from SHOW columns
and catalog rows to one adapter (``poolwatch.doctor.adapt``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any


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
    statement_timeout: float | None = None  # seconds, server default; 0 = unset
    idle_in_transaction_timeout: float | None = None
    #: (database or "", role or "", setting name, value in seconds) from pg_db_role_setting
    role_settings: list[tuple[str, str, str, float]] = field(default_factory=list)
    activity: list[ActivityRow] = field(default_factory=list)
    activity_readable: bool = True  # False when the role lacks pg_monitor
    #: client backends: (client_addr or "local", client_port or -1, application_name)
    backends: list[tuple[str, int, str]] = field(default_factory=list)
    client_backends: int | None = None
    sessions: float | None = None  # pg_stat_database sessions, all databases (PG14+)
    sessions_abandoned: float | None = None
    xacts: float | None = None  # commits + rollbacks, all databases

    @property
    def usable_connections(self) -> int | None:
        if self.max_connections is None:
            return None
        return self.max_connections - self.superuser_reserved - self.reserved


@dataclass
class PgBouncerFacts:
    target: str
    up: bool
    collected_at: float
    host: str = ""
    port: int = 0
    down_detail: str | None = None
    version: tuple[int, int, int] | None = None
    config: dict[str, str] = field(default_factory=dict)  # SHOW CONFIG, raw text values
    config_readable: bool = True
    databases: list[dict[str, Any]] = field(default_factory=list)
    pools: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, float] = field(default_factory=dict)  # SHOW STATS totals summed over databases
    #: (local_addr, local_port) of PgBouncer's server connections, to tell pooled backends apart
    server_endpoints: set[tuple[str, int]] = field(default_factory=set)

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
    #: configured probe databases per pgbouncer target ("auto" resolved); postgres probe enabled
    probes_configured: dict[str, bool] = field(default_factory=dict)
    history: dict[str, deque[Any]] = field(default_factory=dict)

    def postgres_named(self, name: str | None) -> PostgresFacts | None:
        return next((p for p in self.postgres if p.target == name), None)

    def past(self, target: str) -> list[Any]:
        return list(self.history.get(target, ()))
