"""PgBouncer's admin console → a typed observation → Prometheus families.

Two layers:

* Pure functions (``parse_rows``, ``parse_config``, ``parse_lists``, ``aggregate_connections``,
  ``families_from_observation``, ``find_listeners``): no I/O, tested against real SHOW output of
  PgBouncer 1.18 … 1.25.
* ``PgBouncerSource``: the I/O shell. One admin connection per PgBouncer at most, simple query
  protocol only, every SHOW its own collector, the whole collection bounded by a deadline, and a
  held connection that never delays PgBouncer's shutdown.

What ``up`` means: the console connection works (login accepted) **and** ``SHOW POOLS``
succeeded. Pools are the core signal (waiting clients, saturation); every other SHOW can fail on
its own (older release, a fork without the command, a privilege) and only marks its collector
failed in ``poolwatch_collector_success`` — unlike pgbouncer_exporter, where one failed SHOW turns
the whole target "down".

Shutdown safety: PgBouncer 1.23+ on SIGTERM closes its listening sockets and then waits for every
client to disconnect, and an idle console connection is such a client. ``hold_connection="auto"``
keeps the connection only while PgBouncer's listening socket is visible in this network namespace
and a watcher (every 0.5 s, reading /proc, no network traffic) closes it the moment the listener
disappears; otherwise each collection connects and disconnects.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import ipaddress
import os
import re
import socket
import struct
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import psycopg
from prometheus_client.metrics_core import Metric
from psycopg.abc import Buffer
from psycopg.adapt import Loader
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

from poolwatch.errors import classify
from poolwatch.logs import scrub
from poolwatch.metrics import (
    CollectorOutcome,
    ErrorReason,
    FamilyBuilder,
    SourceResult,
    as_float,
    label_text,
)
from poolwatch.sources.pgbouncer_columns import (
    COLUMN_RENAMES,
    COMMAND_LABELS,
    CONFIG_INFO_KEYS,
    DERIVED,
    OBSERVED_CONFIG_KEYS,
    ColumnMetric,
    columns_for,
)

__all__ = [
    "COLLECTORS",
    "WATCH_INTERVAL",
    "ConnectionGroup",
    "HoldMode",
    "Listener",
    "PgBouncerObservation",
    "PgBouncerSource",
    "aggregate_connections",
    "classify_pgbouncer_error",
    "families_from_observation",
    "find_listeners",
    "listener_identity",
    "matching_listeners",
    "parse_config",
    "parse_lists",
    "parse_pgbouncer_time",
    "parse_rows",
    "parse_version",
]

#: A value as it sits in an observation row: numbers as int/float, text as str, NULL as None.
Value = str | int | float | None
Row = dict[str, Value]
ConnKey = tuple[str, str]  # (database, user)
HoldMode = Literal["auto", "always", "never"]

#: (collector name, command) in the order they run. ``pools`` comes early because ``up`` hangs on it;
#: the per-connection listings, the only ones that grow with client count, come last.
COLLECTORS: tuple[tuple[str, str], ...] = (
    ("version", "SHOW VERSION"),
    ("pools", "SHOW POOLS"),
    ("stats", "SHOW STATS"),
    ("databases", "SHOW DATABASES"),
    ("lists", "SHOW LISTS"),
    ("config", "SHOW CONFIG"),
    ("clients", "SHOW CLIENTS"),
    ("servers", "SHOW SERVERS"),
)
CORE_COLLECTOR = "pools"

_VERSION_RE = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


# ------------------------------------------------------------------------------------------------
# The observation
# ------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class ConnectionGroup:
    """SHOW CLIENTS or SHOW SERVERS rows of one (database, user), reduced to what deserves a series.

    Per-connection rows (address, port, pointer) are unbounded in number; these aggregates are not.
    """

    states: dict[str, int] = field(default_factory=dict)  # state → connections
    oldest_connect_time: float | None = None  # Unix seconds of the oldest connect_time
    max_wait_seconds: float | None = None  # clients: longest current wait (wait + wait_us/1e6)
    close_needed: int = 0  # servers: connections marked to close as soon as possible

    @property
    def total(self) -> int:
        return sum(self.states.values())


@dataclass(slots=True)
class PgBouncerObservation:
    """One collection of one PgBouncer, in PgBouncer's own vocabulary; what the pool doctor reads.

    Row dicts are keyed by the *newest* column name (``reserve_pool`` arrives as
    ``reserve_pool_size``, ``cl_cancel_req`` as ``cl_waiting_cancel_req``); values are int/float for
    numbers, str for text, None for NULL. A SHOW that failed leaves its field empty and is absent
    from ``collected``, so "empty" and "not readable" can be told apart.
    """

    collected_at: float  # time.time() when the collection started
    version: str | None = None  # as SHOW VERSION prints it, e.g. "PgBouncer 1.24.1"
    version_tuple: tuple[int, int, int] | None = None
    #: SHOW CONFIG, only the allowlisted keys (OBSERVED_CONFIG_KEYS), raw text ("<empty>" → "")
    config: dict[str, str] = field(default_factory=dict)
    pools: list[Row] = field(default_factory=list)  # SHOW POOLS
    stats: list[Row] = field(default_factory=list)  # SHOW STATS (totals and averages, raw units)
    databases: list[Row] = field(default_factory=list)  # SHOW DATABASES
    lists: dict[str, float] = field(default_factory=dict)  # SHOW LISTS, list name → items
    clients: dict[ConnKey, ConnectionGroup] = field(default_factory=dict)  # SHOW CLIENTS by (db, user)
    servers: dict[ConnKey, ConnectionGroup] = field(default_factory=dict)  # SHOW SERVERS by (db, user)
    #: (local_addr, local_port) of PgBouncer's server connections: lets the doctor recognise which
    #: PostgreSQL backends are pooled
    server_endpoints: set[tuple[str, int]] = field(default_factory=set)
    collected: set[str] = field(default_factory=set)  # collectors that succeeded


# ------------------------------------------------------------------------------------------------
# Pure parsing
# ------------------------------------------------------------------------------------------------
def parse_version(text: str | None) -> tuple[int, int, int] | None:
    """``"PgBouncer 1.24.1"`` (or an old NOTICE ``"PgBouncer version 1.9.0"``) → ``(1, 24, 1)``."""
    if not text:
        return None
    match = _VERSION_RE.search(text)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def _number(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


def parse_rows(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[Row]:
    """Result rows → dicts keyed by the newest column names.

    Unknown columns are kept as they are (ignored downstream), so a new PgBouncer column never breaks
    parsing. If a release ever returned both an old and a new name, the new one wins. Decimal values
    (a driver without our numeric loader) become int/float, checked once per column, not per value.
    """
    present = set(columns)
    names = [
        new if (new := COLUMN_RENAMES.get(name)) is not None and new not in present else name
        for name in columns
    ]
    if len(set(names)) != len(names):
        # duplicate column names: keep the first of each, as a dict would otherwise keep the last
        keep = [i for i, name in enumerate(names) if names.index(name) == i]
        names = [names[i] for i in keep]
        rows = [[row[i] for i in keep] for row in rows]
    out: list[Row] = [dict(zip(names, row, strict=False)) for row in rows]
    if out:
        decimals = [name for name, value in out[0].items() if isinstance(value, Decimal)]
        for name in decimals:
            for row in out:
                value = row[name]
                if isinstance(value, Decimal):
                    row[name] = _number(value)
    return out


def _config_text(value: object) -> str:
    text = label_text(value)
    return "" if text == "<empty>" else text


def parse_config(
    columns: Sequence[str], rows: Iterable[Sequence[Any]], keys: Collection[str] = OBSERVED_CONFIG_KEYS
) -> dict[str, str]:
    """SHOW CONFIG (3 columns before 1.15, 4 after) → ``{key: value}`` for the wanted keys only.

    Located by column name, so the added ``default`` column is irrelevant; values stay text because
    some are not numbers (``auth_type``, ``pool_mode``).
    """
    try:
        key_at, value_at = list(columns).index("key"), list(columns).index("value")
    except ValueError:
        return {}
    config: dict[str, str] = {}
    for row in rows:
        key = row[key_at]
        if isinstance(key, str) and key in keys:
            config[key] = _config_text(row[value_at])
    return config


def parse_lists(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> dict[str, float]:
    """SHOW LISTS rows (``list``, ``items``) → ``{list: items}``. Every list is kept."""
    try:
        name_at, items_at = list(columns).index("list"), list(columns).index("items")
    except ValueError:
        return {}
    lists: dict[str, float] = {}
    for row in rows:
        number = as_float(row[items_at])
        if number is not None and isinstance(row[name_at], str):
            lists.setdefault(row[name_at], number)
    return lists


_UTC_NAMES = frozenset({"UTC", "GMT", "UCT", "Z"})


def parse_pgbouncer_time(text: object) -> float | None:
    """``"2026-11-25 17:33:46 UTC"`` → Unix seconds.

    PgBouncer formats these with ``localtime_r`` and the zone *abbreviation* of its own process
    (``format_time_s``). UTC/GMT are exact; the abbreviation of poolwatch's own local zone is
    taken as local time; any other abbreviation is ambiguous and gives None (no sample) rather
    than a wrong age.
    """
    if not isinstance(text, str):
        return None
    parts = text.split(" ")
    if len(parts) != 3:
        return None
    date, clock, zone = parts
    try:
        fields = (
            int(date[0:4]),
            int(date[5:7]),
            int(date[8:10]),
            int(clock[0:2]),
            int(clock[3:5]),
            int(clock[6:8]),
        )
    except ValueError:
        return None
    if zone in _UTC_NAMES:
        return float(calendar.timegm((*fields, 0, 0, 0)))
    if zone in time.tzname:
        isdst = 1 if zone == time.tzname[1] and time.tzname[0] != time.tzname[1] else 0
        try:
            return time.mktime((*fields, 0, 0, isdst))
        except (OverflowError, ValueError):
            return None
    return None


def aggregate_connections(
    columns: Sequence[str], rows: Iterable[Sequence[Any]]
) -> tuple[dict[ConnKey, ConnectionGroup], set[tuple[str, int]]]:
    """SHOW CLIENTS / SHOW SERVERS → aggregates per (database, user) and the local endpoints.

    One pass, by column index computed once; connect times are compared as text (the format is
    fixed-width and sortable) and only each group's oldest is parsed.
    """
    index = {name: i for i, name in enumerate(columns)}
    db_at, user_at, state_at = index.get("database"), index.get("user"), index.get("state")
    if db_at is None or user_at is None:
        return {}, set()
    connect_at = index.get("connect_time")
    wait_at, wait_us_at = index.get("wait"), index.get("wait_us")
    close_at = index.get("close_needed")
    laddr_at, lport_at = index.get("local_addr"), index.get("local_port")
    groups: dict[ConnKey, ConnectionGroup] = {}
    oldest_text: dict[ConnKey, str] = {}
    endpoints: set[tuple[str, int]] = set()
    for row in rows:
        key = (label_text(row[db_at]), label_text(row[user_at]))
        group = groups.get(key)
        if group is None:
            group = groups[key] = ConnectionGroup()
        state = label_text(row[state_at]) if state_at is not None else ""
        group.states[state] = group.states.get(state, 0) + 1
        if connect_at is not None:
            stamp = row[connect_at]
            if isinstance(stamp, str) and (key not in oldest_text or stamp < oldest_text[key]):
                oldest_text[key] = stamp
        if wait_at is not None:
            wait = as_float(row[wait_at])
            if wait is not None:
                if wait_us_at is not None:
                    wait += (as_float(row[wait_us_at]) or 0.0) / 1e6
                if group.max_wait_seconds is None or wait > group.max_wait_seconds:
                    group.max_wait_seconds = wait
        if close_at is not None and row[close_at]:
            group.close_needed += int(as_float(row[close_at]) or 0)
        if laddr_at is not None and lport_at is not None:
            addr, port = row[laddr_at], as_float(row[lport_at])
            if isinstance(addr, str) and addr and port is not None:
                endpoints.add((addr, int(port)))
    for key, stamp in oldest_text.items():
        groups[key].oldest_connect_time = parse_pgbouncer_time(stamp)
    return groups, endpoints


# ------------------------------------------------------------------------------------------------
# Observation → families
# ------------------------------------------------------------------------------------------------
def _builder(
    metric: str, help_: str, kind: Literal["gauge", "counter", "info"], labels: Sequence[str]
) -> FamilyBuilder:
    # FamilyBuilder names are family names: prometheus-client appends _total / _info to samples
    name = metric.removesuffix("_total") if kind == "counter" else metric
    name = name.removesuffix("_info") if kind == "info" else name
    return FamilyBuilder(name, help_, kind, labels)


def _table_families(specs: Sequence[ColumnMetric], rows: Sequence[Row], target: str) -> list[FamilyBuilder]:
    """One pass over the rows of one SHOW; the column → builder plan is made once per result set."""
    if not rows or not specs:
        return []
    label_columns = COMMAND_LABELS[specs[0].command]
    first = rows[0]
    # only columns this release returns (checked on the first row: one result set, one shape)
    plan = [
        (
            spec.column,
            spec.scale,
            spec.subsecond_us if spec.subsecond_us in first else None,
            _builder(spec.metric, spec.help, spec.kind, spec.labels),
        )
        for spec in specs
        if spec.column in first
    ]
    for row in rows:
        labels = (target, *[label_text(row.get(c)) for c in label_columns])
        for column, scale, subsecond, builder in plan:
            number = as_float(row.get(column))
            if number is None:
                continue  # NULL → no sample
            if subsecond is not None:
                number += (as_float(row.get(subsecond)) or 0.0) / 1e6
            builder.add_prepared(labels, number * scale if scale != 1.0 else number)
    return [b for _, _, _, b in plan]


def _keyed_families(
    specs: Sequence[ColumnMetric], values: Mapping[str, object], target: str
) -> list[FamilyBuilder]:
    """SHOW LISTS / SHOW CONFIG: one label-less sample per wanted key."""
    builders = []
    for spec in specs:
        number = as_float(values.get(spec.column))
        if number is None:
            continue
        builder = _builder(spec.metric, spec.help, spec.kind, spec.labels)
        builder.add_prepared((target,), number * spec.scale)
        builders.append(builder)
    return builders


_DERIVED = {d.metric: d for d in DERIVED}


def _derived(metric: str) -> FamilyBuilder:
    d = _DERIVED[metric]
    return _builder(d.metric, d.help, d.kind, d.labels)


def _connection_families(
    groups: Mapping[ConnKey, ConnectionGroup], target: str, prefix: str, collected_at: float
) -> list[FamilyBuilder]:
    counts = _derived(f"pgbouncer_{prefix}")
    oldest = _derived(f"pgbouncer_{prefix}_oldest_connection_age_seconds")
    extra = (
        _derived("pgbouncer_clients_max_wait_seconds")
        if prefix == "clients"
        else _derived("pgbouncer_servers_close_needed")
    )
    for (database, user), group in groups.items():
        for state, count in group.states.items():
            counts.add_prepared((target, database, user, state), float(count))
        if group.oldest_connect_time is not None:
            oldest.add_prepared((target, database, user), max(0.0, collected_at - group.oldest_connect_time))
        if prefix == "clients":
            if group.max_wait_seconds is not None:
                extra.add_prepared((target, database, user), group.max_wait_seconds)
        else:
            extra.add_prepared((target, database, user), float(group.close_needed))
    return [counts, oldest, extra]


def families_from_observation(obs: PgBouncerObservation, target: str) -> list[Metric]:
    """Every family of one observation, ``target`` first in every label set, no duplicate series.

    Rows are exported as they come, the ``pgbouncer`` pseudo-database included (as pc does). A
    duplicate (database, user) row — some forks return them — is dropped by ``FamilyBuilder``
    instead of making Prometheus reject the whole scrape.
    """
    builders: list[FamilyBuilder] = []
    if obs.version:
        version = _derived("pgbouncer_version_info")
        version.add_prepared((target, obs.version), 1.0)
        builders.append(version)
    builders += _table_families(columns_for("pools"), obs.pools, target)
    builders += _table_families(columns_for("stats"), obs.stats, target)
    builders += _table_families(columns_for("databases"), obs.databases, target)
    builders += _keyed_families(columns_for("lists"), obs.lists, target)
    builders += _keyed_families(columns_for("config"), obs.config, target)
    if obs.config:
        info = _derived("pgbouncer_config_info")
        info.add_prepared((target, *[obs.config.get(key, "") for key in CONFIG_INFO_KEYS]), 1.0)
        builders.append(info)
    if "clients" in obs.collected:
        builders += _connection_families(obs.clients, target, "clients", obs.collected_at)
    if "servers" in obs.collected:
        builders += _connection_families(obs.servers, target, "servers", obs.collected_at)
    return [b.build() for b in builders if len(b)]


# ------------------------------------------------------------------------------------------------
# Is PgBouncer's listening socket visible from here? (/proc, pure parsing + a tiny reader)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Listener:
    """A LISTEN socket from /proc/net/tcp{,6}."""

    address: str  # "127.0.0.1", "0.0.0.0", "::", "::ffff:127.0.0.1"
    port: int
    inode: int


def _proc_address(hexaddr: str) -> str | None:
    # the kernel prints each 32-bit word of the (network-order) address as a native-endian integer
    try:
        if len(hexaddr) == 8:
            return socket.inet_ntop(socket.AF_INET, struct.pack("=I", int(hexaddr, 16)))
        if len(hexaddr) == 32:
            packed = b"".join(struct.pack("=I", int(hexaddr[i : i + 8], 16)) for i in range(0, 32, 8))
            return socket.inet_ntop(socket.AF_INET6, packed)
    except (ValueError, OSError, struct.error):
        return None
    return None


def find_listeners(proc_net_tcp: str, port: int) -> list[Listener]:
    """LISTEN sockets (state 0A) on ``port`` in the text of /proc/net/tcp or /proc/net/tcp6.

    Only lines containing the port are split: the file can hold tens of thousands of sockets
    (PgBouncer's own clients) and the watcher reads it twice a second.
    """
    needle = f":{port:04X} "
    found = []
    for line in proc_net_tcp.splitlines():
        if needle not in line:
            continue
        fields = line.split()
        # sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
        if len(fields) < 10 or fields[3] != "0A":
            continue
        local_hex, _, port_hex = fields[1].partition(":")
        if int(port_hex, 16) != port:
            continue
        address = _proc_address(local_hex)
        if address is not None:
            found.append(Listener(address, port, int(fields[9]) if fields[9].isdigit() else 0))
    return found


def _plain_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def matching_listeners(listeners: Iterable[Listener], peer_ip: str) -> list[Listener]:
    """Listeners that accept connections to ``peer_ip``: the same address or a wildcard.

    A v6 wildcard (``::``) also accepts IPv4 on a dual-stack socket, which /proc cannot tell apart,
    so it counts for both families.
    """
    peer = _plain_ip(peer_ip)
    matches = []
    for listener in listeners:
        ip = _plain_ip(listener.address)
        if ip == peer or (ip.is_unspecified and (ip.version == peer.version or ip.version == 6)):
            matches.append(listener)
    return matches


@dataclass(frozen=True, slots=True)
class _Endpoint:
    """Where the held connection goes, for the listener check."""

    peer_ip: str | None = None  # TCP: the address we are connected to, when it is in this host
    port: int = 0
    socket_path: str | None = None  # unix socket: the path, "@…" for the abstract namespace


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def listener_identity(endpoint: _Endpoint, proc_root: str = "/proc") -> frozenset[str]:
    """What identifies PgBouncer's listening socket(s) for ``endpoint`` now; empty if not visible.

    Blocking (reads /proc and stats a file): run it in a thread.
    """
    if endpoint.socket_path is not None:
        path = endpoint.socket_path
        if path.startswith("@"):
            # abstract namespace: no file, but /proc/net/unix lists it (with a leading "@")
            for line in _read(f"{proc_root}/net/unix").splitlines():
                fields = line.split()
                if len(fields) >= 8 and fields[7] == path:
                    return frozenset({f"unix:{fields[6]}"})
            return frozenset()
        try:
            st = os.stat(path)
        except OSError:
            return frozenset()
        return frozenset({f"file:{st.st_dev}:{st.st_ino}"})
    if endpoint.peer_ip is None:
        return frozenset()
    listeners = find_listeners(_read(f"{proc_root}/net/tcp"), endpoint.port)
    listeners += find_listeners(_read(f"{proc_root}/net/tcp6"), endpoint.port)
    return frozenset(f"inode:{x.inode}" for x in matching_listeners(listeners, endpoint.peer_ip))


def _endpoint_of(conn: psycopg.AsyncConnection[Any]) -> _Endpoint:
    """The connection's far end, or an empty endpoint when it is not on this host."""
    host = conn.info.host
    try:
        port = int(conn.info.port)
    except (TypeError, ValueError):
        port = 0
    if host.startswith("/") or host.startswith("@"):
        return _Endpoint(port=port, socket_path=f"{host.rstrip('/')}/.s.PGSQL.{port}")
    try:
        with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                return _Endpoint()
            peer, local = sock.getpeername(), sock.getsockname()
    except (OSError, psycopg.Error):
        return _Endpoint()
    peer_ip, local_ip = _plain_ip(str(peer[0])), _plain_ip(str(local[0]))
    # a listener on a wildcard address only tells us about PgBouncer if PgBouncer is on this host:
    # loopback, or a connection from this host to one of its own addresses
    if peer_ip.is_loopback or peer_ip == local_ip:
        return _Endpoint(peer_ip=str(peer_ip), port=int(peer[1]))
    return _Endpoint()


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------
_PGBOUNCER_ERRORS: tuple[tuple[str, ErrorReason, str], ...] = (
    (
        "password authentication failed",
        "auth",
        "wrong password for this user (or the user is missing from PgBouncer's auth_file)",
    ),
    (
        "sasl authentication failed",
        "auth",
        "wrong password for this user (or the user is missing from PgBouncer's auth_file)",
    ),
    (
        "not allowed",
        "privilege",
        "PgBouncer refused the admin console login: add this user to stats_users (or admin_users) "
        "in pgbouncer.ini and RELOAD",
    ),
    (
        "unrecognized configuration parameter",
        "config",
        "this is not PgBouncer's admin console (PostgreSQL itself, or an application database through "
        "PgBouncer, answered SHOW): connect to PgBouncer's port with dbname=pgbouncer",
    ),
    (
        "no such database",
        "config",
        "PgBouncer does not know this database: the admin console is the virtual database dbname=pgbouncer",
    ),
    (
        "admin access needed",
        "privilege",
        "this command needs an admin_users entry; stats_users may only run SHOW",
    ),
    (
        "extended query protocol",
        "query",
        "the admin console only speaks the simple query protocol",
    ),
    (
        "invalid command",
        "query",
        "this PgBouncer does not know the command (older release or a PgBouncer-compatible fork)",
    ),
)


def classify_pgbouncer_error(
    exc: BaseException, password: str | None = None, user: str | None = None
) -> tuple[ErrorReason, str]:
    """A reason class and an actionable one-line detail, free of passwords and DSNs.

    ``user`` (not a secret) makes the advice concrete: which user to add to stats_users.
    """
    raw = " ".join(str(exc).split())
    # what we echo of the server's text: no "password=..." and never the literal password (only
    # in the echoed text; our own advice may legitimately contain a word that is someone's password)
    said = scrub(_short(raw))
    if password:
        said = said.replace(password, "***")
    lowered = raw.lower()
    reason: ErrorReason
    for needle, known_reason, advice in _PGBOUNCER_ERRORS:
        if needle in lowered:
            if user:
                advice = advice.replace("this user", f"user {user!r}")
            return known_reason, f"{advice} (server said: {said})"
    if "failed to resolve host" in lowered or "name or service not known" in lowered:
        return "connect", f"the host name does not resolve ({said})"
    reason, detail = classify(exc)
    if password and password in raw:
        # classify() echoes the raw text; rebuild the detail around the cleaned text instead
        detail = f"{reason} error (server said: {said})"
    return reason, scrub(detail)


def _short(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------
# The I/O shell
# ------------------------------------------------------------------------------------------------
class _NumericLoader(Loader):
    """PgBouncer sends its uint64 counters as ``numeric``: load them as int, not Decimal."""

    def load(self, data: Buffer) -> int | float:
        raw = bytes(data)
        try:
            return int(raw)
        except ValueError:
            return float(raw)


class _TextLoader(Loader):
    """Text as UTF-8 with replacement characters, never a decoding error.

    Database and user names are whatever bytes PgBouncer's config or clients used; one name in
    another encoding must not fail SHOW POOLS (and so ``up``) for every other pool.
    """

    def load(self, data: Buffer) -> str:
        return bytes(data).decode("utf-8", "replace")


@dataclass
class _Run:
    """The state of one collection, shared with the deadline callback."""

    obs: PgBouncerObservation
    outcomes: dict[str, CollectorOutcome] = field(default_factory=dict)
    connected: bool = False
    timed_out: bool = False
    failure: tuple[ErrorReason, str] | None = None  # why the connection is unusable
    conn: psycopg.AsyncConnection[TupleRow] | None = None  # the connection this run uses


WATCH_INTERVAL = 0.5
#: above this many pools + client/server groups, families are built in a worker thread
_BIG = 1000


class PgBouncerSource:
    """Collects one PgBouncer through its admin console.

    At most one console connection exists at any time: collections take ``_lock`` and concurrent
    ``collect()`` calls share the in-flight collection (and its result) instead of queueing more.

    ``hold_connection``: ``"always"`` keeps the connection between collections, ``"never"`` logs
    in per collection, ``"auto"`` keeps it only while PgBouncer's listener is visible here (see the
    module docstring). Limitation of ``"auto"``: a local port-forwarder (docker-proxy, kubectl
    port-forward) keeps *its* listener when PgBouncer stops; use ``"never"`` behind one.
    ``queries_sent`` and ``connections_opened`` count round trips and logins (tests, bench).
    """

    kind = "pgbouncer"

    def __init__(
        self,
        target: str,
        conninfo: str,
        password: str | None,
        *,
        connect_timeout: float,
        hold_connection: HoldMode = "auto",
    ) -> None:
        self.target = target
        params = conninfo_to_dict(conninfo)
        self._password = password if password is not None else _opt_str(params.get("password"))
        params.pop("password", None)  # it travels separately and never sits in a string we log
        params.setdefault("application_name", "poolwatch")
        self._conninfo = make_conninfo("", **params)
        self._user = _opt_str(params.get("user"))
        self._connect_timeout = connect_timeout
        self.hold_connection: HoldMode = hold_connection
        self._conn: psycopg.AsyncConnection[TupleRow] | None = None
        self._endpoint: _Endpoint | None = None
        self._lock = asyncio.Lock()
        self._inflight: asyncio.Task[SourceResult] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._notices: list[str] = []
        self._closed = False
        #: round trips sent to PgBouncer since start (tests and the bench read this)
        self.queries_sent = 0
        #: console logins since start
        self.connections_opened = 0

    # -- public API ------------------------------------------------------------------------------
    @property
    def holding(self) -> bool:
        """Whether a console connection is open right now."""
        return self._conn is not None and not self._conn.closed

    async def collect(self, timeout: float) -> SourceResult:
        """One collection, bounded by ``timeout`` seconds; concurrent callers share it."""
        task = self._inflight
        if task is None or task.done():
            task = self._inflight = asyncio.create_task(
                self._collect_bounded(timeout), name=f"pgbouncer-collect-{self.target}"
            )
        # shield: a caller that gives up (scrape cancelled) does not cancel the others' collection
        return await asyncio.shield(task)

    async def close(self) -> None:
        """Close the console connection and stop the watcher; a later collect() never holds."""
        self._closed = True
        self._stop_watcher()
        task = self._inflight
        if task is not None and not task.done():
            self._abort_socket()
            await asyncio.wait({task}, timeout=1.0)
        await self._drop_connection()

    # -- one collection ----------------------------------------------------------------------------
    async def _collect_bounded(self, timeout: float) -> SourceResult:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        run = _Run(PgBouncerObservation(collected_at=time.time()))
        deadline = loop.time() + timeout
        work = asyncio.create_task(self._collect_locked(run, deadline))

        # At the deadline, shut the socket down instead of cancelling the task: psycopg answers a
        # cancellation during a query by opening a *second* connection for a CancelRequest and then
        # waiting up to 10 s. A shut-down socket makes the pending read fail at once instead.
        def expire() -> None:
            run.timed_out = True
            if run.conn is not None:
                _shutdown(run.conn)

        margin = min(0.1, timeout / 10)
        handle = loop.call_at(deadline - margin, expire)
        try:
            done, _ = await asyncio.wait({work}, timeout=max(0.0, deadline - loop.time()))
        finally:
            handle.cancel()
        if not done:
            # still connecting, or waiting for the lock: cancelling those is safe and immediate
            expire()
            work.cancel()
            work.add_done_callback(_consume)
        result = self._result(run, time.perf_counter() - started, timeout)
        if run.connected:
            obs = run.obs
            if len(obs.pools) + len(obs.clients) + len(obs.servers) > _BIG:
                # ~0.5 s of CPU at 10,000 pools: in a thread, so the event loop (HTTP, watchers,
                # other targets) keeps getting turns meanwhile
                result.families = await asyncio.to_thread(families_from_observation, obs, self.target)
            else:
                result.families = families_from_observation(obs, self.target)
        up = FamilyBuilder(
            "pgbouncer_up", "1 if the admin console answered SHOW POOLS, else 0", "gauge", ("target",)
        )
        up.add((self.target,), 1.0 if result.up else 0.0)
        result.families.insert(0, up.build())
        return result

    async def _collect_locked(self, run: _Run, deadline: float) -> None:
        async with self._lock:
            try:
                reused = self.holding
                conn = await self._ensure_connection(run, deadline)
                if conn is None:
                    return
                run.conn = conn
                await self._run_collector(run, conn, *COLLECTORS[0])
                if reused and run.failure is not None and not run.timed_out:
                    # A held connection can die while idle (PgBouncer restarted, its
                    # client_idle_timeout, a NAT timeout): not a down target. Reconnect once.
                    run.failure = None
                    run.outcomes.clear()
                    run.obs.collected.clear()
                    await self._drop_connection()
                    conn = await self._ensure_connection(run, deadline)
                    if conn is None:
                        return
                    run.conn = conn
                    await self._run_collector(run, conn, *COLLECTORS[0])
                for name, command in COLLECTORS[1:]:
                    await self._run_collector(run, conn, name, command)
                await self._decide_hold(run, conn)
            finally:
                if run.timed_out and run.conn is not None and run.conn is self._conn:
                    # cut off (possibly cancelled mid-query after the socket was shut down):
                    # this connection must not look reusable to the next collection
                    await self._drop_connection()

    async def _ensure_connection(
        self, run: _Run, deadline: float
    ) -> psycopg.AsyncConnection[TupleRow] | None:
        conn = self._conn
        if conn is not None and (conn.closed or conn.broken):
            await self._drop_connection()
            conn = None
        if conn is None:
            loop = asyncio.get_running_loop()
            budget = max(0.001, min(self._connect_timeout, deadline - loop.time()))
            try:
                async with asyncio.timeout(budget):
                    conn = await self._connect()
            except TimeoutError:
                run.failure = ("timeout", f"connecting took longer than {budget:.3g}s")
                if budget >= self._connect_timeout:
                    run.failure = (
                        "timeout",
                        f"connecting took longer than connect_timeout ({self._connect_timeout:g}s)",
                    )
                return None
            except Exception as exc:
                run.failure = classify_pgbouncer_error(exc, self._password, self._user)
                return None
            self._conn = conn
            self._endpoint = None
        run.connected = True
        return conn

    async def _connect(self) -> psycopg.AsyncConnection[TupleRow]:
        self.connections_opened += 1
        kwargs: dict[str, Any] = {}
        if self._password is not None:
            kwargs["password"] = self._password
        conn = await psycopg.AsyncConnection.connect(
            self._conninfo,
            autocommit=True,  # no BEGIN: the console has no transactions
            prepare_threshold=None,  # never prepare: the console refuses the extended protocol
            cursor_factory=psycopg.AsyncClientCursor,  # simple query protocol
            **kwargs,
        )
        conn.adapters.register_loader("numeric", _NumericLoader)
        conn.adapters.register_loader("text", _TextLoader)
        conn.add_notice_handler(self._on_notice)
        return conn

    def _on_notice(self, diag: psycopg.errors.Diagnostic) -> None:
        if diag.message_primary:
            self._notices.append(diag.message_primary)

    async def _show(
        self, conn: psycopg.AsyncConnection[TupleRow], command: str
    ) -> tuple[list[str], list[TupleRow]]:
        self.queries_sent += 1
        async with conn.cursor() as cur:
            await cur.execute(command, prepare=False)
            if cur.description is None:  # e.g. SHOW VERSION before 1.12: a NOTICE, no rows
                return [], []
            columns = [d.name for d in cur.description]
            return columns, await cur.fetchall()

    async def _run_collector(
        self, run: _Run, conn: psycopg.AsyncConnection[TupleRow], name: str, command: str
    ) -> None:
        if run.failure is not None or run.timed_out:
            reason, detail = run.failure or ("timeout", "the collection ran out of time first")
            run.outcomes[name] = CollectorOutcome(name, False, 0.0, reason, detail)
            return
        started = time.perf_counter()
        self._notices.clear()
        try:
            columns, rows = await self._show(conn, command)
            self._absorb(run.obs, name, columns, rows)
        except psycopg.Error as exc:
            reason, detail = classify_pgbouncer_error(exc, self._password, self._user)
            if run.timed_out:
                reason, detail = "timeout", f"{command} did not finish before the collection deadline"
            if conn.closed or conn.broken:
                run.failure = (reason, detail)
            run.outcomes[name] = CollectorOutcome(name, False, time.perf_counter() - started, reason, detail)
            return
        except Exception as exc:  # a parsing bug costs one collector, not the target
            detail = scrub(f"{command}: could not parse the result: {type(exc).__name__}: {exc}")
            run.outcomes[name] = CollectorOutcome(name, False, time.perf_counter() - started, "query", detail)
            return
        run.obs.collected.add(name)
        run.outcomes[name] = CollectorOutcome(name, True, time.perf_counter() - started)

    def _absorb(self, obs: PgBouncerObservation, name: str, columns: list[str], rows: list[TupleRow]) -> None:
        if name == "version":
            text = label_text(rows[0][columns.index("version")]) if rows and "version" in columns else None
            if text is None:
                # before 1.12 SHOW VERSION answers with a NOTICE (pgbouncer_exporter #51)
                text = next((n for n in self._notices if _VERSION_RE.search(n)), None)
            if text is None:
                raise ValueError("SHOW VERSION returned neither a row nor a NOTICE")
            obs.version, obs.version_tuple = text, parse_version(text)
        elif name in ("pools", "stats", "databases"):
            setattr(obs, name, parse_rows(columns, rows))
        elif name == "lists":
            obs.lists = parse_lists(columns, rows)
        elif name == "config":
            obs.config = parse_config(columns, rows)
        elif name == "clients":
            obs.clients, _ = aggregate_connections(columns, rows)
        elif name == "servers":
            obs.servers, obs.server_endpoints = aggregate_connections(columns, rows)

    def _result(self, run: _Run, seconds: float, timeout: float) -> SourceResult:
        late: tuple[ErrorReason, str] = ("timeout", f"no answer within {timeout:g}s")
        for name, _ in COLLECTORS:  # collectors that never ran: no connection, or cut off
            if name not in run.outcomes:
                why = late if (run.timed_out and run.connected) else (run.failure or late)
                run.outcomes[name] = CollectorOutcome(name, False, 0.0, *why)
        core = run.outcomes[CORE_COLLECTOR]
        up = run.connected and core.ok
        reason: ErrorReason | None = None
        detail: str | None = None
        if not up:
            if not run.connected and run.failure is not None:
                reason, detail = run.failure
            elif not run.connected:
                reason, detail = "timeout", f"no connection within {timeout:g}s"
            else:
                reason, detail = core.reason, core.detail
        return SourceResult(
            target=self.target,
            kind=self.kind,
            up=up,
            outcomes=[run.outcomes[name] for name, _ in COLLECTORS],
            reason=reason,
            detail=detail,
            seconds=seconds,
            observation=run.obs if run.connected else None,
        )

    # -- holding the connection, and letting go of it -----------------------------------------------
    async def _decide_hold(self, run: _Run, conn: psycopg.AsyncConnection[TupleRow]) -> None:
        core = run.outcomes.get(CORE_COLLECTOR)
        if run.failure is not None or run.timed_out or conn.closed or conn.broken or not (core and core.ok):
            # also when SHOW POOLS failed: a DSN pointing at PostgreSQL or an application
            # database must not keep a connection (and through PgBouncer, a server) busy
            await self._drop_connection()
            return
        mode = "never" if self._closed else self.hold_connection
        if mode == "always":
            return
        if mode == "never":
            await self._drop_connection()
            return
        if self._endpoint is None:
            self._endpoint = _endpoint_of(conn)
        identity = await asyncio.to_thread(listener_identity, self._endpoint)
        if not identity:
            await self._drop_connection()
            return
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(
                self._watch(self._endpoint, identity), name=f"pgbouncer-listener-watch-{self.target}"
            )

    async def _watch(self, endpoint: _Endpoint, identity: frozenset[str]) -> None:
        """Close the held connection as soon as PgBouncer's listener is gone (shutdown begun)."""
        while self._conn is not None and not self._conn.closed:
            await asyncio.sleep(WATCH_INTERVAL)
            now = await asyncio.to_thread(listener_identity, endpoint)
            if identity <= now:
                continue
            if self._lock.locked():
                # a collection is running; it re-checks the listener at its end and lets go then
                continue
            async with self._lock:
                await self._drop_connection(stop_watcher=False)
            return

    def _stop_watcher(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None and not watcher.done() and watcher is not asyncio.current_task():
            watcher.cancel()

    async def _drop_connection(self, *, stop_watcher: bool = True) -> None:
        conn, self._conn = self._conn, None
        self._endpoint = None
        if stop_watcher:
            self._stop_watcher()
        if conn is not None and not conn.closed:
            with contextlib.suppress(Exception):
                await conn.close()

    def _abort_socket(self) -> None:
        if self._conn is not None:
            _shutdown(self._conn)


def _shutdown(conn: psycopg.AsyncConnection[Any]) -> None:
    """Make every pending read on ``conn`` return at once, without closing the descriptor.

    ``shutdown()`` acts on the connection shared by all duplicates of the descriptor, so a dup is
    enough and psycopg's own descriptor stays valid (closing it under a registered reader would
    be unsafe).
    """
    if conn.closed:
        return
    try:
        fd = conn.pgconn.socket
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, psycopg.Error):
        pass


def _consume(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)
