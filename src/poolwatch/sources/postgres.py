"""PostgreSQL source: what the server itself says about its connections.

PgBouncer only knows the connections that go through it. This source asks PostgreSQL directly, so
it also sees the ones that bypass the pooler, how close the server is to ``max_connections``, how
old the oldest transactions are, and (PostgreSQL 14+) how sessions end.

Layout, in the order data flows:

* SQL: one query per concern, every one aggregated server-side with ``GROUP BY`` so a server with a
  thousand backends returns tens of rows, not a thousand.
* Pure functions: ``build_observation`` turns query rows into a typed ``PostgresObservation`` (what
  the pool doctor reads); ``observation_families`` turns that into metric families. No I/O, so the
  tests feed them hand-built rows and check exact values.
* ``PostgresSource``: the asyncpg I/O shell. Each query is its own collector with its own
  ``CollectorOutcome``; ``pg_up`` is 1 when poolwatch is connected and the core activity query
  answered, so a missing privilege or a failing side query never turns into "database down"
  (field notes b11: up-metrics that lie).

Decisions worth knowing:

* Only ``backend_type = 'client backend'`` rows count. Background workers, autovacuum and WAL
  senders have their own slot pools and do not use ``max_connections``.
* poolwatch's own connection is *kept* in every count: it really occupies a slot. It is always
  identifiable by ``application_name = 'poolwatch'`` (the pool forces that name).
* A role without ``pg_read_all_stats`` (granted by ``pg_monitor``) sees other roles' sessions with
  NULL state, timestamps, client address and even ``backend_type``. Counting those would silently
  undercount, so the activity, wait-event and client collectors fail with reason ``privilege`` and
  say which GRANT fixes it; nothing derived from those columns is exported then. ``pg_up`` stays 1.
* Absent is not zero: a column the server version does not have (session counters before 14) is
  ``None`` in the observation and simply not exported. ``reserved_connections`` before 16 is a
  real 0 (no such reservation exists there).
* ``application_name`` is chosen by clients. The metrics keep the ``MAX_APPLICATION_NAMES`` busiest
  names and fold the rest into ``application_name="__other__"`` (sums and maxima preserved); the
  observation keeps every name. Label values are exported verbatim (prometheus-client escapes
  quotes, backslashes and newlines), NULL becomes "". Every other activity family is bounded by
  the number of client backends (each label set has at least one), so by ``max_connections``.

Names follow postgres_exporter where it exports the same thing, so its dashboards and alert rules
keep working: ``pg_up``, ``pg_stat_activity_count{datname,state}`` (its long-standing label set;
restricted to client backends, zero-filled per state like its query),
``pg_stat_activity_max_tx_duration`` (seconds, 0 when no transaction is open),
``pg_settings_<name>`` with millisecond settings as ``_seconds``, ``pg_stat_database_numbackends``
and ``pg_stat_database_active_time_seconds_total``. One deliberate difference: postgres_exporter's
Go client exposes counters such as ``pg_stat_database_xact_commit`` without ``_total``;
prometheus-client always appends it, so here they are ``pg_stat_database_xact_commit_total``.
``target`` is the first label of every family (postgres_exporter has no such label; it relies on
the scrape's ``instance``). No ``datid`` label: it changes when a database is re-created.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import socket
import ssl
import time
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any, Final
from urllib.parse import parse_qs, quote, unquote, urlsplit

import asyncpg
import psycopg.conninfo
from prometheus_client.metrics_core import Metric

from poolwatch.metrics import (
    CollectorOutcome,
    ColumnarFamily,
    ErrorReason,
    FamilyBuilder,
    LabelTable,
    SourceResult,
    as_float,
    counter,
    gauge,
)

__all__ = [
    "ACTIVITY_STATES",
    "COLLECTORS",
    "MAX_APPLICATION_NAMES",
    "OTHER_APPLICATION",
    "POOLWATCH_APPLICATION_NAME",
    "ActivityGroup",
    "ClientCount",
    "DatabaseStats",
    "PostgresObservation",
    "PostgresSource",
    "SettingOverride",
    "WaitEventCount",
    "asyncpg_dsn",
    "build_observation",
    "classify_connect_error",
    "classify_query_error",
    "describe_dsn",
    "observation_families",
    "parse_duration_seconds",
    "privilege_detail",
    "scrub",
    "up_family",
]

Row = Mapping[str, Any]

#: Forced on every poolwatch connection so its own sessions are recognisable in pg_stat_activity.
POOLWATCH_APPLICATION_NAME: Final = "poolwatch"

#: Metric label cap for ``application_name`` (per scrape, busiest first); see the module docstring.
MAX_APPLICATION_NAMES: Final = 50
OTHER_APPLICATION: Final = "__other__"

#: The states postgres_exporter zero-fills per database, so ``pg_stat_activity_count{state=...}``
#: exists (as 0) before the first such session appears and alerts need no ``absent()``.
ACTIVITY_STATES: Final = (
    "active",
    "idle",
    "idle in transaction",
    "idle in transaction (aborted)",
    "fastpath function call",
    "disabled",
)

#: Timeout settings reported as server defaults and as per-role/database overrides.
TIMEOUT_SETTINGS: Final = ("statement_timeout", "idle_in_transaction_session_timeout")

# Collector names, i.e. the ``collector`` label of poolwatch_collector_success. Activity runs first:
# it decides pg_up, so it must not be starved of the time budget by the others.
ACTIVITY: Final = "activity"
SETTINGS: Final = "settings"
WAIT_EVENTS: Final = "wait_events"
CLIENTS: Final = "clients"
DATABASE: Final = "database"
ROLE_SETTINGS: Final = "role_settings"
COLLECTORS: Final = (ACTIVITY, SETTINGS, WAIT_EVENTS, CLIENTS, DATABASE, ROLE_SETTINGS)

PG14: Final = 140000  # pg_stat_database session counters
PG16: Final = 160000  # reserved_connections

# --------------------------------------------------------------------------------------------------
# SQL. Every pg_stat_activity query returns the privilege flag as a constant column: our own session
# is always a client backend, so each of them returns at least one row to carry it. Ages are
# computed from clock_timestamp() *after* aggregation (so after the activity snapshot was taken)
# rather than now(), which is the start of our own statement and can predate a peer's state change.
# --------------------------------------------------------------------------------------------------

_CAN_READ_ALL_STATS = "pg_catalog.pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')"

# One scan of pg_stat_activity for three collectors (activity, wait_events, clients): GROUPING SETS
# aggregate the same client backends by (database, role, application_name, state), by (database,
# wait_event_type) and by (client_addr, application_name); ``collector`` says which set a row belongs
# to (GROUPING() = 0: grouped by that column; a NULL of a grouped column stays a real NULL).
# Reading the backends is most of the cost, so one scan instead of three. The view pg_stat_activity
# is pg_stat_get_activity() joined with pg_database and pg_authid once per backend (a nested loop:
# the planner expects one row from the function); here the function is aggregated by database and
# role OID first and the names are joined to the few hundred groups, which makes the query about a
# third cheaper at 1,000 backends. Same groups: a name belongs to one OID, and the rare OIDs without
# a name (a role dropped while its sessions live on) are merged in Python (``_merge_unnamed``).
# Every row carries every column, the unused ones NULL; the client ports only on the clients rows.
_ACTIVITY_CTE: Final = """
activity_groups AS (
    SELECT
        GROUPING(usesysid) AS by_role,
        GROUPING(wait_event_type) AS by_wait,
        datid,
        usesysid,
        application_name,
        state,
        wait_event_type,
        client_addr,
        count(*) AS connections,
        min(xact_start) AS xact_start,
        min(state_change) AS state_change,
        min(backend_start) AS backend_start,
        CASE WHEN GROUPING(client_addr) = 0 THEN
            array_agg(client_port) FILTER (WHERE client_port > 0)
        END AS client_ports
    FROM pg_catalog.pg_stat_get_activity(NULL)
    WHERE backend_type = 'client backend'
    GROUP BY GROUPING SETS (
        (datid, usesysid, application_name, state),
        (datid, wait_event_type),
        (client_addr, application_name)
    )
)"""

#: the columns of every row of COLLECTION_SQL (name, type), in order; PG_STAT_ACTIVITY_SQL returns
#: the first 14 of them
_COLUMNS: Final = (
    ("collector", "text"),
    # activity, wait_events, clients
    ("datname", "text"),
    ("usename", "text"),
    ("application_name", "text"),
    ("state", "text"),
    ("wait_event_type", "text"),
    ("client_addr", "text"),
    ("connections", "int8"),
    ("oldest_xact_age_seconds", "float8"),
    ("max_state_age_seconds", "float8"),
    ("oldest_backend_age_seconds", "float8"),
    ("client_ports", "int4[]"),
    ("can_read_all_stats", "bool"),
    ("role_name", "text"),
    # settings (and role_name)
    ("name", "text"),
    ("unit", "text"),
    ("reset_val", "text"),
    ("database_name", "text"),
    ("conf_load_time", "timestamptz"),
    # database (and datname)
    ("numbackends", "int8"),
    ("xact_commit", "int8"),
    ("xact_rollback", "int8"),
    ("sessions", "int8"),
    ("sessions_abandoned", "int8"),
    ("sessions_fatal", "int8"),
    ("sessions_killed", "int8"),
    ("session_time", "float8"),
    ("active_time", "float8"),
    ("idle_in_transaction_time", "float8"),
    # role_settings (and datname, name)
    ("rolname", "text"),
    ("value", "text"),
)
_ACTIVITY_COLUMNS: Final = 14


def _select(values: Mapping[str, str], width: int = len(_COLUMNS)) -> str:
    """A SELECT list of the first ``width`` columns of ``_COLUMNS``: ``values`` or NULL, each cast
    to the column's type so every branch of the UNION has the same row type."""
    return ",\n    ".join(f"({values.get(name, 'NULL')})::{typ} AS {name}" for name, typ in _COLUMNS[:width])


_ACTIVITY_VALUES: Final = {
    "collector": "CASE WHEN g.by_role = 0 THEN 'activity' WHEN g.by_wait = 0 THEN 'wait_events' "
    "ELSE 'clients' END",
    "datname": "d.datname",
    "usename": "r.rolname",
    "application_name": "g.application_name",
    "state": "g.state",
    "wait_event_type": "g.wait_event_type",
    "client_addr": "pg_catalog.host(g.client_addr)",
    "connections": "g.connections",
    "oldest_xact_age_seconds": "extract(epoch FROM clock_timestamp() - g.xact_start)",
    "max_state_age_seconds": "extract(epoch FROM clock_timestamp() - g.state_change)",
    "oldest_backend_age_seconds": "extract(epoch FROM clock_timestamp() - g.backend_start)",
    "client_ports": "g.client_ports",
    # a scalar subquery: evaluated once, not once per group
    "can_read_all_stats": f"SELECT {_CAN_READ_ALL_STATS}",
    "role_name": "current_user",
}
_ACTIVITY_FROM: Final = """
FROM activity_groups g
LEFT JOIN pg_catalog.pg_database d ON d.oid = g.datid
LEFT JOIN pg_catalog.pg_roles r ON r.oid = g.usesysid"""

PG_STAT_ACTIVITY_SQL: Final = (
    f"WITH {_ACTIVITY_CTE}\nSELECT\n    {_select(_ACTIVITY_VALUES, _ACTIVITY_COLUMNS)}{_ACTIVITY_FROM}\n"
)

#: the collectors whose rows PG_STAT_ACTIVITY_SQL returns, by its ``collector`` column
PG_STAT_ACTIVITY_COLLECTORS: Final = (ACTIVITY, WAIT_EVENTS, CLIENTS)

#: (name columns, the label columns that identify a group) per grouping set with joined names
_NAMED_GROUPS: Final = {
    ACTIVITY: (("datname", "usename"), ("datname", "usename", "application_name", "state")),
    WAIT_EVENTS: (("datname",), ("datname", "wait_event_type")),
}
_AGES: Final = ("oldest_xact_age_seconds", "max_state_age_seconds", "oldest_backend_age_seconds")


def split_pg_stat_activity(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """PG_STAT_ACTIVITY_SQL's (or COLLECTION_SQL's) rows → rows per collector."""
    parts: dict[str, list[Row]] = {name: [] for name in PG_STAT_ACTIVITY_COLLECTORS}
    for row in rows:
        parts.setdefault(row["collector"], []).append(row)
    for collector, (names, key) in _NAMED_GROUPS.items():
        parts[collector] = _merge_unnamed(parts[collector], names, key)
    return parts


def _merge_unnamed(rows: list[Row], names: Sequence[str], key: Sequence[str]) -> list[Row]:
    """Groups whose database or role OID has no name any more (a role dropped while its sessions
    live on) all have a NULL name: merge those that now share their label values, as grouping by
    name (pg_stat_activity's columns) would have. Nothing to do, and no cost, without a NULL name."""
    if not any(None in map(itemgetter(name), rows) for name in names):
        return rows
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        label = tuple(row[k] for k in key)
        into = merged.get(label)
        if into is None:
            merged[label] = dict(row.items())
            continue
        into["connections"] += row["connections"]
        for age in _AGES:
            present = [a for a in (into[age], row[age]) if a is not None]
            into[age] = max(present) if present else None
    return rows if len(merged) == len(rows) else list(merged.values())


# reset_val, not setting: poolwatch SETs its own statement_timeout on its session, which changes
# `setting` but not `reset_val` (what a fresh session of this role/database starts with).
_SETTING_NAMES: Final = (
    "'server_version_num', 'max_connections', 'superuser_reserved_connections',\n"
    "               'reserved_connections', 'statement_timeout', 'idle_in_transaction_session_timeout'"
)
SETTINGS_SQL: Final = f"""
SELECT
    name,
    setting,
    unit,
    reset_val,
    current_user::text AS role_name,
    current_database()::text AS database_name
FROM pg_catalog.pg_settings
WHERE name IN ({_SETTING_NAMES})
"""

# pg_db_role_setting is readable by every role (unlike pg_authid). setdatabase/setrole = 0 means
# "all", which the LEFT JOINs turn into NULL.
ROLE_SETTINGS_SQL: Final = """
SELECT
    d.datname,
    r.rolname,
    split_part(cfg, '=', 1) AS name,
    substr(cfg, strpos(cfg, '=') + 1) AS value
FROM pg_catalog.pg_db_role_setting s
CROSS JOIN LATERAL unnest(s.setconfig) AS cfg
LEFT JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase
LEFT JOIN pg_catalog.pg_roles r ON r.oid = s.setrole
WHERE split_part(cfg, '=', 1) IN ('statement_timeout', 'idle_in_transaction_session_timeout')
ORDER BY 1 NULLS FIRST, 2 NULLS FIRST, 3
"""

_DATABASE_SQL_TEMPLATE = """
SELECT
    datname,
    numbackends,
    xact_commit,
    xact_rollback,
    {sessions}
FROM pg_catalog.pg_stat_database
WHERE datname IS NOT NULL
"""
# The row for shared catalogs (datname NULL, PG12+) is skipped: it has no sessions.
DATABASE_SQL_14: Final = _DATABASE_SQL_TEMPLATE.format(
    sessions="sessions, sessions_abandoned, sessions_fatal, sessions_killed,\n"
    "    session_time, active_time, idle_in_transaction_time"
)
# Same row shape before 14, with NULLs, so "unknown" survives parsing instead of becoming 0.
DATABASE_SQL_PRE14: Final = _DATABASE_SQL_TEMPLATE.format(
    sessions="NULL::int8 AS sessions, NULL::int8 AS sessions_abandoned, NULL::int8 AS sessions_fatal,\n"
    "    NULL::int8 AS sessions_killed, NULL::float8 AS session_time, NULL::float8 AS active_time,\n"
    "    NULL::float8 AS idle_in_transaction_time"
)


def database_sql(server_version_num: int) -> str:
    return DATABASE_SQL_14 if server_version_num >= PG14 else DATABASE_SQL_PRE14


# Every collector in one statement (one round trip instead of four): the activity groups and the
# rows of SETTINGS_SQL, database_sql() and ROLE_SETTINGS_SQL, told apart by ``collector``.
#
# The settings part reads only when they may have changed: $1 is the pg_conf_load_time() of the
# settings this session last returned (NULL: none yet). What it reports (reset_val, units,
# max_connections, the version, the session's role and database) is fixed for a session except
# when the session re-reads the configuration files, and pg_conf_load_time() is then "the time when
# the session itself re-read the configuration files". The condition has no column in it, so
# PostgreSQL evaluates it once, before reading pg_settings (computing every GUC's row was a third
# of this statement's cost at 1,000 backends). PostgresSource keeps the rows per session.
_SETTINGS_VALUES: Final = {
    "collector": "'settings'",
    "name": "name",
    "unit": "unit",
    "reset_val": "reset_val",
    "role_name": "current_user",
    "database_name": "current_database()",
    "conf_load_time": "pg_catalog.pg_conf_load_time()",
}
_DATABASE_VALUES_14: Final = {
    "sessions": "sessions",
    "sessions_abandoned": "sessions_abandoned",
    "sessions_fatal": "sessions_fatal",
    "sessions_killed": "sessions_killed",
    "session_time": "session_time",
    "active_time": "active_time",
    "idle_in_transaction_time": "idle_in_transaction_time",
}


def _collection_sql(session_counters: bool) -> str:
    database_values = {
        "collector": "'database'",
        "datname": "datname",
        "numbackends": "numbackends",
        "xact_commit": "xact_commit",
        "xact_rollback": "xact_rollback",
        # absent before 14: NULL, so "unknown" survives parsing instead of becoming 0
        **(_DATABASE_VALUES_14 if session_counters else {}),
    }
    role_values = {
        "collector": "'role_settings'",
        "datname": "rs.datname",
        "rolname": "rs.rolname",
        "name": "rs.name",
        "value": "rs.value",
    }
    return f"""WITH {_ACTIVITY_CTE}
SELECT
    {_select(_ACTIVITY_VALUES)}{_ACTIVITY_FROM}
UNION ALL
SELECT
    {_select(_SETTINGS_VALUES)}
FROM pg_catalog.pg_settings
WHERE name IN ({_SETTING_NAMES})
  AND pg_catalog.pg_conf_load_time() IS DISTINCT FROM $1::timestamptz
UNION ALL
SELECT
    {_select(database_values)}
FROM pg_catalog.pg_stat_database
WHERE datname IS NOT NULL
UNION ALL
SELECT
    {_select(role_values)}
FROM ({ROLE_SETTINGS_SQL}) rs
"""


COLLECTION_SQL_14: Final = _collection_sql(session_counters=True)
COLLECTION_SQL_PRE14: Final = _collection_sql(session_counters=False)


def collection_sql(server_version_num: int) -> str:
    """The statement that answers every collector, for this server version (see above)."""
    return COLLECTION_SQL_14 if server_version_num >= PG14 else COLLECTION_SQL_PRE14


# --------------------------------------------------------------------------------------------------
# The observation: typed data for the pool doctor. None always means "not known this time".
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SettingOverride:
    """One ``ALTER ROLE/DATABASE ... SET`` entry for a timeout setting (from pg_db_role_setting)."""

    #: None: applies in every database
    database: str | None
    #: None: applies to every role
    role: str | None
    setting: str
    #: None when the stored text is not a duration PostgreSQL would accept; 0 means disabled
    value_seconds: float | None
    #: the value as stored, e.g. ``"5s"`` or ``"60000"`` (milliseconds)
    raw: str

    def applies_to(self, role: str, database: str) -> bool:
        return (self.role is None or self.role == role) and (
            self.database is None or self.database == database
        )


@dataclass(frozen=True, slots=True)
class ActivityGroup:
    """Client backends sharing (datname, usename, application_name, state)."""

    datname: str | None
    usename: str | None
    application_name: str | None
    #: None only for backends still authenticating (PostgreSQL reports no state yet)
    state: str | None
    connections: int
    #: age of the oldest open transaction in the group; None when none has one
    oldest_xact_age_seconds: float | None
    #: longest time any backend of the group has been in its current state
    max_state_age_seconds: float | None
    #: age of the oldest connection of the group
    oldest_backend_age_seconds: float | None


@dataclass(frozen=True, slots=True)
class WaitEventCount:
    datname: str | None
    #: None: not waiting (running on CPU)
    wait_event_type: str | None
    connections: int


@dataclass(frozen=True, slots=True)
class ClientCount:
    #: None: a Unix-domain socket connection
    client_addr: str | None
    application_name: str | None
    connections: int
    #: the backends' client ports: with PgBouncer's SHOW SERVERS local ports they tell pooled
    #: connections from ones that bypass the pooler (same address, different port)
    client_ports: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class DatabaseStats:
    """One pg_stat_database row. Counters are cumulative since the last stats reset."""

    datname: str
    #: all backends in the database, background workers included (pg_stat_database semantics)
    numbackends: int
    xact_commit: int
    xact_rollback: int
    # PostgreSQL 14+; None on older servers (unknown, not zero)
    sessions: int | None = None
    sessions_abandoned: int | None = None
    sessions_fatal: int | None = None
    sessions_killed: int | None = None
    session_time_seconds: float | None = None
    active_time_seconds: float | None = None
    idle_in_transaction_time_seconds: float | None = None


@dataclass(slots=True)
class PostgresObservation:
    """What one collection learned about one PostgreSQL server.

    Every field is None when the collector behind it failed or lacked privileges, so a reader can
    tell "no idle-in-transaction sessions" (an empty list or 0) from "could not see" (None).
    """

    target: str
    collected_at: datetime
    server_version_num: int | None = None
    max_connections: int | None = None
    superuser_reserved_connections: int | None = None
    #: PostgreSQL 16+ (slots for pg_use_reserved_connections); 0 on older servers
    reserved_connections: int | None = None
    #: server default in seconds, 0 = disabled. None when unknown, including when an override on
    #: poolwatch's own role/database masks the server-wide value (see ``setting_overrides``)
    statement_timeout_seconds: float | None = None
    idle_in_transaction_session_timeout_seconds: float | None = None
    setting_overrides: list[SettingOverride] | None = None
    activity: list[ActivityGroup] | None = None
    wait_events: list[WaitEventCount] | None = None
    clients: list[ClientCount] | None = None
    #: client backends, poolwatch's own connection included
    total_client_backends: int | None = None
    #: application_name ("" for none) → age in seconds of its oldest connection
    oldest_backend_age_by_application: dict[str, float] | None = None
    databases: list[DatabaseStats] | None = None
    #: the role poolwatch is connected as, and to which database
    role: str | None = None
    database: str | None = None
    #: whether that role can see every session (superuser or pg_read_all_stats / pg_monitor)
    can_read_all_stats: bool | None = None

    @property
    def session_counters_supported(self) -> bool | None:
        if self.server_version_num is None:
            return None
        return self.server_version_num >= PG14

    @property
    def usable_connections(self) -> int | None:
        """Slots an ordinary role can use: max_connections - superuser_reserved - reserved."""
        parts = (self.max_connections, self.superuser_reserved_connections, self.reserved_connections)
        if any(p is None for p in parts):
            return None
        assert self.max_connections is not None
        return (
            self.max_connections
            - (self.superuser_reserved_connections or 0)
            - (self.reserved_connections or 0)
        )

    @property
    def connections_available(self) -> int | None:
        """How many more ordinary (non-superuser, non-reserved) connections PostgreSQL will accept.

        usable_connections - total_client_backends. Negative when superusers or reserved roles are
        using the reserved slots; at 0 or below the next ordinary login gets "remaining connection
        slots are reserved".
        """
        usable = self.usable_connections
        if usable is None or self.total_client_backends is None:
            return None
        return usable - self.total_client_backends

    def connections_by_application(self) -> dict[str, int] | None:
        if self.activity is None:
            return None
        counts: dict[str, int] = defaultdict(int)
        for group in self.activity:
            counts[group.application_name or ""] += group.connections
        return dict(counts)

    def connections_by_client_addr(self) -> dict[str | None, int] | None:
        """Client address (None = Unix socket) → client backends."""
        if self.clients is None:
            return None
        counts: dict[str | None, int] = defaultdict(int)
        for client in self.clients:
            counts[client.client_addr] += client.connections
        return dict(counts)

    def connections_not_from(self, addresses: Collection[str | None]) -> int | None:
        """Client backends whose address is not in ``addresses`` (e.g. not from the PgBouncers).

        Include None in ``addresses`` to treat Unix-socket connections as coming from the pooler.
        """
        by_addr = self.connections_by_client_addr()
        if by_addr is None:
            return None
        return sum(n for addr, n in by_addr.items() if addr not in addresses)


# --------------------------------------------------------------------------------------------------
# Pure parsing: rows → observation.
# --------------------------------------------------------------------------------------------------

_DURATION_UNITS: Final = {
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "min": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_DURATION_RE: Final = re.compile(r"^\s*'?\s*(-?\d+(?:\.\d*)?|-?\.\d+)\s*([a-z]*)\s*'?\s*$")


def parse_duration_seconds(text: object, default_unit: str | None = "ms") -> float | None:
    """A time-valued GUC as PostgreSQL would read it ("5s", "1min", "60000" = ms) → seconds.

    Returns None for text PostgreSQL would reject, rather than guessing.
    """
    if text is None:
        return None
    match = _DURATION_RE.match(str(text))
    if not match:
        return None
    number, unit = float(match.group(1)), match.group(2) or default_unit
    if unit is None or unit not in _DURATION_UNITS:
        return None
    seconds = number * _DURATION_UNITS[unit]
    return seconds if math.isfinite(seconds) else None


def _int(value: object) -> int | None:
    if value is None:
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def _age(value: object) -> float | None:
    # A peer can change state between the activity snapshot and clock_timestamp(): clamp at 0.
    seconds = as_float(value)
    return None if seconds is None else max(0.0, seconds)


def _ms_to_seconds(value: object) -> float | None:
    ms = as_float(value)
    return None if ms is None else ms / 1000.0


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


_TEXT_TYPES: Final = frozenset({str, type(None)})


def _texts(values: list[Any]) -> list[str | None]:
    """``_str_or_none`` of each value; text and NULL (what the driver hands over) pass as they are."""
    if set(map(type, values)) <= _TEXT_TYPES:
        return values
    return [_str_or_none(v) for v in values]


def _ints(values: list[Any]) -> list[int]:
    """``int`` of each value; ints pass as they are."""
    if set(map(type, values)) <= {int}:
        return values
    return [int(v) for v in values]


def _ages(values: list[Any]) -> list[float | None]:
    """``_age`` of each value; a positive float (almost every one) is its own age."""
    return [v if v.__class__ is float and v > 0.0 else _age(v) for v in values]


@dataclass(slots=True)
class _Settings:
    values: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)  # name → (reset_val, unit)
    role: str | None = None
    database: str | None = None


def _parse_settings(rows: Iterable[Row]) -> _Settings:
    parsed = _Settings()
    for row in rows:
        parsed.values[str(row["name"])] = (_str_or_none(row["reset_val"]), _str_or_none(row["unit"]))
        parsed.role = _str_or_none(row["role_name"])
        parsed.database = _str_or_none(row["database_name"])
    return parsed


def _parse_overrides(rows: Iterable[Row]) -> list[SettingOverride]:
    return [
        SettingOverride(
            database=_str_or_none(row["datname"]),
            role=_str_or_none(row["rolname"]),
            setting=str(row["name"]),
            value_seconds=parse_duration_seconds(row["value"]),
            raw=str(row["value"]),
        )
        for row in rows
    ]


def _privileged(rows: Sequence[Row]) -> bool:
    return bool(rows) and all(map(_CAN_READ, rows))


_CAN_READ: Final = itemgetter("can_read_all_stats")


def build_observation(
    target: str,
    collected_at: datetime,
    *,
    server_version_num: int | None = None,
    settings_rows: Sequence[Row] | None = None,
    role_setting_rows: Sequence[Row] | None = None,
    activity_rows: Sequence[Row] | None = None,
    wait_event_rows: Sequence[Row] | None = None,
    client_rows: Sequence[Row] | None = None,
    database_rows: Sequence[Row] | None = None,
) -> PostgresObservation:
    """Rows as the queries above return them (None: that query failed) → observation.

    ``server_version_num`` is a fallback for when the settings query failed (the connection
    reports the version at startup).
    """
    obs = PostgresObservation(target=target, collected_at=collected_at, server_version_num=server_version_num)

    overrides = _parse_overrides(role_setting_rows) if role_setting_rows is not None else None
    obs.setting_overrides = overrides

    if settings_rows is not None:
        settings = _parse_settings(settings_rows)
        obs.role, obs.database = settings.role, settings.database
        version = _int(settings.values.get("server_version_num", (None, None))[0])
        if version is not None:
            obs.server_version_num = version
        obs.max_connections = _int(settings.values.get("max_connections", (None, None))[0])
        obs.superuser_reserved_connections = _int(
            settings.values.get("superuser_reserved_connections", (None, None))[0]
        )
        reserved = _int(settings.values.get("reserved_connections", (None, None))[0])
        if reserved is None and obs.server_version_num is not None and obs.server_version_num < PG16:
            reserved = 0  # no such reservation before 16: a true zero, not a stand-in
        obs.reserved_connections = reserved
        timeouts: dict[str, float | None] = {}
        for name in TIMEOUT_SETTINGS:
            reset_val, unit = settings.values.get(name, (None, None))
            seconds = parse_duration_seconds(reset_val, unit or "ms")
            # reset_val is what *poolwatch's* fresh session starts with. If an override targets
            # poolwatch's own role or database, it hides the server-wide default: say unknown.
            masked = (
                overrides is None
                or settings.role is None
                or settings.database is None
                or any(
                    o.setting == name and o.applies_to(settings.role, settings.database) for o in overrides
                )
            )
            timeouts[name] = None if masked else seconds
        obs.statement_timeout_seconds = timeouts["statement_timeout"]
        obs.idle_in_transaction_session_timeout_seconds = timeouts["idle_in_transaction_session_timeout"]

    if activity_rows is not None:
        obs.can_read_all_stats = _privileged(activity_rows)
        if obs.role is None and activity_rows:
            obs.role = _str_or_none(activity_rows[0]["role_name"])
        if obs.can_read_all_stats:
            # column by column: a few C-level passes instead of eight conversions per group
            rows = activity_rows
            apps = _texts([row["application_name"] for row in rows])
            connections = _ints([row["connections"] for row in rows])
            backend_ages = _ages([row["oldest_backend_age_seconds"] for row in rows])
            obs.activity = list(
                map(
                    ActivityGroup,
                    _texts([row["datname"] for row in rows]),
                    _texts([row["usename"] for row in rows]),
                    apps,
                    _texts([row["state"] for row in rows]),
                    connections,
                    _ages([row["oldest_xact_age_seconds"] for row in rows]),
                    _ages([row["max_state_age_seconds"] for row in rows]),
                    backend_ages,
                )
            )
            obs.total_client_backends = sum(connections)
            oldest: dict[str, float] = {}
            for app, age in zip(apps, backend_ages, strict=True):
                if age is None:
                    continue
                app = app or ""
                oldest[app] = max(oldest.get(app, 0.0), age)
            obs.oldest_backend_age_by_application = oldest

    if wait_event_rows is not None and _privileged(wait_event_rows):
        obs.wait_events = [
            WaitEventCount(
                datname=_str_or_none(row["datname"]),
                wait_event_type=_str_or_none(row["wait_event_type"]),
                connections=int(row["connections"]),
            )
            for row in wait_event_rows
        ]

    if client_rows is not None and _privileged(client_rows):
        obs.clients = [
            ClientCount(
                client_addr=_str_or_none(row["client_addr"]),
                application_name=_str_or_none(row["application_name"]),
                connections=int(row["connections"]),
                client_ports=tuple(row.get("client_ports") or ()),
            )
            for row in client_rows
        ]

    if database_rows is not None:
        obs.databases = [
            DatabaseStats(
                datname=str(row["datname"]),
                numbackends=int(row["numbackends"]),
                xact_commit=int(row["xact_commit"]),
                xact_rollback=int(row["xact_rollback"]),
                sessions=_int(row["sessions"]),
                sessions_abandoned=_int(row["sessions_abandoned"]),
                sessions_fatal=_int(row["sessions_fatal"]),
                sessions_killed=_int(row["sessions_killed"]),
                session_time_seconds=_ms_to_seconds(row["session_time"]),
                active_time_seconds=_ms_to_seconds(row["active_time"]),
                idle_in_transaction_time_seconds=_ms_to_seconds(row["idle_in_transaction_time"]),
            )
            for row in database_rows
            if row["datname"] is not None
        ]
    return obs


# --------------------------------------------------------------------------------------------------
# Pure rendering: observation → metric families. The target label comes first everywhere.
# --------------------------------------------------------------------------------------------------

_ACTIVITY_LABELS: Final = ("target", "datname", "usename", "application_name", "state")


def up_family(target: str, up: bool) -> Metric:
    builder = gauge(
        "pg_up",
        "1 if poolwatch is connected to PostgreSQL and the pg_stat_activity query answered, else 0",
        ["target"],
    )
    builder.add([target], 1 if up else 0)
    return builder.build()


def _fold_applications(groups: Sequence[ActivityGroup], limit: int) -> list[ActivityGroup]:
    """Keep the ``limit`` busiest application names; merge the rest into OTHER_APPLICATION."""
    per_app: dict[str, int] = defaultdict(int)
    for g in groups:
        per_app[g.application_name or ""] += g.connections
    if len(per_app) <= limit:
        return list(groups)
    # A client may call itself OTHER_APPLICATION: it is folded too, or its series and the folded
    # ones would share one label set and the folded connections would be dropped as a duplicate.
    ranked = [app for app, _ in sorted(per_app.items(), key=lambda kv: (-kv[1], kv[0]))]
    keep = set([app for app in ranked if app != OTHER_APPLICATION][:limit])
    merged: dict[tuple[str | None, str | None, str | None], list[ActivityGroup]] = defaultdict(list)
    out: list[ActivityGroup] = []
    for g in groups:
        if (g.application_name or "") in keep:
            out.append(g)
        else:
            merged[(g.datname, g.usename, g.state)].append(g)

    def oldest(values: Iterable[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return max(present) if present else None

    for (datname, usename, state), members in merged.items():
        out.append(
            ActivityGroup(
                datname=datname,
                usename=usename,
                application_name=OTHER_APPLICATION,
                state=state,
                connections=sum(m.connections for m in members),
                oldest_xact_age_seconds=oldest(m.oldest_xact_age_seconds for m in members),
                max_state_age_seconds=oldest(m.max_state_age_seconds for m in members),
                oldest_backend_age_seconds=oldest(m.oldest_backend_age_seconds for m in members),
            )
        )
    return out


def _activity_families(
    obs: PostgresObservation, target: str, max_application_names: int
) -> list[FamilyBuilder | ColumnarFamily]:
    count = gauge(
        "pg_stat_activity_count",
        "Client backends per database and state (postgres_exporter compatible; standard states "
        "zero-filled for every known database)",
        ["target", "datname", "state"],
    )
    connections = gauge(
        "pg_stat_activity_connections",
        "Client backends per database, role, application_name and state (poolwatch's own "
        "connections included, application_name 'poolwatch')",
        _ACTIVITY_LABELS,
    )
    max_tx = gauge(
        "pg_stat_activity_max_tx_duration",
        "Age in seconds of the oldest open transaction in the group; 0 when none is open "
        "(postgres_exporter compatible)",
        _ACTIVITY_LABELS,
    )
    max_state = gauge(
        "pg_stat_activity_max_state_duration_seconds",
        "Longest time in seconds any backend of the group has been in its current state",
        _ACTIVITY_LABELS,
    )
    oldest_backend = gauge(
        "pg_stat_activity_oldest_backend_age_seconds",
        "Age in seconds of the oldest client connection per database, role and application_name",
        ["target", "datname", "usename", "application_name"],
    )
    builders: list[FamilyBuilder | ColumnarFamily] = [count, connections, max_tx, max_state, oldest_backend]
    if obs.activity is None:
        return builders

    per_state: dict[tuple[str, str], int] = defaultdict(int)
    datnames = {g.datname or "" for g in obs.activity}
    datnames.update(d.datname for d in obs.databases or ())
    for datname in datnames:
        for state in ACTIVITY_STATES:
            per_state[(datname, state)] = 0
    for g in obs.activity:
        per_state[(g.datname or "", g.state or "")] += g.connections
    for (datname, state), n in sorted(per_state.items()):
        count.add([target, datname, state], n)

    groups = _fold_applications(obs.activity, max_application_names)
    keys = [
        (target, g.datname or "", g.usename or "", g.application_name or "", g.state or "") for g in groups
    ]
    oldest_per_app: dict[tuple[str, str, str], float] = {}
    for g, key in zip(groups, keys, strict=True):
        if g.oldest_backend_age_seconds is not None:
            app_key = key[1:4]
            oldest_per_app[app_key] = max(oldest_per_app.get(app_key, 0.0), g.oldest_backend_age_seconds)
    for (datname, usename, app), age in oldest_per_app.items():
        oldest_backend.add_prepared((target, datname, usename, app), age)
    if len(set(keys)) < len(keys):
        # label sets that coincide (e.g. NULL and "" both mean ""): the builders keep the first
        for g, labels in zip(groups, keys, strict=True):
            connections.add(labels, g.connections)
            max_tx.add(labels, g.oldest_xact_age_seconds or 0.0)
            max_state.add(labels, g.max_state_age_seconds)
        return builders
    # One label table for the three per-group families: its label text is made once, not three
    # times, and no per-sample call is made.
    table = LabelTable(_ACTIVITY_LABELS, [list(column) for column in zip(*keys, strict=True)], len(keys))
    return [
        count,
        _columnar(connections, table, [g.connections for g in groups]),
        _columnar(max_tx, table, [g.oldest_xact_age_seconds or 0.0 for g in groups]),
        _columnar(max_state, table, [g.max_state_age_seconds for g in groups]),
        oldest_backend,
    ]


def _finite_sum(values: list[int | float]) -> bool:
    """Whether these numbers add up to a finite float: then none is NaN (one C pass; an infinite
    or huge value just takes the per-value path, which gives the same result)."""
    try:
        return math.isfinite(sum(values))
    except OverflowError:
        return False


def _columnar(builder: FamilyBuilder, labels: LabelTable, values: list[Any]) -> ColumnarFamily:
    """The family ``builder`` would build from these unique label sets and values: a value that is
    not a number (None, NaN) gives no sample, as ``FamilyBuilder.add`` skips it."""
    numbers: list[Any] = values
    kept: list[int] | None = None
    if not (set(map(type, values)) <= {int, float} and _finite_sum(values)):
        kept, numbers = [], []
        for i, value in enumerate(values):
            plain = type(value) is int or type(value) is float
            number = (value if value == value else None) if plain else as_float(value)
            if number is not None:
                kept.append(i)
                numbers.append(number)
    table = labels if kept is None else labels.take(kept)
    return ColumnarFamily(builder.name, builder.documentation, builder.kind, table, numbers)


def _database_families(obs: PostgresObservation, target: str) -> list[FamilyBuilder | ColumnarFamily]:
    labels = ["target", "datname"]
    numbackends = gauge(
        "pg_stat_database_numbackends",
        "Backends connected to this database, background workers included",
        labels,
    )
    xact_commit = counter("pg_stat_database_xact_commit", "Transactions committed in this database", labels)
    xact_rollback = counter(
        "pg_stat_database_xact_rollback", "Transactions rolled back in this database", labels
    )
    sessions = counter("pg_stat_database_sessions", "Sessions established to this database (PG14+)", labels)
    abandoned = counter(
        "pg_stat_database_sessions_abandoned",
        "Sessions that ended because the client went away without closing (PG14+)",
        labels,
    )
    fatal = counter("pg_stat_database_sessions_fatal", "Sessions ended by fatal errors (PG14+)", labels)
    killed = counter(
        "pg_stat_database_sessions_killed", "Sessions ended by operator intervention (PG14+)", labels
    )
    session_time = counter(
        "pg_stat_database_session_time_seconds", "Time spent by sessions in this database (PG14+)", labels
    )
    active_time = counter(
        "pg_stat_database_active_time_seconds",
        "Time spent executing SQL statements in this database (PG14+, postgres_exporter compatible)",
        labels,
    )
    idle_in_tx_time = counter(
        "pg_stat_database_idle_in_transaction_time_seconds",
        "Time spent idle in transaction in this database (PG14+)",
        labels,
    )
    builders: list[FamilyBuilder | ColumnarFamily] = [
        numbackends,
        xact_commit,
        xact_rollback,
        sessions,
        abandoned,
        fatal,
        killed,
        session_time,
        active_time,
        idle_in_tx_time,
    ]
    databases = obs.databases or []
    keys = [(target, db.datname) for db in databases]
    if databases and len(set(keys)) == len(keys):
        # one label table for the ten families (its text is made once); None (pre-14) gives no
        # sample, as FamilyBuilder.add skips it: absent, never a fake zero
        table = LabelTable(labels, [[target] * len(keys), [db.datname for db in databases]], len(keys))
        columns: list[tuple[FamilyBuilder, list[Any]]] = [
            (numbackends, [db.numbackends for db in databases]),
            (xact_commit, [db.xact_commit for db in databases]),
            (xact_rollback, [db.xact_rollback for db in databases]),
            (sessions, [db.sessions for db in databases]),
            (abandoned, [db.sessions_abandoned for db in databases]),
            (fatal, [db.sessions_fatal for db in databases]),
            (killed, [db.sessions_killed for db in databases]),
            (session_time, [db.session_time_seconds for db in databases]),
            (active_time, [db.active_time_seconds for db in databases]),
            (idle_in_tx_time, [db.idle_in_transaction_time_seconds for db in databases]),
        ]
        return [_columnar(builder, table, values) for builder, values in columns]
    for db in databases:
        key = [target, db.datname]
        numbackends.add(key, db.numbackends)
        xact_commit.add(key, db.xact_commit)
        xact_rollback.add(key, db.xact_rollback)
        # None (pre-14) is skipped by FamilyBuilder.add: absent, never a fake zero.
        sessions.add(key, db.sessions)
        abandoned.add(key, db.sessions_abandoned)
        fatal.add(key, db.sessions_fatal)
        killed.add(key, db.sessions_killed)
        session_time.add(key, db.session_time_seconds)
        active_time.add(key, db.active_time_seconds)
        idle_in_tx_time.add(key, db.idle_in_transaction_time_seconds)
    return builders


def observation_families(
    obs: PostgresObservation, *, max_application_names: int = MAX_APPLICATION_NAMES
) -> list[Metric]:
    """Every family the observation supports (pg_up is separate: see ``up_family``).

    Families with no samples are left out, so an unknown value is absent rather than zero.
    """
    target = obs.target
    t = ["target"]
    # the label table every single-value family shares: {target="..."} is formatted once
    one = LabelTable(t, [[target]], 1)

    def single(name: str, doc: str, value: float | None) -> ColumnarFamily:
        return _columnar(gauge(name, doc, t), one, [value])

    builders: list[FamilyBuilder | ColumnarFamily] = [
        single(
            "pg_settings_server_version_num",
            "Server version as an integer (e.g. 150004)",
            obs.server_version_num,
        ),
        single("pg_settings_max_connections", "max_connections", obs.max_connections),
        single(
            "pg_settings_superuser_reserved_connections",
            "superuser_reserved_connections",
            obs.superuser_reserved_connections,
        ),
        single(
            "pg_settings_reserved_connections",
            "reserved_connections (PostgreSQL 16+; 0 before)",
            obs.reserved_connections,
        ),
        single(
            "pg_settings_statement_timeout_seconds",
            "Server default statement_timeout in seconds, 0 = disabled (absent when an override on "
            "poolwatch's own role/database hides it)",
            obs.statement_timeout_seconds,
        ),
        single(
            "pg_settings_idle_in_transaction_session_timeout_seconds",
            "Server default idle_in_transaction_session_timeout in seconds, 0 = disabled",
            obs.idle_in_transaction_session_timeout_seconds,
        ),
        single(
            "pg_connections_used",
            "Client backends occupying max_connections slots, poolwatch's own included",
            obs.total_client_backends,
        ),
        single(
            "pg_connections_available",
            "max_connections - superuser_reserved_connections - reserved_connections - "
            "pg_connections_used: further logins an ordinary role can make; negative when reserved "
            "slots are in use",
            obs.connections_available,
        ),
    ]
    builders += _activity_families(obs, target, max_application_names)
    wait = gauge(
        "pg_stat_activity_wait_event_type_count",
        'Client backends per database and wait_event_type ("" = not waiting)',
        ["target", "datname", "wait_event_type"],
    )
    for w in obs.wait_events or ():
        wait.add([target, w.datname, w.wait_event_type], w.connections)
    builders.append(wait)
    builders += _database_families(obs, target)
    # families with no samples are left out
    return [
        b.build() if isinstance(b, FamilyBuilder) else b
        for b in builders
        if (len(b) if isinstance(b, FamilyBuilder) else len(b.values))
    ]


# --------------------------------------------------------------------------------------------------
# Error classification and secret hygiene.
# --------------------------------------------------------------------------------------------------

_URL_PASSWORD_RE: Final = re.compile(r"(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*@", re.IGNORECASE)
_KV_PASSWORD_RE: Final = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)


def describe_dsn(dsn: str) -> str:
    """``postgresql://user@host:port/db``: safe to show (no password, no query parameters but host
    and port, which matter for Unix sockets)."""
    try:
        parts = urlsplit(dsn)
        host_part = parts.netloc.rpartition("@")[2]
        user = unquote(parts.username) if parts.username else ""
        query = parse_qs(parts.query)
    except ValueError:
        return "<unparseable DSN>"
    extras = [f"{k}={query[k][0]}" for k in ("host", "port") if k in query]
    text = f"{parts.scheme or 'postgresql'}://{user + '@' if user else ''}{host_part}{parts.path}"
    return text + (f"?{'&'.join(extras)}" if extras else "")


_URL_SCHEME_RE: Final = re.compile(r"^postgres(?:ql)?://", re.IGNORECASE)
# libpq keywords asyncpg understands as URL query parameters. Any other query parameter would be
# sent to the server as a run-time setting (connect_timeout=5 → "unrecognized configuration
# parameter"), so the rest are dropped: timeouts and application_name are poolwatch's to set.
_ASYNCPG_URL_PARAMS: Final = ("sslmode", "sslrootcert", "sslcert", "sslkey", "sslcrl", "passfile")


def asyncpg_dsn(dsn: str) -> str:
    """A DSN asyncpg accepts (it only takes URLs) from a URL or a libpq ``key=value`` string."""
    if _URL_SCHEME_RE.match(dsn.strip()):
        return dsn.strip()
    try:
        params = {k: str(v) for k, v in psycopg.conninfo.conninfo_to_dict(dsn).items()}
    except psycopg.Error as exc:
        # psycopg's message can quote the string, password included: say nothing about it.
        raise ValueError("the DSN is neither a postgresql:// URL nor a valid key=value string") from exc
    userinfo = quote(params.get("user", ""), safe="")
    if params.get("password"):
        userinfo += ":" + quote(params["password"], safe="")
    host, port = params.get("host", ""), params.get("port", "")
    query: dict[str, str] = {}
    if host.startswith("/") or "," in host:
        query["host"], netloc_host = host, ""
        if port:
            query["port"] = port
    else:
        netloc_host = (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
    for key in _ASYNCPG_URL_PARAMS:
        if key in params:
            query[key] = params[key]
    netloc = (f"{userinfo}@" if userinfo else "") + netloc_host
    suffix = "&".join(f"{k}={quote(v, safe='/')}" for k, v in query.items())
    return f"postgresql://{netloc}/{quote(params.get('dbname', ''), safe='')}" + (
        f"?{suffix}" if suffix else ""
    )


def _dsn_secrets(dsn: str, password: str | None) -> list[str]:
    # Not the DSN itself when it parses: that would also blank out describe_dsn() (the DSN minus
    # its password), so every error said "cannot connect to ***" instead of naming the server.
    secrets = [s for s in (password,) if s]
    if _URL_SCHEME_RE.match(dsn.strip()):
        with contextlib.suppress(ValueError):
            parts = urlsplit(dsn)
            if parts.password:
                secrets += [parts.password, unquote(parts.password)]
            for key in ("password", "sslpassword"):
                secrets += parse_qs(parts.query).get(key, [])
    elif dsn:
        try:
            params = psycopg.conninfo.conninfo_to_dict(dsn)
        except psycopg.Error:
            secrets.append(dsn)  # unparseable: a password may hide in it where we cannot see it
        else:
            secrets += [str(params[k]) for k in ("password", "sslpassword") if params.get(k)]
    # Longest first, so a secret containing another is removed whole.
    return sorted({s for s in secrets if s}, key=len, reverse=True)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """Remove passwords (given literally, or inside a URL or key=value) from a message."""
    for secret in secrets:
        text = text.replace(secret, "***")
    text = _URL_PASSWORD_RE.sub(r"\1***@", text)
    return _KV_PASSWORD_RE.sub(r"\1***", text)


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _sqlstate(exc: BaseException) -> str:
    return str(getattr(exc, "sqlstate", "") or "")


def classify_connect_error(exc: BaseException, where: str, connect_timeout: float) -> tuple[ErrorReason, str]:
    """An error raised while opening a connection → (reason, actionable detail)."""
    code = _sqlstate(exc)
    message = _one_line(exc)
    if isinstance(exc, TimeoutError):
        return "connect", (
            f"no connection to {where} within {connect_timeout:g}s; check that the host is reachable "
            "and that PostgreSQL listens there (firewall, listen_addresses)"
        )
    if code.startswith("28"):
        return "auth", (
            f"authentication to {where} failed: {message}. Check the user and password poolwatch "
            "uses and the pg_hba.conf entry for its address"
        )
    if code == "3D000":
        return "connect", f"{where}: {message}. Fix the database name in the DSN"
    if code == "53300":
        return "connect", (
            f"{where} refused the connection: {message}. The server is out of connection slots; "
            "give poolwatch's role a reserved slot (pg_use_reserved_connections, PG16+) or free slots"
        )
    if code == "57P03":
        return "connect", f"{where} is not accepting connections right now: {message}"
    if isinstance(exc, asyncpg.exceptions.ClientConfigurationError):
        return "config", f"invalid connection settings for {where}: {message}"
    if isinstance(exc, ssl.SSLError):
        return "connect", (
            f"TLS to {where} failed: {message}. Check sslmode and sslrootcert (the CA that signed "
            "the server certificate)"
        )
    if isinstance(exc, socket.gaierror):
        return "connect", f"cannot connect to {where}: the host name does not resolve ({message})"
    if isinstance(exc, OSError):
        return "connect", f"cannot connect to {where}: {message}. Is PostgreSQL running and listening there?"
    return "connect", f"cannot connect to {where}: {type(exc).__name__}: {message}"


def classify_query_error(exc: BaseException, collector: str) -> tuple[ErrorReason, str]:
    """An error raised by one collector's query → (reason, actionable detail)."""
    code = _sqlstate(exc)
    message = _one_line(exc)
    if isinstance(exc, TimeoutError):
        return "timeout", f"{collector} query did not finish within the collection timeout"
    if code == "57014":
        return "timeout", f"{collector} query was cancelled by poolwatch's statement_timeout: {message}"
    if code == "42501":
        return "privilege", (
            f"{collector} query not permitted: {message}. Grant the role pg_monitor "
            "(GRANT pg_monitor TO <role>)"
        )
    if code.startswith("08") or isinstance(exc, (OSError, asyncpg.exceptions.InterfaceError)):
        return "connect", f"connection lost during the {collector} query: {message}"
    if code:
        return "query", f"{collector} query failed: SQLSTATE {code}: {message}"
    return "query", f"{collector} query failed: {type(exc).__name__}: {message}"


def privilege_detail(role: str | None) -> str:
    quoted = '"' + role.replace('"', '""') + '"' if role else "<role>"
    return (
        f"role {quoted} cannot see other roles' sessions in pg_stat_activity (state, ages, client "
        f"addresses are hidden); run: GRANT pg_monitor TO {quoted};"
    )


#: What the first statement on a pooled connection raises when its server session has already
#: ended (the FATAL message half-read, or the socket already closed).
_STALE_SESSION_ERRORS: Final = (
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
)


_SET_STATEMENT_TIMEOUT: Final = "SELECT pg_catalog.set_config('statement_timeout', $1, false)"


@dataclass(slots=True)
class _Session:
    """What PostgresSource knows about one pooled server session."""

    #: the statement_timeout set on it (ms)
    statement_timeout_ms: int
    #: its pg_conf_load_time() when it last returned its settings rows, and those rows
    conf_load_time: datetime | None = None
    settings_rows: list[Row] | None = None


async def _keep_session(conn: Any) -> None:
    """The pool's reset when a connection is handed back: nothing to undo.

    asyncpg's default runs ``RESET ALL; CLOSE ALL; UNLISTEN *; pg_advisory_unlock_all()`` (a round
    trip per collection). poolwatch's sessions only run SELECTs and keep their statement_timeout on
    purpose; an open transaction is still rolled back by the pool before this is called.
    """


def _terminate(conn: Any) -> None:
    """Drop a pooled connection, never raising: when asyncpg has already seen the connection die it
    has returned it to the pool itself, and terminate() on the proxy would raise an InterfaceError
    that masks the error being handled."""
    with contextlib.suppress(Exception):
        conn.terminate()


def _server_version_num(conn: Any) -> int | None:
    """From the connection's startup parameters: no query needed, works when `settings` fails."""
    try:
        version = conn.get_server_version()
    except Exception:
        return None
    if version.major >= 10:
        return int(version.major) * 10000 + int(version.minor)
    return int(version.major) * 10000 + int(version.minor) * 100 + int(version.micro)


# --------------------------------------------------------------------------------------------------
# The I/O shell.
# --------------------------------------------------------------------------------------------------


class _Aborted(Exception):
    """The connection can no longer be used: remaining collectors are reported with this reason."""

    def __init__(self, reason: ErrorReason, detail: str) -> None:
        super().__init__(detail)
        self.reason: ErrorReason = reason
        self.detail = detail


class PostgresSource:
    """Polls one PostgreSQL server through a small lazily created asyncpg pool.

    * At most ``pool_max_size`` connections, ever: a broken pool is terminated before a new one is
      made. The pool has ``min_size=0`` so creating it never fails; connecting happens in
      ``collect``, where the error can be classified.
    * Concurrent ``collect()`` calls share one in-flight collection (one result object).
    * A collection runs inside ``asyncio.timeout(timeout)``; poolwatch's session also gets
      ``statement_timeout`` = that timeout, so a query the client gave up on dies on the server too.
    """

    kind: Final = "postgres"

    def __init__(
        self,
        target: str,
        dsn: str,
        password: str | None,
        *,
        connect_timeout: float,
        pool_max_size: int = 2,
    ) -> None:
        if pool_max_size < 1:
            raise ValueError("pool_max_size must be at least 1")
        self.target = target
        self._password = password
        # Secrets first, from the DSN as given: a key=value DSN can carry a password too.
        self._secrets = _dsn_secrets(dsn, password)
        self._dsn_error: str | None = None
        try:
            self._dsn = asyncpg_dsn(dsn)
        except ValueError as exc:
            # Reported by every collect() as reason "config" rather than raised here, so one bad
            # target cannot stop the daemon from starting.
            self._dsn, self._dsn_error = "", str(exc)
        self._secrets = sorted({*self._secrets, *_dsn_secrets(self._dsn, password)}, key=len, reverse=True)
        self._connect_timeout = connect_timeout
        self._pool_max_size = pool_max_size
        self._where = scrub(describe_dsn(self._dsn), self._secrets) if self._dsn else "<invalid DSN>"
        self._pool: Any = None
        # Serialises pool creation: a collection and a probe starting together must not build
        # two pools (2 x pool_max_size connections).
        self._pool_lock = asyncio.Lock()
        self._inflight: asyncio.Task[SourceResult] | None = None
        self._closed = False
        #: per server session (backend pid) of the pool: its statement_timeout and settings rows
        self._sessions: dict[int, _Session] = {}
        #: the statement_timeout (ms) the last collection asked for: new sessions start with it
        self._statement_timeout_ms: int | None = None

    def __repr__(self) -> str:
        return f"PostgresSource(target={self.target!r}, dsn={self._where!r})"

    # -- public API --------------------------------------------------------------------------------

    # The timeout is a parameter (not left to the caller's asyncio.timeout) because it also sets
    # the server-side statement_timeout and is shared by callers joining an in-flight collection.
    async def collect(self, timeout: float) -> SourceResult:
        """One collection, never raising for database trouble: failures are in the result."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        task = self._inflight
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._collect(timeout), name=f"poolwatch-postgres-{self.target}"
            )
            self._inflight = task
            task.add_done_callback(self._forget)
        # shield: one caller giving up (e.g. an HTTP client disconnecting) must not cancel the
        # collection the other callers are waiting for; it stays bounded by its own timeout.
        return await asyncio.shield(task)

    async def select1(self, timeout: float) -> None:
        """The direct "can an application get a connection and a query through" probe.

        Runs on the same pool as the collections, so the probe never adds connections beyond
        ``pool_max_size``. Raises the driver's exception on failure (the caller classifies it).
        """
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        async with asyncio.timeout(timeout):
            pool = await self._get_pool()
            attempts = self._pool_max_size + 1  # a stale idle session is poolwatch's, not the server's
            for attempt in range(1, attempts + 1):
                conn = await pool.acquire()
                try:
                    await conn.fetchval("SELECT 1")
                    return
                except _STALE_SESSION_ERRORS:
                    _terminate(conn)
                    if attempt == attempts:
                        raise
                except BaseException:
                    _terminate(conn)  # possibly mid-query: do not hand it back for reuse
                    raise
                finally:
                    await pool.release(conn)

    async def close(self) -> None:
        self._closed = True
        task, self._inflight = self._inflight, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._drop_pool(graceful=True)

    # -- internals ---------------------------------------------------------------------------------

    def _forget(self, task: asyncio.Task[SourceResult]) -> None:
        if self._inflight is task:
            self._inflight = None

    def _scrub(self, text: str) -> str:
        return scrub(text, self._secrets)

    async def _get_pool(self) -> Any:
        async with self._pool_lock:
            if self._pool is not None:
                return self._pool
            pool = asyncpg.create_pool(
                dsn=self._dsn,
                password=self._password,
                min_size=0,
                max_size=self._pool_max_size,
                timeout=self._connect_timeout,  # asyncpg's connect timeout
                server_settings={"application_name": POOLWATCH_APPLICATION_NAME},
                init=self._init_session,
                reset=_keep_session,  # asyncpg 0.30+
            )
            await pool  # with min_size=0 this opens no connection
            self._pool = pool
            return pool

    async def _drop_pool(self, *, graceful: bool = False) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if graceful:
            try:
                async with asyncio.timeout(max(self._connect_timeout, 1.0)):
                    await pool.close()
                return
            except Exception:
                pass
        pool.terminate()

    async def _init_session(self, conn: Any) -> None:
        """A new pooled session: bounded by the collections' statement_timeout from the start.

        Session-level (not in the startup packet) so pg_settings.reset_val still shows the real
        default. The session keeps it: the pool's reset (``_keep_session``) no longer runs RESET
        ALL, so a collection needs no SET of its own (one round trip less each time).
        """
        pid = conn.get_server_pid()
        if len(self._sessions) > 2 * self._pool_max_size + 2:
            self._sessions.clear()  # ended sessions; a live one just sets its timeout again
        # a new session may have the pid of an ended one: never inherit what that one had
        self._sessions.pop(pid, None)
        if self._statement_timeout_ms is not None:  # else a probe opened it: the collection sets it
            await conn.execute(_SET_STATEMENT_TIMEOUT, f"{self._statement_timeout_ms}ms")
            self._sessions[pid] = _Session(self._statement_timeout_ms)

    def _plan(self, server_version_num: int) -> list[tuple[str, str]]:
        """(collector, SQL) in execution order: one statement for every collector. Tests override
        this to inject a slow query."""
        return [(ACTIVITY, collection_sql(server_version_num))]

    def _fallback_plan(self, server_version_num: int) -> list[tuple[str, str]]:
        """One statement per collector, for when the combined one failed: each failure is then
        reported by the collector it belongs to, and the others still answer."""
        return [
            # activity, wait_events and clients from one pg_stat_activity scan
            (ACTIVITY, PG_STAT_ACTIVITY_SQL),
            (SETTINGS, SETTINGS_SQL),
            (DATABASE, database_sql(server_version_num)),
            (ROLE_SETTINGS, ROLE_SETTINGS_SQL),
        ]

    @staticmethod
    def _covers(collector: str, sql: str) -> tuple[str, ...]:
        """The collectors one statement answers (its first one carries the statement's time)."""
        if sql in (COLLECTION_SQL_14, COLLECTION_SQL_PRE14):
            return COLLECTORS
        if sql == PG_STAT_ACTIVITY_SQL:
            return PG_STAT_ACTIVITY_COLLECTORS
        return (collector,)

    async def _collect(self, timeout: float) -> SourceResult:
        started = time.monotonic()
        collected_at = datetime.now(UTC)
        rows: dict[str, list[Any]] = {}
        outcomes: dict[str, CollectorOutcome] = {}
        version: int | None = None
        failure: tuple[ErrorReason, str] | None = None  # what stopped the collection early
        connected = False
        current: list[tuple[str, float]] = []  # (collector, start) running when a timeout fires
        # Server-side bound for every query: a query the client gave up on dies on the server too.
        statement_timeout_ms = max(1, math.ceil(timeout * 1000))

        try:
            if self._dsn_error is not None:
                raise _Aborted("config", f"target {self.target}: {self._dsn_error}")
            async with asyncio.timeout(timeout):
                pool = await self._get_pool()
                self._statement_timeout_ms = statement_timeout_ms
                attempts = self._pool_max_size + 1  # every idle pooled session may be stale
                for attempt in range(1, attempts + 1):
                    try:
                        conn = await pool.acquire()
                    except Exception as exc:
                        raise _Aborted(
                            *classify_connect_error(exc, self._where, self._connect_timeout)
                        ) from exc
                    connected = True
                    answered = False  # whether this pooled session has answered a statement yet
                    try:
                        session = self._sessions.get(conn.get_server_pid())
                        if session is None or session.statement_timeout_ms != statement_timeout_ms:
                            # a session opened by a probe, or a collection asking for another timeout
                            await conn.execute(_SET_STATEMENT_TIMEOUT, f"{statement_timeout_ms}ms")
                            answered = True
                            session = _Session(statement_timeout_ms)
                            self._sessions[conn.get_server_pid()] = session
                        version = _server_version_num(conn)
                        plan = self._plan(version or 0)
                        # The first statement a pooled session gets tells whether it is still there.
                        ok = await self._run(conn, session, *plan[0], rows, outcomes, current, not answered)
                        break
                    except _STALE_SESSION_ERRORS as exc:
                        # A pooled session that ended while idle (terminated by an administrator,
                        # PostgreSQL restarted) and whose end the pool had not fully processed yet:
                        # not a down server. Discard it and try the next one.
                        _terminate(conn)
                        await pool.release(conn)
                        if answered:  # it was there a moment ago: not a stale session
                            raise
                        current.clear()
                        if attempt == attempts:
                            detail = f"connection to {self._where} lost: {_one_line(exc)}"
                            raise _Aborted("connect", detail) from exc
                    except BaseException:
                        _terminate(conn)
                        await pool.release(conn)
                        raise
                # the loop above either broke out with a session or raised
                assert session is not None
                try:
                    steps = plan[1:]
                    if not ok and len(self._covers(*plan[0])) > 1:
                        # the combined statement failed: ask collector by collector which one fails
                        steps = [*self._fallback_plan(version or 0), *steps]
                    for collector, sql in steps:
                        await self._run(conn, session, collector, sql, rows, outcomes, current, False)
                    current.clear()
                except BaseException:
                    # Timeout, cancellation or a dead socket: the connection may be mid-query. Drop
                    # it instead of handing it back (statement_timeout ends the query server-side).
                    _terminate(conn)
                    raise
                finally:
                    await pool.release(conn)
        except _Aborted as exc:
            failure = (exc.reason, self._scrub(exc.detail))
        except TimeoutError:
            if not connected:
                failure = classify_connect_error(
                    TimeoutError(), self._where, min(timeout, self._connect_timeout)
                )
            else:
                failure = ("timeout", f"collection did not finish within {timeout:g}s")
                for name, t0 in current:
                    outcomes[name] = CollectorOutcome(
                        name,
                        False,
                        time.monotonic() - t0,
                        "timeout",
                        f"{name} query did not finish within the {timeout:g}s collection timeout",
                    )
        except Exception as exc:  # anything unforeseen still yields a result, never a crash
            reason, detail = (
                classify_query_error(exc, current[0][0])
                if connected and current
                else classify_connect_error(exc, self._where, self._connect_timeout)
            )
            failure = (reason, self._scrub(detail))

        if failure is not None:
            if not connected:
                # Nothing usable in the pool: replace it (the old one is terminated first, so the
                # connection count never exceeds pool_max_size).
                await self._drop_pool()
            elif self._pool is not None:
                # Connected but then lost or timed out: new connections next time, without
                # killing a probe that may be using the other slot right now.
                await self._pool.expire_connections()

        return self._result(collected_at, started, version, rows, outcomes, failure)

    async def _run(
        self,
        conn: Any,
        session: _Session,
        collector: str,
        sql: str,
        rows: dict[str, list[Any]],
        outcomes: dict[str, CollectorOutcome],
        current: list[tuple[str, float]],
        first: bool,
    ) -> bool:
        """Run one statement of the plan into ``rows`` and ``outcomes``; False when it failed.

        Raises _Aborted when the connection is unusable; with ``first`` (nothing has come back on
        this pooled session yet) a lost session raises as it is, for the caller to try another.
        """
        covered = self._covers(collector, sql)
        combined = covered == COLLECTORS
        t0 = time.monotonic()
        current[:] = [(name, t0) for name in covered]
        try:
            # the combined statement's $1: when this session last read its settings
            args = (session.conf_load_time,) if combined else ()
            result = await conn.fetch(sql, *args)
        except asyncpg.PostgresError as exc:
            reason, detail = classify_query_error(exc, collector)
            for name in covered:
                outcomes[name] = CollectorOutcome(
                    name, False, time.monotonic() - t0, reason, self._scrub(detail)
                )
            if conn.is_closed() or reason == "connect":
                raise _Aborted("connect", self._scrub(detail)) from exc
            return False
        except (OSError, asyncpg.exceptions.InterfaceError) as exc:
            if first and isinstance(exc, _STALE_SESSION_ERRORS):
                raise
            reason, detail = classify_query_error(exc, collector)
            for name in covered:
                outcomes[name] = CollectorOutcome(
                    name, False, time.monotonic() - t0, reason, self._scrub(detail)
                )
            raise _Aborted(reason, self._scrub(detail)) from exc
        seconds = time.monotonic() - t0
        if combined:
            parts = split_pg_stat_activity(result)
            settings = parts.get(SETTINGS)
            if settings:
                session.settings_rows = settings
                session.conf_load_time = settings[0]["conf_load_time"]
            else:  # unchanged since this session last read them
                settings = session.settings_rows
            for name in COLLECTORS:
                rows[name] = parts.get(name, [])
            rows[SETTINGS] = list(settings or ())
        elif len(covered) > 1:
            rows.update(split_pg_stat_activity(result))
        else:
            rows[collector] = list(result)
        for name in covered:
            outcomes[name] = CollectorOutcome(name, True, seconds if name == collector else 0.0)
        return True

    def _result(
        self,
        collected_at: datetime,
        started: float,
        version: int | None,
        rows: dict[str, list[Any]],
        outcomes: dict[str, CollectorOutcome],
        failure: tuple[ErrorReason, str] | None,
    ) -> SourceResult:
        up = ACTIVITY in rows
        observation: PostgresObservation | None = None
        if rows:
            observation = build_observation(
                self.target,
                collected_at,
                server_version_num=version,
                settings_rows=rows.get(SETTINGS),
                role_setting_rows=rows.get(ROLE_SETTINGS),
                activity_rows=rows.get(ACTIVITY),
                wait_event_rows=rows.get(WAIT_EVENTS),
                client_rows=rows.get(CLIENTS),
                database_rows=rows.get(DATABASE),
            )
            # A query that answered but could only see part of pg_stat_activity is a failure.
            for name in (ACTIVITY, WAIT_EVENTS, CLIENTS):
                if name in rows and not _privileged(rows[name]):
                    previous = outcomes[name]
                    outcomes[name] = CollectorOutcome(
                        name, False, previous.seconds, "privilege", privilege_detail(observation.role)
                    )
        for name in COLLECTORS:
            if name not in outcomes:
                skip_reason, skip_detail = failure or ("query", "not run")
                outcomes[name] = CollectorOutcome(name, False, 0.0, skip_reason, f"not run: {skip_detail}")

        families = [up_family(self.target, up)]
        if observation is not None:
            families += observation_families(observation)

        ordered = [outcomes[name] for name in COLLECTORS if name in outcomes]
        first_failed = next((o for o in ordered if not o.ok), None)
        # Why pg_up is 0; or, when it is 1, the first collector that failed (so a missing GRANT
        # shows on the target's status even though the server is up).
        reason: ErrorReason | None = None
        detail: str | None = None
        if failure is not None and not up:
            reason, detail = failure
        elif first_failed is not None:
            reason, detail = first_failed.reason, first_failed.detail
        return SourceResult(
            target=self.target,
            kind=self.kind,
            up=up,
            families=families,
            outcomes=ordered,
            reason=reason,
            detail=detail,
            seconds=time.monotonic() - started,
            observation=observation,
        )
