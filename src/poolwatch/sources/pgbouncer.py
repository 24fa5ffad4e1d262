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
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import compress, repeat
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal, cast, overload

import psycopg
from prometheus_client.metrics_core import Metric
from psycopg import postgres
from psycopg.abc import Buffer
from psycopg.adapt import AdaptersMap, Loader, Transformer
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import Format
from psycopg.pq.abc import PGresult
from psycopg.rows import TupleRow
from psycopg.types.numeric import IntLoader

from poolwatch.errors import classify
from poolwatch.logs import scrub
from poolwatch.metrics import (
    BuildCache,
    CollectorOutcome,
    ColumnarFamily,
    ErrorReason,
    FamilyBuilder,
    LabelTable,
    SourceResult,
    as_float,
    family_size,
    label_column,
    label_text,
    numeric_column,
    prepack,
    prerender,
)
from poolwatch.sources.pgbouncer_columns import (
    COLUMN_RENAMES,
    COMMAND_LABELS,
    CONFIG_INFO_KEYS,
    DERIVED,
    MICROSECONDS,
    OBSERVED_CONFIG_KEYS,
    TARGET_LABEL,
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
    "PoolFilter",
    "Selection",
    "ShowResult",
    "Table",
    "aggregate_connection_columns",
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
    "parse_table",
    "parse_version",
    "select_pools",
    "table_from_columns",
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
#: The order the SHOWs are sent in (families keep ``COLLECTORS``' order). PgBouncer produces the
#: next SHOW while poolwatch builds the families of the previous one, so the one PgBouncer takes
#: longest over (SHOW CLIENTS: a row per client) goes while poolwatch builds the families that
#: take it longest (SHOW STATS), and the small ones go last.
_SENT_IN = ("version", "pools", "stats", "clients", "databases", "servers", "lists", "config")
EXECUTION_ORDER: tuple[tuple[str, str], ...] = tuple(sorted(COLLECTORS, key=lambda c: _SENT_IN.index(c[0])))

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


class Connections(Mapping[ConnKey, ConnectionGroup]):
    """SHOW CLIENTS or SHOW SERVERS aggregated per (database, user), stored by column.

    The families are made from the columns (a ``Counter`` of (database, user, state) and lists
    aligned with ``keys``); read as a mapping ``(database, user) → ConnectionGroup`` the groups
    are built on first use. 10,000 clients must not cost 10,000 objects per collection.
    """

    __slots__ = (
        "_groups",
        "close_needed",
        "group_keys",
        "max_wait_seconds",
        "oldest_connect_time",
        "state_counts",
    )

    def __init__(
        self,
        state_counts: Counter[tuple[str, str, str]],
        keys: list[ConnKey],
        oldest_connect_time: list[float | None],
        max_wait_seconds: list[float | None],
        close_needed: list[int],
    ) -> None:
        self.state_counts = state_counts  # (database, user, state) → connections, first seen first
        self.group_keys = keys  # every (database, user), first seen first; the lists below follow it
        self.oldest_connect_time = oldest_connect_time
        self.max_wait_seconds = max_wait_seconds
        self.close_needed = close_needed
        self._groups: dict[ConnKey, ConnectionGroup] | None = None

    @classmethod
    def from_groups(cls, groups: Mapping[ConnKey, ConnectionGroup]) -> Connections:
        if isinstance(groups, Connections):
            return groups
        counts: Counter[tuple[str, str, str]] = Counter()
        for (database, user), group in groups.items():
            for state, count in group.states.items():
                counts[(database, user, state)] = count
        values = list(groups.values())
        return cls(
            counts,
            list(groups),
            [g.oldest_connect_time for g in values],
            [g.max_wait_seconds for g in values],
            [g.close_needed for g in values],
        )

    def groups(self) -> dict[ConnKey, ConnectionGroup]:
        if self._groups is None:
            groups = {
                key: ConnectionGroup(oldest_connect_time=oldest, max_wait_seconds=wait, close_needed=close)
                for key, oldest, wait, close in zip(
                    self.group_keys,
                    self.oldest_connect_time,
                    self.max_wait_seconds,
                    self.close_needed,
                    strict=True,
                )
            }
            for (database, user, state), count in self.state_counts.items():
                groups[(database, user)].states[state] = count
            self._groups = groups
        return self._groups

    def __getitem__(self, key: ConnKey) -> ConnectionGroup:
        return self.groups()[key]

    def __iter__(self) -> Iterator[ConnKey]:
        return iter(self.group_keys)

    def __len__(self) -> int:
        return len(self.group_keys)


@dataclass(slots=True)
class PgBouncerObservation:
    """One collection of one PgBouncer, in PgBouncer's own vocabulary; what the pool doctor reads.

    Rows are read-only mappings keyed by the *newest* column name (``reserve_pool`` arrives as
    ``reserve_pool_size``, ``cl_cancel_req`` as ``cl_waiting_cancel_req``); values are int/float for
    numbers, str for text, None for NULL. A SHOW that failed leaves its field empty and is absent
    from ``collected``, so "empty" and "not readable" can be told apart. The source stores each
    SHOW as a ``Table`` (row tuples plus one column index: 10,000 pools must not cost 10,000
    dicts unless someone reads them as dicts); plain lists of dicts work everywhere too.
    """

    collected_at: float  # time.time() when the collection started
    version: str | None = None  # as SHOW VERSION prints it, e.g. "PgBouncer 1.24.1"
    version_tuple: tuple[int, int, int] | None = None
    #: SHOW CONFIG, only the allowlisted keys (OBSERVED_CONFIG_KEYS), raw text ("<empty>" → "")
    config: dict[str, str] = field(default_factory=dict)
    #: the same keys exactly as SHOW CONFIG printed them: keeps 1.25's ``<empty>`` (server_check_query
    #: "send an empty query", enabled) apart from ``""`` (check disabled); the pool doctor reads this
    config_raw: dict[str, str] = field(default_factory=dict)
    pools: Sequence[Row] = field(default_factory=list)  # SHOW POOLS
    stats: Sequence[Row] = field(default_factory=list)  # SHOW STATS (totals and averages, raw units)
    databases: Sequence[Row] = field(default_factory=list)  # SHOW DATABASES
    lists: dict[str, float] = field(default_factory=dict)  # SHOW LISTS, list name → items
    clients: Mapping[ConnKey, ConnectionGroup] = field(default_factory=dict)  # SHOW CLIENTS by (db, user)
    servers: Mapping[ConnKey, ConnectionGroup] = field(default_factory=dict)  # SHOW SERVERS by (db, user)
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


@dataclass(slots=True)
class ShowResult:
    """One SHOW's answer as columns: ``values`` holds one sequence of ``length`` values per column
    of ``names``, except that a column no one reads (``_READ_COLUMNS``) is left empty.

    Never a list of row tuples: a 10,000-row SHOW as rows is a tuple per row on top of the values.
    A SHOW that answers with no rows description (SHOW VERSION before 1.12) has no names.
    """

    names: list[str]
    values: list[Sequence[Any]]
    length: int

    @classmethod
    def from_rows(cls, names: Sequence[str], rows: Iterable[Sequence[Any]]) -> ShowResult:
        """Rows (tests, hand-made facts, the small SHOWs) as columns: transposed once, in C."""
        rows = rows if isinstance(rows, list) else list(rows)
        values: list[Sequence[Any]] = list(zip(*rows, strict=True)) if rows else [() for _ in names]
        return cls(list(names), values, len(rows))

    def rows(self) -> list[tuple[Any, ...]]:
        """As row tuples (the small SHOWs, whose every column is read)."""
        return list(zip(*self.values, strict=True)) if self.length else []


class Table(Sequence[Row]):
    """The result of one SHOW as columns (one tuple per column) plus one column index.

    ``columns`` are the newest column names (unique). Only columns are kept, never row tuples:
    families and the pool doctor read whole columns, and a 10,000-row SHOW held as rows costs a
    tuple per row on top of the values (megabytes that outlive the collection). Reading it as a
    sequence of rows (tests, hand-made facts) makes a plain dict per row on the fly.
    """

    __slots__ = ("_length", "_values", "columns", "positions")

    def __init__(self, columns: Sequence[str], rows: Iterable[Sequence[Value]]) -> None:
        result = ShowResult.from_rows(columns, rows)
        self._init(columns, result.values, result.length)

    def _init(self, columns: Sequence[str], values: Sequence[Sequence[Value]], length: int) -> None:
        self.columns = tuple(columns)
        self.positions: dict[str, int] = {name: i for i, name in enumerate(self.columns)}
        if len(values) != len(self.columns) or any(len(v) != length for v in values):
            raise ValueError(f"{len(self.columns)} columns of {length} rows expected")
        self._values = values
        self._length = length

    @classmethod
    def from_columns(cls, columns: Sequence[str], values: Sequence[Sequence[Value]], length: int) -> Table:
        table = cls.__new__(cls)
        table._init(columns, values, length)
        return table

    @classmethod
    def from_mappings(cls, rows: Iterable[Mapping[str, Value]]) -> Table:
        rows = list(rows)
        names = list(dict.fromkeys(name for row in rows for name in row))
        return cls(names, [tuple(row.get(name) for name in names) for row in rows])

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, i: int) -> Row: ...
    @overload
    def __getitem__(self, i: slice) -> list[Row]: ...
    def __getitem__(self, i: int | slice) -> Row | list[Row]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._length))]
        if i < 0:
            i += self._length
        if not 0 <= i < self._length:
            raise IndexError(i)
        return {name: values[i] for name, values in zip(self.columns, self._values, strict=True)}

    def __iter__(self) -> Iterator[Row]:
        columns = self.columns
        return (dict(zip(columns, row, strict=True)) for row in zip(*self._values, strict=True))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Table):
            return self.columns == other.columns and self._values == other._values
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def column(self, name: str) -> Sequence[Value] | None:
        """All values of one column (None if this release lacks it)."""
        at = self.positions.get(name)
        return None if at is None else self._values[at]

    def take(self, indexes: Sequence[int]) -> Table:
        """The rows at ``indexes``, in that order, as a new table."""
        if len(indexes) == 1:
            at = indexes[0]
            return Table.from_columns(self.columns, [(values[at],) for values in self._values], 1)
        if not indexes:
            return Table.from_columns(self.columns, [() for _ in self.columns], 0)
        pick = itemgetter(*indexes)
        return Table.from_columns(self.columns, [pick(values) for values in self._values], len(indexes))


def parse_table(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    previous: Table | None = None,
    strings: dict[Any, Any] | None = None,
) -> Table:
    """Result rows → a ``Table`` keyed by the newest column names (``table_from_columns``)."""
    return table_from_columns(ShowResult.from_rows(columns, rows), previous, strings)


def table_from_columns(
    result: ShowResult, previous: Table | None = None, strings: dict[Any, Any] | None = None
) -> Table:
    """A SHOW's columns → a ``Table`` keyed by the newest column names.

    Unknown columns are kept as they are (ignored downstream), so a new PgBouncer column never breaks
    parsing. If a release ever returned both an old and a new name, the new one wins. Decimal values
    (a driver without our numeric loader) become int/float, checked once per column, not per value.
    A column equal to ``previous``'s (the last collection's table of the same SHOW) is that column.
    Text columns hold one object per distinct value, shared through ``strings`` with the other
    tables of the same collection (a database's name is in SHOW POOLS, STATS and DATABASES).
    """
    values, length = result.values, result.length
    present = set(result.names)
    names = [
        new if (new := COLUMN_RENAMES.get(name)) is not None and new not in present else name
        for name in result.names
    ]
    if len(set(names)) != len(names):
        # duplicate column names: keep the first of each, as a dict would otherwise keep the last
        keep = [i for i, name in enumerate(names) if names.index(name) == i]
        names = [names[i] for i in keep]
        values = [values[i] for i in keep]
    if length:
        if previous is not None and len(previous) != length:
            previous = None
        values = [
            _settled(column, previous.column(name) if previous is not None else None, strings)
            for name, column in zip(names, values, strict=True)
        ]
    return Table.from_columns(names, values, length)


def _settled(
    column: Sequence[Any], previous: Sequence[Any] | None, strings: dict[Any, Any] | None = None
) -> Sequence[Any]:
    """One column as kept, holding as few objects as it can. Names, modes, hosts and idle counters
    rarely change: a column equal to the last collection's is that column (this one's copies are
    freed at once). A column with one value in every row (a user, a pool mode, a port) is that
    object repeated. A text column holds one object per distinct value (through ``strings``): the
    driver makes a new ``str`` per row, and SHOW POOLS's ``user`` or ``pool_mode`` has one value
    on every row but PgBouncer's own (10,000 copies of one word at 10,000 pools). Decimals (a
    driver without our numeric loader) become numbers."""
    if previous is not None and previous == column:
        return previous
    first, n = column[0], len(column)
    if isinstance(first, Decimal):
        return tuple(_number(v) if isinstance(v, Decimal) else v for v in column)
    if (
        type(first) in (str, int)
        and column[-1] == first
        and column[n // 2] == first
        and column.count(first) == n
    ):
        return (first,) * n
    if strings is not None and str in (type(first), type(column[n // 2]), type(column[-1])):
        return tuple(map(strings.setdefault, column, column))
    return column


def parse_rows(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[Row]:
    """Result rows → dicts keyed by the newest column names (``parse_table`` as plain dicts)."""
    return list(parse_table(columns, rows))


def _config_text(value: object) -> str:
    text = label_text(value)
    return "" if text == "<empty>" else text


def parse_config(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    keys: Collection[str] = OBSERVED_CONFIG_KEYS,
    *,
    raw: bool = False,
) -> dict[str, str]:
    """SHOW CONFIG (3 columns before 1.15, 4 after) → ``{key: value}`` for the wanted keys only.

    Located by column name, so the added ``default`` column is irrelevant; values stay text because
    some are not numbers (``auth_type``, ``pool_mode``). ``raw=True`` keeps ``<empty>`` as printed.
    """
    try:
        key_at, value_at = list(columns).index("key"), list(columns).index("value")
    except ValueError:
        return {}
    config: dict[str, str] = {}
    for row in rows:
        key = row[key_at]
        if isinstance(key, str) and key in keys:
            config[key] = label_text(row[value_at]) if raw else _config_text(row[value_at])
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


#: the SHOW CLIENTS / SHOW SERVERS columns ``aggregate_connections`` reads (the others need not be
#: loaded), and those it reads for the local endpoints
CONNECTION_COLUMNS = frozenset(
    {"database", "user", "state", "connect_time", "wait", "wait_us", "close_needed"}
)
ENDPOINT_COLUMNS = frozenset({"local_addr", "local_port"})


def aggregate_connections(
    columns: Sequence[str], rows: Iterable[Sequence[Any]], *, endpoints: bool = True
) -> tuple[Connections, set[tuple[str, int]]]:
    """SHOW CLIENTS / SHOW SERVERS rows → ``aggregate_connection_columns``."""
    return aggregate_connection_columns(ShowResult.from_rows(columns, rows), endpoints=endpoints)


def aggregate_connection_columns(
    result: ShowResult, *, endpoints: bool = True
) -> tuple[Connections, set[tuple[str, int]]]:
    """SHOW CLIENTS / SHOW SERVERS columns → aggregates per (database, user) and the local endpoints.

    A column the aggregation does not read (``CONNECTION_COLUMNS``, ``ENDPOINT_COLUMNS``) may be
    left empty in ``result``. Column by column rather
    than row by row: states are counted with a ``Counter``, and only the columns that are rarely
    non-zero (waits, close_needed) are walked in Python, at their non-zero rows. Connect times are
    compared as text (the format is fixed-width and sortable) and only each group's oldest is parsed.
    """
    cols, length = result.values, result.length
    index = {name: i for i, name in enumerate(result.names)}
    db_at, user_at, state_at = index.get("database"), index.get("user"), index.get("state")
    if db_at is None or user_at is None or not length:
        return Connections(Counter(), [], [], [], []), set()
    databases, users = label_column(cols[db_at]), label_column(cols[user_at])
    states = label_column(cols[state_at]) if state_at is not None else [""] * length
    pairs: list[ConnKey] = list(zip(databases, users, strict=True))
    state_counts = Counter(zip(databases, users, states, strict=True))
    keys: list[ConnKey] = list(dict.fromkeys(pairs))  # first seen first, as the Counter
    n = len(keys)
    position = dict(zip(keys, range(n), strict=True))
    oldest: list[float | None] = [None] * n
    connect_at = index.get("connect_time")
    if connect_at is not None:
        stamps = cols[connect_at]
        # one-second resolution: few distinct stamps, each parsed once
        parsed = {stamp: parse_pgbouncer_time(stamp) for stamp in set(stamps) if type(stamp) is str}
        if n == length:
            # one connection per (database, user), e.g. a client per pool: each is its group's oldest
            oldest = list(map(parsed.get, stamps))
        else:
            oldest_text: dict[ConnKey, str] = {}
            for key, stamp in zip(pairs, stamps, strict=True):
                if type(stamp) is str and (key not in oldest_text or stamp < oldest_text[key]):
                    oldest_text[key] = stamp
            for key, stamp in oldest_text.items():
                oldest[position[key]] = parsed[stamp]
    max_wait: list[float | None] = [None] * n
    wait_at = index.get("wait")
    if wait_at is not None:
        wait_us_at = index.get("wait_us")
        waits = cols[wait_at]
        waits_us = cols[wait_us_at] if wait_us_at is not None else (0,) * length
        if set(map(type, waits)) | set(map(type, waits_us)) <= {int}:
            max_wait = [0.0] * n  # ints everywhere: only the rows that wait need a look
            rows_to_read: Iterable[int] = sorted(
                set(compress(range(length), waits)) | set(compress(range(length), waits_us))
            )
        else:
            rows_to_read = range(length)
        for i in rows_to_read:
            seconds = as_float(waits[i])
            if seconds is None:
                continue
            if waits_us[i]:
                seconds += (as_float(waits_us[i]) or 0.0) / 1e6
            at = position[pairs[i]]
            current = max_wait[at]
            if current is None or seconds > current:
                max_wait[at] = seconds
    close_needed = [0] * n
    close_at = index.get("close_needed")
    if close_at is not None:
        for i in compress(range(length), cols[close_at]):
            close_needed[position[pairs[i]]] += int(as_float(cols[close_at][i]) or 0)
    local: set[tuple[str, int]] = set()
    laddr_at, lport_at = index.get("local_addr"), index.get("local_port")
    if endpoints and laddr_at is not None and lport_at is not None:  # SHOW SERVERS: the doctor's
        for addr, port in set(zip(cols[laddr_at], cols[lport_at], strict=True)):
            number = as_float(port)
            if isinstance(addr, str) and addr and number is not None:
                local.add((addr, int(number)))
    return Connections(state_counts, keys, oldest, max_wait, close_needed), local


# ------------------------------------------------------------------------------------------------
# Cardinality: which pools are exported
# ------------------------------------------------------------------------------------------------
def _any_of(patterns: Iterable[str]) -> re.Pattern[str] | None:
    patterns = list(patterns)
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


@dataclass(frozen=True, slots=True)
class PoolFilter:
    """Which pools' series are exported (the observation, and so the doctor, still sees all).

    Patterns are anchored regular expressions (they must match the whole name, as in Prometheus
    relabelling): a name is kept when it matches an ``include`` pattern (or there are none) and no
    ``exclude`` pattern. ``max_pools`` caps the pools exported (0: no cap); over the cap the first
    ones in (database, user) order are kept, so the exported set is stable from scrape to scrape.
    """

    include_databases: re.Pattern[str] | None = None
    exclude_databases: re.Pattern[str] | None = None
    include_users: re.Pattern[str] | None = None
    exclude_users: re.Pattern[str] | None = None
    max_pools: int = 0

    @classmethod
    def build(
        cls,
        *,
        include_databases: Iterable[str] = (),
        exclude_databases: Iterable[str] = (),
        include_users: Iterable[str] = (),
        exclude_users: Iterable[str] = (),
        max_pools: int = 0,
    ) -> PoolFilter:
        return cls(
            _any_of(include_databases),
            _any_of(exclude_databases),
            _any_of(include_users),
            _any_of(exclude_users),
            max_pools,
        )

    @property
    def has_patterns(self) -> bool:
        return any(
            p is not None
            for p in (self.include_databases, self.exclude_databases, self.include_users, self.exclude_users)
        )

    def database_allowed(self, name: str) -> bool:
        return _allowed(name, self.include_databases, self.exclude_databases)

    def user_allowed(self, name: str) -> bool:
        return _allowed(name, self.include_users, self.exclude_users)


def _allowed(name: str, include: re.Pattern[str] | None, exclude: re.Pattern[str] | None) -> bool:
    if include is not None and include.fullmatch(name) is None:
        return False
    return exclude is None or exclude.fullmatch(name) is None


@dataclass(slots=True)
class Selection:
    """The outcome of ``select_pools``: what to export of one observation, and what was dropped."""

    #: SHOW POOLS row indexes to export, in SHOW order; None: all of them
    pools: list[int] | None = None
    #: pools left out by the include/exclude patterns, and by ``max_pools``
    dropped_by_filter: int = 0
    dropped_by_cap: int = 0
    _filter: PoolFilter | None = None
    #: when the cap dropped pools: the exported pools and their databases
    _kept: set[ConnKey] | None = None
    _kept_databases: set[str] | None = None
    _memo: dict[tuple[int, str], bool] = field(default_factory=dict)

    @property
    def everything(self) -> bool:
        return self.pools is None

    def database_ok(self, name: str) -> bool:
        """SHOW STATS / SHOW DATABASES rows: the database passes the patterns (and, when the cap
        dropped pools, has an exported pool)."""
        if self._kept_databases is not None and name not in self._kept_databases:
            return False
        return self._test(0, name)

    def pool_ok(self, database: str, user: str) -> bool:
        """SHOW CLIENTS / SHOW SERVERS groups, by the same rules as the pools."""
        if self._kept is not None:
            return (database, user) in self._kept
        return self._test(0, database) and self._test(1, user)

    def _test(self, which: int, name: str) -> bool:
        pool_filter = self._filter
        if pool_filter is None or not pool_filter.has_patterns:
            return True
        key = (which, name)
        verdict = self._memo.get(key)
        if verdict is None:
            verdict = self._memo[key] = (
                pool_filter.database_allowed(name) if which == 0 else pool_filter.user_allowed(name)
            )
        return verdict


def _as_table(rows: Sequence[Mapping[str, Value]]) -> Table:
    return rows if isinstance(rows, Table) else Table.from_mappings(rows)


def select_pools(obs: PgBouncerObservation, pool_filter: PoolFilter | None) -> Selection:
    """Apply the cardinality guard to one observation's pools."""
    if pool_filter is None or (not pool_filter.has_patterns and pool_filter.max_pools <= 0):
        return Selection()
    table = _as_table(obs.pools)
    databases = label_column(table.column("database") or [None] * len(table))
    users = label_column(table.column("user") or [None] * len(table))
    keys: list[ConnKey] = list(zip(databases, users, strict=True))
    selection = Selection(_filter=pool_filter)
    if pool_filter.has_patterns:
        kept = [i for i, (db, user) in enumerate(keys) if selection._test(0, db) and selection._test(1, user)]
    else:
        kept = list(range(len(keys)))
    selection.dropped_by_filter = len(keys) - len(kept)
    if 0 < pool_filter.max_pools < len(kept):
        chosen = sorted(kept, key=keys.__getitem__)[: pool_filter.max_pools]
        selection.dropped_by_cap = len(kept) - len(chosen)
        kept = sorted(chosen)
        selection._kept = {keys[i] for i in kept}
        selection._kept_databases = {db for db, _ in selection._kept}
    if selection.dropped_by_filter or selection.dropped_by_cap:
        selection.pools = kept
    return selection


# ------------------------------------------------------------------------------------------------
# Observation → families
# ------------------------------------------------------------------------------------------------
def _family_name(metric: str, kind: str) -> str:
    # family names: prometheus-client (and our renderer) append _total / _info to samples
    if kind == "counter":
        return metric.removesuffix("_total")
    return metric.removesuffix("_info") if kind == "info" else metric


def _builder(
    metric: str, help_: str, kind: Literal["gauge", "counter", "info"], labels: Sequence[str]
) -> FamilyBuilder:
    return FamilyBuilder(_family_name(metric, kind), help_, kind, labels)


def _table_families(
    command: str,
    rows: Sequence[Mapping[str, Value]],
    target: str,
    keep: Sequence[int] | None = None,
    cache: BuildCache | None = None,
) -> list[Metric]:
    """The families of one SHOW, column by column: a column of the result is a family's values.

    Label values are made text, escaped and formatted once for all families of the SHOW (one
    ``LabelTable``); a column only has Python work per value when it holds NULLs or text.
    """
    specs = columns_for(command)
    if not rows or not specs:
        return []
    table = _as_table(rows)
    present = [spec for spec in specs if spec.column in table.positions]
    if not present:
        return []
    if keep is not None:
        table = table.take(keep)
    n = len(table)
    if n == 0:
        return []
    label_names = (TARGET_LABEL, *COMMAND_LABELS[command])
    sources = (target, *(table.column(name) for name in label_names[1:]))
    # the very label columns of last collection (parse_table keeps an unchanged column): its
    # label table, and its choice of rows if some were duplicates
    made = cache.made_from(command, sources) if cache is not None else None
    if made is None:
        made = _labels_for(command, label_names, sources, n, cache)
        if cache is not None:
            cache.keep(command, sources, made)
    labels, unique = cast(tuple[LabelTable, list[int] | None], made)
    if unique is not None:
        table = table.take(unique)
    return _value_families(command, table, labels, present, cache)


def _labels_for(
    command: str,
    label_names: tuple[str, ...],
    sources: tuple[Any, ...],
    n: int,
    cache: BuildCache | None,
) -> tuple[LabelTable, list[int] | None]:
    """The label table of a SHOW's rows (target, then its label columns) and, when some rows
    repeat a label set (some forks return duplicates), the rows kept: the first of each."""
    target = sources[0]
    label_values = [label_column(column or [None] * n) for column in sources[1:]]
    # the same label values as last time (checked unique then): last time's text, no checks
    labels = cache.lookup(command, label_names, [[target] * n, *label_values]) if cache else None
    if labels is not None:
        return labels, None
    unique: list[int] | None = None
    if len(set(zip(*label_values, strict=True))) != n:
        first: dict[tuple[str, ...], int] = {}
        for i, key in enumerate(zip(*label_values, strict=True)):
            first.setdefault(key, i)
        unique = sorted(first.values())
        label_values = [[column[i] for i in unique] for column in label_values]
        n = len(unique)
    labels = LabelTable(label_names, [[target] * n, *label_values])
    if cache is not None:
        cache.store(command, labels)
    return labels, unique


def _value_families(
    command: str, table: Table, labels: LabelTable, present: Sequence[ColumnMetric], cache: BuildCache | None
) -> list[Metric]:
    """One family per value column of ``table``, all with ``labels`` (one per row)."""
    families: list[Metric] = []
    for spec in present:
        column = table.column(spec.column)
        extra = table.column(spec.subsecond_us) if spec.subsecond_us is not None else None
        # the same label table and the same column objects as last collection: the same family
        inputs = (labels, column, extra)
        family_key = f"{command}:{spec.metric}"
        reused = cast(Metric | None, cache.made_from(family_key, inputs) if cache is not None else None)
        if reused is not None:
            families.append(reused)
            continue
        numbers, kept, integers = numeric_column(cast(Sequence[object], column))
        exponent = 0
        if extra is not None and any(extra):  # seconds plus a microseconds column
            extra = extra if kept is None else [extra[i] for i in kept]
            if integers and _all_int(extra):  # seconds + microseconds: exact microseconds
                whole = cast(Sequence[int], numbers)
                micros = cast(Sequence[int], extra)
                numbers = [v * 1_000_000 + us for v, us in zip(whole, micros, strict=True)]
                exponent = -6
            else:
                numbers = [
                    v + (as_float(us) or 0.0) / 1e6 if us else v for v, us in zip(numbers, extra, strict=True)
                ]
        if not exponent and spec.scale == MICROSECONDS and integers:
            exponent = -6  # written as 85817e-6: exact, and cheaper than a float's repr
        elif not exponent and spec.scale != 1.0:
            scale = spec.scale
            numbers = [v * scale for v in numbers]
        if not numbers:
            continue  # NULL everywhere: no samples, no family
        family_labels = labels if kept is None else labels.take(kept)
        name = _family_name(spec.metric, spec.kind)
        family = ColumnarFamily(name, spec.help, spec.kind, family_labels, numbers, exponent=exponent)
        families.append(family)
        if cache is not None:
            cache.keep(family_key, inputs, family)
    return families


def _all_int(values: Sequence[object]) -> bool:
    return set(map(type, values)) <= {int}


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


def _label_table(
    names: Sequence[str], columns: list[list[str]], cache_key: str, cache: BuildCache | None
) -> LabelTable:
    if cache is None:
        return LabelTable(names, columns)
    table = cache.lookup(cache_key, names, columns)
    if table is None:
        table = cache.store(cache_key, LabelTable(names, columns))
    return table


def _connection_families(
    groups: Mapping[ConnKey, ConnectionGroup],
    target: str,
    prefix: str,
    collected_at: float,
    selection: Selection,
    cache: BuildCache | None = None,
) -> list[Metric]:
    conns = Connections.from_groups(groups)
    triples: list[tuple[str, str, str]] = list(conns.state_counts)
    counts: list[int] = list(conns.state_counts.values())
    keys, oldest_times = conns.group_keys, conns.oldest_connect_time
    clients = prefix == "clients"
    extra_values: Sequence[float | None] = conns.max_wait_seconds if clients else conns.close_needed
    if not selection.everything:
        kept = [i for i, (database, user, _) in enumerate(triples) if selection.pool_ok(database, user)]
        triples, counts = [triples[i] for i in kept], [counts[i] for i in kept]
        kept = [i for i, (database, user) in enumerate(keys) if selection.pool_ok(database, user)]
        keys = [keys[i] for i in kept]
        oldest_times = [oldest_times[i] for i in kept]
        extra_values = [extra_values[i] for i in kept]
    families: list[Metric] = []
    if triples:
        d = _DERIVED[f"pgbouncer_{prefix}"]
        columns = [[target] * len(triples), *map(list, zip(*triples, strict=True))]
        labels = _label_table(d.labels, columns, d.metric, cache)
        family = ColumnarFamily(_family_name(d.metric, d.kind), d.help, d.kind, labels, counts)
        families.append(family)
    oldest_name = f"pgbouncer_{prefix}_oldest_connection_age_seconds"
    extra_name = "pgbouncer_clients_max_wait_seconds" if clients else "pgbouncer_servers_close_needed"
    if not keys:
        return families
    columns = [[target] * len(keys), *map(list, zip(*keys, strict=True))]
    per_key = _label_table(_DERIVED[oldest_name].labels, columns, oldest_name, cache)
    # ages in whole milliseconds, written as integers (not a float's repr per series); connect
    # times have one-second resolution, so each distinct one is converted once
    now_ms = collected_at * 1000
    age = {t: None if t is None else max(0, round(now_ms - t * 1000)) for t in set(oldest_times)}
    ages = list(map(age.__getitem__, oldest_times))
    values: Sequence[float | None]
    for name, values, exponent in ((oldest_name, ages, -3), (extra_name, extra_values, 0)):
        d = _DERIVED[name]
        if None in values:
            kept = [i for i, v in enumerate(values) if v is not None]
            family_labels, values = per_key.take(kept), [values[i] for i in kept]
        else:
            family_labels = per_key
        if values:
            family = ColumnarFamily(
                _family_name(d.metric, d.kind),
                d.help,
                d.kind,
                family_labels,
                cast(Sequence[int | float], values),  # no None left
                exponent=exponent,
            )
            families.append(family)
    if cache is not None:
        for made in families:  # never reused (ages move), but last time's bytes are let go now
            cache.keep(f"{prefix}:{made.name}", (object(),), made)
    return families


def _name_keep(rows: Sequence[Mapping[str, Value]], column: str, selection: Selection) -> list[int] | None:
    if selection.everything:
        return None
    names = label_column(_as_table(rows).column(column) or [None] * len(rows))
    return [i for i, name in enumerate(names) if selection.database_ok(name)]


def collector_families(
    name: str,
    obs: PgBouncerObservation,
    target: str,
    selection: Selection | None = None,
    cache: BuildCache | None = None,
) -> list[Metric]:
    """The families one collector's SHOW contributes (``families_from_observation`` for one of
    ``COLLECTORS``): a collection turns each SHOW into families as soon as its rows are in, while
    the next SHOW is in flight. Stats, databases and clients follow ``selection``'s pools;
    ``cache`` (one per target) reuses what the previous collection made from the same values."""
    selection = selection if selection is not None else Selection()
    if name == "version":
        if not obs.version:
            return []
        version = _derived("pgbouncer_version_info")
        version.add_prepared((target, obs.version), 1.0)
        return [version.build()]
    if name == "pools":
        return _table_families("pools", obs.pools, target, selection.pools, cache)
    if name == "stats":
        keep = _name_keep(obs.stats, "database", selection)
        return _table_families("stats", obs.stats, target, keep, cache)
    if name == "databases":
        keep = _name_keep(obs.databases, "name", selection)
        return _table_families("databases", obs.databases, target, keep, cache)
    if name == "lists":
        return [b.build() for b in _keyed_families(columns_for("lists"), obs.lists, target) if len(b)]
    if name == "config":
        builders = _keyed_families(columns_for("config"), obs.config, target)
        if obs.config:
            info = _derived("pgbouncer_config_info")
            info.add_prepared((target, *[obs.config.get(key, "") for key in CONFIG_INFO_KEYS]), 1.0)
            builders.append(info)
        return [b.build() for b in builders if len(b)]
    if name in ("clients", "servers") and name in obs.collected:
        groups = obs.clients if name == "clients" else obs.servers
        return _connection_families(groups, target, name, obs.collected_at, selection, cache)
    return []


def families_from_observation(
    obs: PgBouncerObservation, target: str, selection: Selection | None = None
) -> list[Metric]:
    """Every family of one observation, ``target`` first in every label set, no duplicate series.

    Rows are exported as they come, the ``pgbouncer`` pseudo-database included (as pc does). A
    duplicate (database, user) row — some forks return them — is dropped instead of making
    Prometheus reject the whole scrape. ``selection`` (``select_pools``) leaves pools out.
    """
    selection = selection if selection is not None else Selection()
    return [f for name, _ in COLLECTORS for f in collector_families(name, obs, target, selection)]


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
    found = tcp_listeners_netlink(endpoint.port) if proc_root == "/proc" else None
    if found is None:
        found = find_listeners(_read(f"{proc_root}/net/tcp"), endpoint.port)
        found += find_listeners(_read(f"{proc_root}/net/tcp6"), endpoint.port)
    return frozenset(f"inode:{x.inode}" for x in matching_listeners(found, endpoint.peer_ip))


_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_LISTEN = 10
_NLMSG_HEADER = struct.Struct("=IHHII")
_INET_DIAG_REQ = struct.Struct("=BBBBI48s")  # family, protocol, ext, pad, states, sockid
_INET_DIAG_MSG = struct.Struct("=BBBB2s2s16s16sI8sIIIII")  # ... sport, dport, src, dst, ..., inode


def tcp_listeners_netlink(port: int) -> list[Listener] | None:
    """LISTEN sockets on ``port`` in this network namespace, asked of the kernel (sock_diag, as
    ``ss -lt`` does); None when netlink is not available here.

    The kernel filters by state, so this costs the same with 20 connections or 20,000, unlike
    /proc/net/tcp, which lists every socket and which the watcher would read twice a second.
    """
    found: list[Listener] = []
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4) as sock:  # NETLINK_SOCK_DIAG
            sock.settimeout(1.0)
            for family in (socket.AF_INET, socket.AF_INET6):
                request = _INET_DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << _TCP_LISTEN, bytes(48))
                header = _NLMSG_HEADER.pack(
                    _NLMSG_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, 1, 0
                )
                sock.sendall(header + request)
                done = False
                while not done:
                    data = sock.recv(65536)
                    if not data:
                        return None
                    offset = 0
                    while offset + _NLMSG_HEADER.size <= len(data):
                        length, kind, _, _, _ = _NLMSG_HEADER.unpack_from(data, offset)
                        if length < _NLMSG_HEADER.size:
                            return None
                        if kind == _NLMSG_DONE:
                            done = True
                            break
                        if kind == _NLMSG_ERROR:
                            return None
                        body = offset + _NLMSG_HEADER.size
                        if kind == _SOCK_DIAG_BY_FAMILY and length - body + offset >= _INET_DIAG_MSG.size:
                            fields = _INET_DIAG_MSG.unpack_from(data, body)
                            if int.from_bytes(fields[4], "big") == port:
                                raw = fields[6][:4] if fields[0] == socket.AF_INET else fields[6]
                                address = socket.inet_ntop(fields[0], raw)
                                found.append(Listener(address, port, fields[-1]))
                        offset += (length + 3) & ~3
    except OSError:
        return None
    return found


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
    """PgBouncer sends its uint64 counters as ``numeric``: load them as int, not Decimal.

    The fallback for ``_load_rows``: the connection loads ``numeric`` with psycopg's C integer
    loader (PgBouncer's numerics are integers), 20-50x faster than a Python loader per value.
    """

    def load(self, data: Buffer) -> int | float:
        raw = bytes(data)
        try:
            return int(raw)
        except ValueError:
            return float(raw)


class _TextLoader(Loader):
    """Text as UTF-8 with replacement characters, never a decoding error.

    Database and user names are whatever bytes PgBouncer's config or clients used; one name in
    another encoding must not fail SHOW POOLS (and so ``up``) for every other pool. Only used when
    the C text loader (strict UTF-8) refused a result: see ``_load_rows``.
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
    #: the families of each collector's SHOW, made while the next SHOW was in flight
    families: dict[str, list[Metric]] = field(default_factory=dict)
    selection: Selection | None = None  # the cardinality guard's choice, once SHOW POOLS is in
    #: pre-render families in this format (True: OpenMetrics) as they are made; None: leave it
    render_openmetrics: bool | None = None
    prerendered: int = 0  # series pre-rendered so far
    packing: bool = False  # past the body budget: families are compressed instead (prepack)
    #: one object per distinct text value across this collection's SHOW tables (parse_table)
    strings: dict[Any, Any] = field(default_factory=dict)


class _ColumnsBuilder:
    """A SHOW's columns, appended one slice of rows at a time. Only a slice ever exists as row
    tuples. The driver makes a new ``str`` per row (10,000 copies of one user name at 10,000
    pools): a slice's text column with one value becomes that value's one object in ``strings``
    (the collection's one ``str`` per distinct value), and with ``intern_all`` so does every
    text value, so the copies go with their slice.
    """

    def __init__(
        self,
        names: list[str],
        wanted: Collection[str] | None,
        strings: dict[Any, Any],
        intern_all: bool = True,
    ) -> None:
        self.names = names
        self._intern_all = intern_all
        self._read = [wanted is None or name in wanted for name in names]
        self._values: list[list[Any]] = [[] for _ in names]
        self._length = 0
        self._strings = strings

    def add(self, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        intern, n = self._strings.setdefault, len(rows)
        for kept, read, column in zip(self._values, self._read, zip(*rows, strict=True), strict=True):
            if not read:
                continue
            first = column[0]
            if type(first) is str and column.count(first) == n:
                # one value in the whole slice (a user, a pool mode, a host): compared, not hashed
                kept.extend(repeat(intern(first, first), n))
            elif self._intern_all and (type(first) is str or type(column[-1]) is str):
                kept.extend(map(intern, column, column))
            else:
                kept.extend(column)
        self._length += n

    def result(self) -> ShowResult:
        # tuples, as parse_table's columns: a column equal to the last collection's is reused
        kept = zip(self._values, self._read, strict=True)
        values: list[Sequence[Any]] = [tuple(column) if read else () for column, read in kept]
        return ShowResult(self.names, values, self._length)


@dataclass(slots=True)
class _Answer:
    """A SHOW whose whole result has arrived, not loaded yet (``_load``), with what came along."""

    result: PGresult | None  # None: no rows description (SHOW VERSION before 1.12: a NOTICE)
    names: list[str]
    adapters: AdaptersMap
    notices: list[str]
    sent_at: float


#: What the fallback loads with: the Python loaders above, forgiving but slow.
_SAFE_ADAPTERS = AdaptersMap(psycopg.adapters)
_SAFE_ADAPTERS.register_loader("numeric", _NumericLoader)
_SAFE_ADAPTERS.register_loader("text", _TextLoader)


def _load_rows(
    result: PGresult,
    adapters: AdaptersMap,
    names: Sequence[str],
    wanted: Collection[str] | None = None,
    start: int = 0,
    stop: int | None = None,
) -> list[tuple[Any, ...]]:
    """Rows ``start:stop`` of ``result``, only the ``wanted`` columns loaded (None: all of them).

    The other columns come as ``False``/``True`` placeholders: psycopg's C boolean loader reads one
    byte and allocates nothing, where a text column costs a new ``str`` per row (SHOW CLIENTS has
    18 columns, its aggregation reads 6: loading 13.4 -> 8.5 ms at 10,000 clients). When the fast
    C loaders refuse the rows (text that is not UTF-8, a numeric that is not an integer), they are
    loaded again with the forgiving Python loaders.
    """
    stop = result.ntuples if stop is None else stop
    try:
        return _loaded(result, adapters, names, wanted, start, stop)
    except (ValueError, psycopg.DataError):  # UnicodeDecodeError is a ValueError
        return _loaded(result, _SAFE_ADAPTERS, names, wanted, start, stop)


def _loaded(
    result: PGresult,
    adapters: AdaptersMap,
    names: Sequence[str],
    wanted: Collection[str] | None,
    start: int,
    stop: int,
) -> list[tuple[Any, ...]]:
    tx = Transformer(adapters)
    if wanted is None:
        tx.set_pgresult(result)
    else:
        tx.set_pgresult(result, set_loaders=False)
        oids = [result.ftype(i) if name in wanted else _PLACEHOLDER_OID for i, name in enumerate(names)]
        tx.set_loader_types(oids, Format.TEXT)
    return tx.load_rows(start, stop, tuple)


def _load(
    answer: _Answer, wanted: Collection[str] | None, strings: dict[Any, Any], *, intern_all: bool = True
) -> ShowResult:
    """``answer``'s result as columns (only the ``wanted`` ones; None: all), loaded a slice of
    ``SLICE_ROWS`` rows at a time, and the result freed. Text values are interned through
    ``strings`` as in ``_ColumnsBuilder``."""
    result = answer.result
    if result is None:
        return ShowResult([], [], 0)
    builder = _ColumnsBuilder(answer.names, wanted, strings, intern_all)
    for start in range(0, result.ntuples, SLICE_ROWS):
        stop = min(start + SLICE_ROWS, result.ntuples)
        builder.add(_load_rows(result, answer.adapters, answer.names, wanted, start, stop))
    result.clear()  # libpq's copy of the rows, megabytes at thousands of pools: not kept till gc
    return builder.result()


#: Rows loaded at a time: a SHOW's rows never all exist as tuples (a tuple per row on top of the
#: values: megabytes at thousands of pools), only a slice of them.
SLICE_ROWS = 1000


#: loads a column the caller does not read: ``bool``'s C text loader allocates nothing
_PLACEHOLDER_OID = postgres.types["bool"].oid


WATCH_INTERVAL = 0.5
#: a SHOW result above this many rows is turned into families in a worker thread
_BIG = 1000
#: the columns read of the SHOWs poolwatch aggregates (``aggregate_connections``); the rest of
#: their columns are not loaded
_READ_COLUMNS: dict[str, frozenset[str]] = {
    "clients": CONNECTION_COLUMNS,
    "servers": CONNECTION_COLUMNS | ENDPOINT_COLUMNS,
}
#: the SHOWs kept as ``Table`` (the others are aggregated or small)
_TABLES = frozenset({"pools", "stats", "databases"})
#: the collectors whose families follow the cardinality guard's selection of pools
_SELECTED = frozenset({"pools", "stats", "databases", "clients", "servers"})


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
        pool_filter: PoolFilter | None = None,
    ) -> None:
        self.target = target
        #: the cardinality guard: which pools are exported (None: all)
        self.pool_filter = pool_filter
        params = conninfo_to_dict(conninfo)
        self._password = password if password is not None else _opt_str(params.get("password"))
        params.pop("password", None)  # it travels separately and never sits in a string we log
        params.setdefault("application_name", "poolwatch")
        self._conninfo = make_conninfo("", **params)
        self._user = _opt_str(params.get("user"))
        self._connect_timeout = connect_timeout
        self.hold_connection: HoldMode = hold_connection
        #: the exposition format families are pre-rendered in while the next SHOW is in flight
        #: (the engine sets it to the format the last scrape asked for); None: not pre-rendered
        self.render_openmetrics: bool | None = False
        #: the last SHOW POOLS / STATS / DATABASES tables: their unchanged columns are reused
        self._last_tables: dict[str, Table] = {}
        #: pre-render no more than this many series as text, compress the rest (0: no limit); the
        #: engine's cached-body limit
        self.prerender_series_max = 0
        self._build_cache = BuildCache()  # only touched by the collection holding the lock
        self._conn: psycopg.AsyncConnection[TupleRow] | None = None
        self._endpoint: _Endpoint | None = None
        self._lock = asyncio.Lock()
        self._inflight: asyncio.Task[SourceResult] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._notices: list[str] = []
        self._closed = False
        #: what the cardinality guard kept of the last observation
        self.last_selection: Selection | None = None
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
        run = _Run(PgBouncerObservation(collected_at=time.time()), render_openmetrics=self.render_openmetrics)
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
        dropped: Metric | None = None
        if run.connected:
            self.last_selection = self._selection(run)
            result.families = [f for name, _ in COLLECTORS for f in run.families.get(name, ())]
            if "pools" in run.obs.collected:
                dropped = self._dropped_family()
        up = FamilyBuilder(
            "pgbouncer_up", "1 if the admin console answered SHOW POOLS, else 0", "gauge", ("target",)
        )
        up.add((self.target,), 1.0 if result.up else 0.0)
        result.families.insert(0, up.build())
        if dropped is not None:
            result.families.append(dropped)
        return result

    def _selection(self, run: _Run) -> Selection:
        # SHOW POOLS comes before every SHOW whose families follow the selection
        if run.selection is None:
            run.selection = select_pools(run.obs, self.pool_filter)
        return run.selection

    def _dropped_family(self) -> Metric:
        selection = self.last_selection
        dropped = FamilyBuilder(
            "poolwatch_pools_dropped",
            "PgBouncer pools whose series were not exported in the last collection: reason filter "
            "(pgbouncers[].databases / users patterns) or max_pools (the cap)",
            "gauge",
            ("target", "reason"),
        )
        dropped.add((self.target, "filter"), selection.dropped_by_filter if selection else 0)
        dropped.add((self.target, "max_pools"), selection.dropped_by_cap if selection else 0)
        return dropped.build()

    async def _collect_locked(self, run: _Run, deadline: float) -> None:
        async with self._lock:
            try:
                reused = self.holding
                conn = await self._ensure_connection(run, deadline)
                if conn is None:
                    return
                run.conn = conn
                await self._run_collectors(run, conn, EXECUTION_ORDER[:1])
                if reused and run.failure is not None and not run.timed_out:
                    # A held connection can die while idle (PgBouncer restarted, its
                    # client_idle_timeout, a NAT timeout): not a down target. Reconnect once.
                    run.failure = None
                    run.outcomes.clear()
                    run.obs.collected.clear()
                    run.families.clear()
                    await self._drop_connection()
                    conn = await self._ensure_connection(run, deadline)
                    if conn is None:
                        return
                    run.conn = conn
                    await self._run_collectors(run, conn, EXECUTION_ORDER[:1])
                await self._run_collectors(run, conn, EXECUTION_ORDER[1:])
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
        # psycopg's C loaders (psycopg[binary]): integers for PgBouncer's numeric counters, strict
        # UTF-8 text; ``_show`` falls back to the forgiving Python loaders for a result they refuse
        conn.adapters.register_loader("numeric", IntLoader)
        conn.add_notice_handler(self._on_notice)
        return conn

    def _on_notice(self, diag: psycopg.errors.Diagnostic) -> None:
        if diag.message_primary:
            self._notices.append(diag.message_primary)

    async def _execute(self, conn: psycopg.AsyncConnection[TupleRow], command: str) -> _Answer:
        """Send one SHOW and wait for its whole result; its rows are loaded by ``_process`` later,
        while the next SHOW is in flight."""
        sent_at = time.perf_counter()
        self.queries_sent += 1
        self._notices.clear()
        cursor = conn.cursor()
        try:
            await cursor.execute(command, prepare=False)
            names = [d.name for d in cursor.description] if cursor.description is not None else []
            result = cursor.pgresult if cursor.description is not None else None
            return _Answer(result, names, cursor.adapters, list(self._notices), sent_at)
        finally:
            await cursor.close()

    def _send(self, conn: psycopg.AsyncConnection[TupleRow], command: str) -> asyncio.Task[_Answer]:
        return asyncio.create_task(self._execute(conn, command), name=f"pgbouncer-show-{self.target}")

    async def _run_collectors(
        self, run: _Run, conn: psycopg.AsyncConnection[TupleRow], collectors: Sequence[tuple[str, str]]
    ) -> None:
        """Run ``collectors`` in order, each SHOW sent as soon as the previous result is in.

        While PgBouncer answers the next SHOW, poolwatch loads the previous one's rows and turns
        them into families (in a worker thread when large): the two costs overlap instead of
        adding up. One query is outstanding at a time, as the simple query protocol requires.
        """
        pending: asyncio.Task[_Answer] | None = None
        try:
            for i, (name, command) in enumerate(collectors):
                if pending is None:
                    if run.failure is not None or run.timed_out:
                        reason, detail = run.failure or ("timeout", "the collection ran out of time first")
                        run.outcomes[name] = CollectorOutcome(name, False, 0.0, reason, detail)
                        continue
                    pending = self._send(conn, command)
                waited_from = time.perf_counter()
                try:
                    answer = await pending
                except psycopg.Error as exc:
                    pending = None
                    self._query_failed(run, conn, name, command, exc, waited_from)
                    continue
                pending = None
                if i + 1 < len(collectors) and not run.timed_out and not (conn.closed or conn.broken):
                    pending = self._send(conn, collectors[i + 1][1])
                    await asyncio.sleep(0)  # the task puts the query on the wire before we work
                await self._process(run, conn, name, command, answer)
        finally:
            if pending is not None and not pending.done():
                # cut off mid-pipeline (cancelled): the socket goes, the query with it
                _shutdown(conn)
                await asyncio.wait({pending}, timeout=1.0)
                pending.add_done_callback(_consume)
                run.failure = run.failure or ("timeout", "the collection was cut off")

    async def _process(
        self, run: _Run, conn: psycopg.AsyncConnection[TupleRow], name: str, command: str, answer: _Answer
    ) -> None:
        try:
            if answer.result is not None and answer.result.ntuples > _BIG:
                # several ms of CPU at thousands of pools: in a thread, so the event loop (the
                # next SHOW, HTTP, watchers, other targets) keeps getting turns meanwhile
                await asyncio.to_thread(self._load_absorb_and_build, run, name, answer)
            else:
                self._load_absorb_and_build(run, name, answer)
        except psycopg.Error as exc:
            self._query_failed(run, conn, name, command, exc, answer.sent_at)
            return
        except Exception as exc:  # a parsing bug costs one collector, not the target
            detail = scrub(f"{command}: could not parse the result: {type(exc).__name__}: {exc}")
            seconds = time.perf_counter() - answer.sent_at
            run.outcomes[name] = CollectorOutcome(name, False, seconds, "query", detail)
            return
        run.outcomes[name] = CollectorOutcome(name, True, time.perf_counter() - answer.sent_at)

    def _load_absorb_and_build(self, run: _Run, name: str, answer: _Answer) -> None:
        # a table's columns are interned by table_from_columns, after most are found equal to the
        # last collection's (and replaced by them: nothing to hash)
        tables = name in _TABLES
        result = _load(answer, _READ_COLUMNS.get(name), run.strings, intern_all=not tables)
        self._absorb(run.obs, name, result, answer.notices, run.strings)
        run.obs.collected.add(name)
        selection = self._selection(run) if name in _SELECTED else None
        families = collector_families(name, run.obs, self.target, selection, self._build_cache)
        if run.render_openmetrics is not None:
            budget = self.prerender_series_max
            if not run.packing and budget and run.prerendered + sum(map(family_size, families)) > budget:
                # a body this large is kept compressed, not as text (Snapshot.packed): what is
                # rendered so far is compressed now, and the rest as it comes
                run.packing = True
                for done in run.families.values():
                    prepack(done)
            if run.packing:
                prepack(families)
            else:
                run.prerendered += prerender(families, openmetrics=run.render_openmetrics)
        run.families[name] = families

    def _query_failed(
        self,
        run: _Run,
        conn: psycopg.AsyncConnection[TupleRow],
        name: str,
        command: str,
        exc: psycopg.Error,
        started: float,
    ) -> None:
        reason, detail = classify_pgbouncer_error(exc, self._password, self._user)
        if run.timed_out:
            reason, detail = "timeout", f"{command} did not finish before the collection deadline"
        if conn.closed or conn.broken:
            run.failure = (reason, detail)
        run.outcomes[name] = CollectorOutcome(name, False, time.perf_counter() - started, reason, detail)

    def _absorb(
        self,
        obs: PgBouncerObservation,
        name: str,
        result: ShowResult,
        notices: Sequence[str] = (),
        strings: dict[Any, Any] | None = None,
    ) -> None:
        names = result.names
        if name == "version":
            have = result.length and "version" in names
            text = label_text(result.values[names.index("version")][0]) if have else None
            if text is None:
                # before 1.12 SHOW VERSION answers with a NOTICE (pgbouncer_exporter #51)
                text = next((n for n in notices if _VERSION_RE.search(n)), None)
            if text is None:
                raise ValueError("SHOW VERSION returned neither a row nor a NOTICE")
            obs.version, obs.version_tuple = text, parse_version(text)
        elif name in _TABLES:
            table = table_from_columns(result, self._last_tables.get(name), strings)
            self._last_tables[name] = table
            setattr(obs, name, table)
        elif name == "lists":
            obs.lists = parse_lists(names, result.rows())
        elif name == "config":
            rows = result.rows()
            obs.config = parse_config(names, rows)
            obs.config_raw = parse_config(names, rows, raw=True)
        elif name == "clients":
            obs.clients, _ = aggregate_connection_columns(result, endpoints=False)
        elif name == "servers":
            obs.servers, obs.server_endpoints = aggregate_connection_columns(result)

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
