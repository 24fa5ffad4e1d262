"""What poolwatch exports from PgBouncer's admin console, as one declarative table.

Every exported SHOW column is one ``ColumnMetric``: which command and column it comes from (with the
older names the column had), the metric it becomes, its type, unit conversion, help text and the
first PgBouncer release that has it. The same table drives collection (``pgbouncer.py``) and the
metrics reference in the README (``metrics_reference()``), so the two cannot drift apart.

Rules the table encodes, each learned from a bug in an existing exporter:

* Columns are looked up by name, never by position; unknown columns are ignored, and a column an
  older release lacks simply yields no sample (a strict column check failed whole scrapes).
* A renamed column keeps its metric: ``reserve_pool`` (≤ 1.23) and ``reserve_pool_size`` (1.24+)
  both feed ``pgbouncer_databases_reserve_pool``; ``cl_cancel_req`` (1.16-1.17) is what 1.18 split
  into ``cl_waiting_cancel_req`` ("not forwarded to the server yet", same doc text) and another column.
* Names match prometheus-community/pgbouncer_exporter wherever it has the metric, so its
  dashboards and alerts keep working; what it lacks lives under the same ``pgbouncer_`` prefix.
* Times are exported in seconds: PgBouncer's stats are in microseconds, and ``maxwait`` is whole
  seconds with the remainder in ``maxwait_us``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

#: SHOW commands whose columns map one-to-one onto metrics (lists and config are key/value rows).
TableCommand = Literal["pools", "stats", "databases", "lists", "config"]
ColumnKind = Literal["gauge", "counter"]

#: Label columns per command, in label order; every family gets ``target`` in front of them.
#: ``pool_mode`` on SHOW DATABASES is the per-database override (NULL → ""), as in pc.
COMMAND_LABELS: Mapping[str, tuple[str, ...]] = {
    "pools": ("database", "user"),
    "stats": ("database",),
    "databases": ("name", "host", "port", "database", "force_user", "pool_mode"),
    "lists": (),
    "config": (),
}

#: The label every PgBouncer family carries first: poolwatch serves several PgBouncers at once.
TARGET_LABEL = "target"

MICROSECONDS = 1e-6


@dataclass(frozen=True, slots=True)
class ColumnMetric:
    """One exported column. For ``lists`` and ``config`` the "column" is the row's key."""

    command: TableCommand
    column: str  # the newest name PgBouncer uses
    metric: str  # the exposed series name (counters include ``_total``)
    kind: ColumnKind
    help: str
    since: tuple[int, int]  # first PgBouncer release with this column (the table covers 1.12+)
    aliases: tuple[str, ...] = ()  # older names of the same column, oldest last
    scale: float = 1.0  # multiply the raw value by this (µs → s)
    subsecond_us: str | None = None  # a column holding the microsecond remainder to add

    @property
    def labels(self) -> tuple[str, ...]:
        return (TARGET_LABEL, *COMMAND_LABELS[self.command])

    @property
    def source(self) -> str:
        names = self.column
        if self.subsecond_us:
            names += f" + {self.subsecond_us}/1e6"
        if self.aliases:
            names += " (" + ", ".join(self.aliases) + " on older releases)"
        if self.scale == MICROSECONDS:
            names += " [µs → s]"
        return f"SHOW {self.command.upper()} {names}"


def _pools(
    column: str,
    metric: str,
    help_: str,
    since: tuple[int, int] = (1, 12),
    *,
    aliases: tuple[str, ...] = (),
    subsecond_us: str | None = None,
) -> ColumnMetric:
    return ColumnMetric(
        "pools",
        column,
        "pgbouncer_pools_" + metric,
        "gauge",
        help_,
        since,
        aliases,
        subsecond_us=subsecond_us,
    )


def _stats(
    column: str,
    metric: str,
    help_: str,
    since: tuple[int, int] = (1, 12),
    *,
    kind: ColumnKind = "counter",
    scale: float = 1.0,
) -> ColumnMetric:
    return ColumnMetric("stats", column, "pgbouncer_stats_" + metric, kind, help_, since, scale=scale)


def _db(
    column: str, metric: str, help_: str, since: tuple[int, int] = (1, 12), *, aliases: tuple[str, ...] = ()
) -> ColumnMetric:
    return ColumnMetric("databases", column, "pgbouncer_databases_" + metric, "gauge", help_, since, aliases)


def _list(key: str, metric: str, help_: str, since: tuple[int, int] = (1, 12)) -> ColumnMetric:
    return ColumnMetric("lists", key, "pgbouncer_" + metric, "gauge", help_, since)


def _config(key: str, metric: str, help_: str, since: tuple[int, int] = (1, 12)) -> ColumnMetric:
    return ColumnMetric("config", key, "pgbouncer_config_" + metric, "gauge", help_, since)


COLUMNS: tuple[ColumnMetric, ...] = (
    # -- SHOW POOLS: one row per (database, user) -------------------------------------------------------
    _pools(
        "cl_active",
        "client_active_connections",
        "Client connections linked to a server connection or idle with no queries waiting",
    ),
    _pools(
        "cl_waiting",
        "client_waiting_connections",
        "Client connections that have sent queries but have not yet got a server connection",
    ),
    _pools(
        "cl_active_cancel_req",
        "client_active_cancel_connections",
        "Client connections that have forwarded query cancellations to the server and wait for "
        "the server response",
        since=(1, 18),
    ),
    _pools(
        "cl_waiting_cancel_req",
        "client_waiting_cancel_connections",
        "Client connections that have not forwarded query cancellations to the server yet",
        since=(1, 16),
        aliases=("cl_cancel_req",),
    ),
    _pools("sv_active", "server_active_connections", "Server connections linked to a client"),
    _pools(
        "sv_active_cancel",
        "server_active_cancel_connections",
        "Server connections currently forwarding a cancel request",
        since=(1, 18),
    ),
    _pools(
        "sv_being_canceled",
        "server_being_canceled_connections",
        "Server connections that could become idle but wait for in-flight cancel requests against them",
        since=(1, 18),
    ),
    _pools(
        "sv_idle",
        "server_idle_connections",
        "Server connections unused and immediately usable for client queries",
    ),
    _pools(
        "sv_used",
        "server_used_connections",
        "Server connections idle longer than server_check_delay, needing server_check_query before reuse",
    ),
    _pools(
        "sv_tested",
        "server_testing_connections",
        "Server connections currently running server_reset_query or server_check_query",
    ),
    _pools("sv_login", "server_login_connections", "Server connections currently logging in"),
    _pools(
        "maxwait",
        "client_maxwait_seconds",
        "How long the oldest client in the queue has waited, in seconds (0 when nobody waits)",
        subsecond_us="maxwait_us",
    ),
    # -- SHOW STATS: one row per database; totals since PgBouncer started -----------------------------
    _stats("total_query_count", "queries_pooled_total", "SQL queries pooled by PgBouncer"),
    _stats(
        "total_query_time",
        "queries_duration_seconds_total",
        "Seconds PgBouncer was actively connected to PostgreSQL executing queries",
        scale=MICROSECONDS,
    ),
    _stats("total_xact_count", "sql_transactions_pooled_total", "SQL transactions pooled by PgBouncer"),
    _stats(
        "total_xact_time",
        "server_in_transaction_seconds_total",
        "Seconds PgBouncer was connected to PostgreSQL in a transaction, idle in transaction or "
        "executing queries",
        scale=MICROSECONDS,
    ),
    _stats(
        "total_wait_time",
        "client_wait_seconds_total",
        "Seconds clients spent waiting for a server connection (added when a client gets a server)",
        scale=MICROSECONDS,
    ),
    _stats("total_received", "received_bytes_total", "Bytes of network traffic received by PgBouncer"),
    _stats("total_sent", "sent_bytes_total", "Bytes of network traffic sent by PgBouncer"),
    _stats(
        "total_server_assignment_count",
        "server_assignments_total",
        "Times a server connection was assigned to a client",
        since=(1, 23),
    ),
    _stats(
        "total_client_parse_count",
        "client_parses_total",
        "Prepared statements created by clients (named prepared statement tracking mode)",
        since=(1, 24),
    ),
    _stats(
        "total_server_parse_count",
        "server_parses_total",
        "Prepared statements created by PgBouncer on servers (named prepared statement tracking)",
        since=(1, 24),
    ),
    _stats(
        "total_bind_count",
        "binds_total",
        "Prepared statements readied for execution by clients and forwarded to PostgreSQL",
        since=(1, 24),
    ),
    # the averages are over PgBouncer's last stats_period; kept for the three durations only, the
    # rates are better derived from the counters with rate()
    _stats(
        "avg_wait_time",
        "avg_client_wait_seconds",
        "Average wait for a server of the clients assigned one in the last stats_period, in seconds",
        kind="gauge",
        scale=MICROSECONDS,
    ),
    _stats(
        "avg_query_time",
        "avg_query_duration_seconds",
        "Average query duration in the last stats_period, in seconds",
        kind="gauge",
        scale=MICROSECONDS,
    ),
    _stats(
        "avg_xact_time",
        "avg_transaction_duration_seconds",
        "Average transaction duration in the last stats_period, in seconds",
        kind="gauge",
        scale=MICROSECONDS,
    ),
    # -- SHOW DATABASES: one row per configured database ----------------------------------------------
    _db("pool_size", "pool_size", "Maximum number of server connections per pool of this database"),
    _db(
        "min_pool_size",
        "min_pool_size",
        "Minimum number of server connections kept open per pool",
        since=(1, 16),
    ),
    # pc's name; the column was renamed in 1.24 and pc lost the metric until it added the new name
    _db(
        "reserve_pool_size",
        "reserve_pool",
        "Maximum number of additional connections for this database",
        aliases=("reserve_pool",),
    ),
    _db(
        "server_lifetime",
        "server_lifetime_seconds",
        "Maximum lifetime of a server connection for this database in seconds (0 = the global setting)",
        since=(1, 23),
    ),
    _db(
        "max_connections",
        "max_connections",
        "Maximum server connections for this database (max_db_connections, 0 = unlimited)",
    ),
    _db("current_connections", "current_connections", "Current server connections for this database"),
    _db(
        "max_client_connections",
        "max_client_connections",
        "Maximum client connections for this database (max_db_client_connections, 0 = unlimited)",
        since=(1, 24),
    ),
    _db(
        "current_client_connections",
        "current_client_connections",
        "Current client connections for this database",
        since=(1, 24),
    ),
    _db("paused", "paused", "1 if this database is currently paused, else 0"),
    _db("disabled", "disabled", "1 if this database is currently disabled, else 0"),
    # -- SHOW LISTS: key/value rows. dns_pending is documented as "not used" and is skipped ---------
    _list("databases", "databases", "Count of databases"),
    _list("users", "users", "Count of users"),
    _list("pools", "pools", "Count of pools"),
    _list("peers", "peers", "Count of configured peers", since=(1, 19)),
    _list("peer_pools", "peer_pools", "Count of peer pools", since=(1, 19)),
    _list(
        "free_clients",
        "free_clients",
        "Count of free clients: an allocation cache of disconnected clients, not spare capacity",
    ),
    _list("used_clients", "used_clients", "Count of used clients"),
    _list("login_clients", "login_clients", "Count of clients in login state"),
    _list(
        "free_servers",
        "free_servers",
        "Count of free servers: an allocation cache of disconnected servers, not spare capacity",
    ),
    _list("used_servers", "used_servers", "Count of used servers"),
    _list("dns_names", "cached_dns_names", "Count of DNS names in the cache"),
    _list("dns_zones", "cached_dns_zones", "Count of DNS zones in the cache"),
    _list("dns_queries", "in_flight_dns_queries", "Count of in-flight DNS queries"),
    # -- SHOW CONFIG: only these keys, by name; time settings are shown in seconds by PgBouncer ------
    _config("max_client_conn", "max_client_connections", "Maximum number of client connections allowed"),
    _config(
        "max_user_connections",
        "max_user_connections",
        "Maximum number of server connections per user (0 = unlimited)",
    ),
    _config(
        "max_db_connections",
        "max_db_connections",
        "Maximum number of server connections per database (0 = unlimited)",
    ),
    _config(
        "max_db_client_connections",
        "max_db_client_connections",
        "Maximum number of client connections per database (0 = unlimited)",
        since=(1, 24),
    ),
    _config(
        "max_user_client_connections",
        "max_user_client_connections",
        "Maximum number of client connections per user (0 = unlimited)",
        since=(1, 24),
    ),
    _config("default_pool_size", "default_pool_size", "Server connections allowed per user/database pair"),
    _config("min_pool_size", "min_pool_size", "Server connections kept open per pool at least"),
    _config("reserve_pool_size", "reserve_pool_size", "Additional server connections allowed per pool"),
    _config(
        "reserve_pool_timeout",
        "reserve_pool_timeout_seconds",
        "Seconds a client waits before the reserve pool is used",
    ),
    _config(
        "max_prepared_statements",
        "max_prepared_statements",
        "Prepared statements tracked per server connection (0 = tracking off)",
        since=(1, 21),
    ),
    _config(
        "server_lifetime", "server_lifetime_seconds", "Seconds after which a server connection is closed"
    ),
    _config(
        "server_idle_timeout", "server_idle_timeout_seconds", "Seconds an idle server connection is kept"
    ),
    _config(
        "server_check_delay",
        "server_check_delay_seconds",
        "Seconds an idle server connection may be reused without server_check_query",
    ),
    _config(
        "server_connect_timeout",
        "server_connect_timeout_seconds",
        "Seconds allowed for connecting and logging in to PostgreSQL",
    ),
    _config(
        "query_wait_timeout",
        "query_wait_timeout_seconds",
        "Seconds a client may wait for a server before it is disconnected (0 = forever)",
    ),
    _config(
        "query_timeout", "query_timeout_seconds", "Seconds a query may run before it is cancelled (0 = off)"
    ),
    _config(
        "idle_transaction_timeout",
        "idle_transaction_timeout_seconds",
        "Seconds a client may stay idle in transaction (0 = off)",
    ),
    _config(
        "transaction_timeout",
        "transaction_timeout_seconds",
        "Seconds a transaction may last (0 = off)",
        since=(1, 25),
    ),
    _config(
        "client_idle_timeout",
        "client_idle_timeout_seconds",
        "Seconds an idle client connection is kept (0 = forever)",
    ),
)

#: SHOW CONFIG string settings exported as labels of ``pgbouncer_config_info``. An allowlist: other
#: keys may hold secrets (``auth_ldap_options`` can carry an LDAP bind password) or paths.
CONFIG_INFO_KEYS: tuple[str, ...] = (
    "pool_mode",
    "auth_type",
    "server_check_query",
    "server_reset_query",
    "server_reset_query_always",
    "server_round_robin",
    "server_tls_sslmode",
    "client_tls_sslmode",
    "ignore_startup_parameters",
    "so_reuseport",
)

#: SHOW CONFIG keys kept in ``PgBouncerObservation.config`` (the doctor reads them): the exported
#: keys plus a few more harmless ones. Same allowlist reasoning as above.
OBSERVED_CONFIG_KEYS: frozenset[str] = frozenset(
    [c.column for c in COLUMNS if c.command == "config"]
    + list(CONFIG_INFO_KEYS)
    + [
        "peer_id",
        "listen_port",
        "listen_addr",
        "unix_socket_dir",
        "stats_period",
        "client_login_timeout",
        "cancel_wait_timeout",
        "query_wait_notify",
        "server_fast_close",
        "server_login_retry",
        "track_extra_parameters",
        "application_name_add_host",
        "tcp_keepalive",
        "autodb_idle_timeout",
        "log_connections",
        "log_disconnections",
    ]
)


@dataclass(frozen=True, slots=True)
class DerivedMetric:
    """A metric that is not one column: an info gauge or an aggregate over SHOW CLIENTS/SERVERS."""

    metric: str
    kind: Literal["gauge", "info"]
    labels: tuple[str, ...]
    help: str
    source: str


DERIVED: tuple[DerivedMetric, ...] = (
    DerivedMetric(
        "pgbouncer_version_info",
        "info",
        (TARGET_LABEL, "version"),
        "PgBouncer version as SHOW VERSION prints it (a NOTICE before 1.12), always 1",
        "SHOW VERSION version",
    ),
    DerivedMetric(
        "pgbouncer_config_info",
        "info",
        (TARGET_LABEL, *CONFIG_INFO_KEYS),
        'Non-secret string settings of PgBouncer as labels ("" when the release lacks the key), always 1',
        "SHOW CONFIG " + ", ".join(CONFIG_INFO_KEYS),
    ),
    DerivedMetric(
        "pgbouncer_clients",
        "gauge",
        (TARGET_LABEL, "database", "user", "state"),
        "Client connections by state (active, idle, waiting, active_cancel_req, ...)",
        "SHOW CLIENTS count(*) by database, user, state",
    ),
    DerivedMetric(
        "pgbouncer_clients_oldest_connection_age_seconds",
        "gauge",
        (TARGET_LABEL, "database", "user"),
        "Age of the oldest client connection, in seconds",
        "SHOW CLIENTS now - min(connect_time)",
    ),
    DerivedMetric(
        "pgbouncer_clients_max_wait_seconds",
        "gauge",
        (TARGET_LABEL, "database", "user"),
        "Longest current wait of a client for a server connection, in seconds",
        "SHOW CLIENTS max(wait + wait_us/1e6)",
    ),
    DerivedMetric(
        "pgbouncer_servers",
        "gauge",
        (TARGET_LABEL, "database", "user", "state"),
        "Server connections by state (active, idle, used, tested, new, active_cancel, being_canceled)",
        "SHOW SERVERS count(*) by database, user, state",
    ),
    DerivedMetric(
        "pgbouncer_servers_oldest_connection_age_seconds",
        "gauge",
        (TARGET_LABEL, "database", "user"),
        "Age of the oldest server connection, in seconds (compare with server_lifetime)",
        "SHOW SERVERS now - min(connect_time)",
    ),
    DerivedMetric(
        "pgbouncer_servers_close_needed",
        "gauge",
        (TARGET_LABEL, "database", "user"),
        "Server connections to be closed as soon as possible (reload, DNS change, RECONNECT)",
        "SHOW SERVERS sum(close_needed)",
    ),
)


def columns_for(command: str) -> tuple[ColumnMetric, ...]:
    return tuple(c for c in COLUMNS if c.command == command)


#: Older column name → newest name, over all commands (no old name is reused for another column).
COLUMN_RENAMES: Mapping[str, str] = {alias: c.column for c in COLUMNS for alias in c.aliases}


@dataclass(frozen=True, slots=True)
class ReferenceRow:
    """One line of the README metrics reference."""

    name: str
    type: str
    labels: tuple[str, ...]
    help: str
    source: str
    since: str


def metrics_reference() -> Iterator[ReferenceRow]:
    """Every PgBouncer metric poolwatch can export, in table order, for generated documentation."""
    for c in COLUMNS:
        yield ReferenceRow(c.metric, c.kind, c.labels, c.help, c.source, f"{c.since[0]}.{c.since[1]}")
    for d in DERIVED:
        yield ReferenceRow(d.metric, d.kind, d.labels, d.help, d.source, "1.12")


def _check_table() -> None:
    """Fail at import on a table mistake that would otherwise become a bad scrape."""
    names = [c.metric for c in COLUMNS] + [d.metric for d in DERIVED]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise RuntimeError(f"pgbouncer_columns: metric defined twice: {sorted(duplicates)}")
    for c in COLUMNS:
        if (c.kind == "counter") != c.metric.endswith("_total"):
            raise RuntimeError(f"pgbouncer_columns: {c.metric}: counters and only counters end in _total")
    seen: dict[str, str] = {}
    for c in COLUMNS:
        for alias in c.aliases:
            if seen.setdefault(alias, c.column) != c.column:
                raise RuntimeError(f"pgbouncer_columns: alias {alias} used for two columns")


_check_table()
