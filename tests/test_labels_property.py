"""Label values survive exposition whatever a database, user or application is called.

Property-based (hypothesis): rows as PgBouncer's console and PostgreSQL return them, with names made of
quotes, backslashes, newlines, any unicode, empty strings and NULLs, go through the same functions
the sources use (``parse_rows``/``parse_config``/``aggregate_connections`` → ``families_from_observation``;
``build_observation`` → ``observation_families``), are rendered by prometheus-client (text format and
OpenMetrics) and parsed back: every sample comes back with the same labels and value, no series is
duplicated, and sums over label values equal the input (nothing silently dropped).

Live: a PgBouncer database whose PostgreSQL name has a double quote, a single quote, a space and
non-ASCII letters (PgBouncer 1.18 and 1.24 accept such a name only as a ``dbname=`` value, and as a
pool name a client picks through the ``*`` fallback entry), and a client whose application_name
holds a newline (PostgreSQL itself turns non-printable characters into ``?``).
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from psycopg.conninfo import make_conninfo

from poolwatch.localcluster import PostgresServer
from poolwatch.sources.pgbouncer import (
    COLLECTORS,
    PgBouncerObservation,
    aggregate_connections,
    families_from_observation,
    parse_config,
    parse_rows,
)
from poolwatch.sources.pgbouncer_columns import CONFIG_INFO_KEYS
from poolwatch.sources.postgres import ACTIVITY_STATES, build_observation, observation_families
from tests.conftest import MakePgBouncer
from tests.console_columns import POOL_COLUMNS
from tests.daemon import make_config, pgbouncer_target, postgres_target, running_daemon

SampleKey = tuple[str, frozenset[tuple[str, str]]]

# -- names ----------------------------------------------------------------------------------------
TRICKY = [
    'a"b',
    "back\\slash",
    "new\nline",
    "\\n",
    '\\"',
    "ü 漢字 ✓",
    "",
    " ",
    '{x="y"}',
    "tab\tcr\r",
    "__other__",
]
names = st.one_of(st.sampled_from(TRICKY), st.text(max_size=12))
nonempty_names = names.filter(bool)
counts = st.integers(min_value=0, max_value=2**40)
FEW = ['d"b', "ü\n"]


# -- render and parse back ------------------------------------------------------------------------
class _Families:
    def __init__(self, families: Sequence[Metric]) -> None:
        self.families = families

    def collect(self) -> Sequence[Metric]:
        return self.families


def _registry(families: Sequence[Metric]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return registry


def _original(families: Sequence[Metric]) -> dict[SampleKey, float]:
    out: dict[SampleKey, float] = {}
    for family in families:
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate series before rendering: {key}"
            out[key] = s.value
    return out


def _parsed(parsed_families: Any) -> dict[SampleKey, float]:
    out: dict[SampleKey, float] = {}
    for family in parsed_families:
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate series after parsing: {key}"
            out[key] = s.value
    return out


def assert_round_trip(families: Sequence[Metric]) -> dict[SampleKey, float]:
    original = _original(families)
    text = generate_latest(_registry(families)).decode("utf-8")
    assert _parsed(text_string_to_metric_families(text)) == original
    openmetrics = generate_openmetrics(_registry(families)).decode("utf-8")
    assert _parsed(parse_openmetrics(openmetrics)) == original
    return original


def values_of(samples: dict[SampleKey, float], name: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(labels), value) for (n, labels), value in samples.items() if n == name]


# ------------------------------------------------------------------------------------------------
# PgBouncer: console rows → observation → families
# ------------------------------------------------------------------------------------------------
STATS_COLUMNS = [
    "database",
    "total_xact_count",
    "total_query_count",
    "total_received",
    "total_sent",
    "total_wait_time",
]
DATABASE_COLUMNS = [
    "name",
    "host",
    "port",
    "database",
    "force_user",
    "pool_size",
    "min_pool_size",
    "reserve_pool",
    "max_connections",
    "current_connections",
    "pool_mode",
    "paused",
    "disabled",
]
CLIENT_COLUMNS = [
    "type",
    "user",
    "database",
    "state",
    "addr",
    "port",
    "local_addr",
    "local_port",
    "connect_time",
    "request_time",
    "wait",
    "wait_us",
    "close_needed",
    "ptr",
    "link",
    "remote_pid",
    "tls",
    "application_name",
]


@st.composite
def console_rows(draw: st.DrawFn) -> dict[str, Any]:
    pairs = draw(st.lists(st.tuples(names, names), max_size=6, unique=True))
    pools = [
        (
            db,
            user,
            *draw(st.lists(counts, min_size=11, max_size=11)),
            draw(counts),
            draw(st.integers(0, 999999)),
            draw(st.one_of(st.none(), names)),
        )
        for db, user in pairs
    ]
    dbs = sorted({db for db, _ in pairs})
    stats = [(db, *draw(st.lists(counts, min_size=5, max_size=5))) for db in dbs]
    databases = [
        (
            name,
            draw(st.one_of(st.none(), names)),
            draw(st.integers(1, 65535)),
            draw(names),
            draw(st.one_of(st.none(), names)),
            *draw(st.lists(st.integers(0, 1000), min_size=5, max_size=5)),
            draw(st.one_of(st.none(), names)),
            draw(st.integers(0, 1)),
            draw(st.integers(0, 1)),
        )
        for name in draw(st.lists(names, max_size=5, unique=True))
    ]
    clients = (
        [
            (
                "C",
                user,
                db,
                draw(names),
                "127.0.0.1",
                5000,
                "127.0.0.1",
                6432,
                "2026-11-25 17:33:46 UTC",
                "2026-11-25 17:33:47 UTC",
                draw(st.integers(0, 5)),
                draw(st.integers(0, 999999)),
                0,
                "0x1",
                None,
                0,
                None,
                draw(names),
            )
            for db, user in draw(st.lists(st.sampled_from(pairs), max_size=8))
            if pairs
        ]
        if pairs
        else []
    )
    config = [(key, draw(names), "", "yes") for key in CONFIG_INFO_KEYS]
    config += [("max_client_conn", str(draw(st.integers(1, 10**6))), "100", "yes")]
    return {
        "pools": pools,
        "stats": stats,
        "databases": databases,
        "clients": clients,
        "config": config,
        "version": draw(names),
        "target": draw(nonempty_names),
    }


def pgbouncer_families(rows: dict[str, Any]) -> tuple[list[Metric], PgBouncerObservation]:
    obs = PgBouncerObservation(collected_at=1_800_000_000.0)
    obs.version = rows["version"]
    obs.pools = parse_rows(POOL_COLUMNS, rows["pools"])
    obs.stats = parse_rows(STATS_COLUMNS, rows["stats"])
    obs.databases = parse_rows(DATABASE_COLUMNS, rows["databases"])
    obs.config = parse_config(["key", "value", "default", "changeable"], rows["config"])
    obs.clients, _ = aggregate_connections(CLIENT_COLUMNS, rows["clients"])
    obs.servers, obs.server_endpoints = aggregate_connections(CLIENT_COLUMNS, [])
    obs.collected = {name for name, _ in COLLECTORS}
    return families_from_observation(obs, rows["target"]), obs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(console_rows())
def test_pgbouncer_labels_round_trip(rows: dict[str, Any]) -> None:
    families, _ = pgbouncer_families(rows)
    samples = assert_round_trip(families)
    target = rows["target"]
    # every pool row is its own series, with its names exactly as PgBouncer gave them
    active = {
        (labels["database"], labels["user"]): value
        for labels, value in values_of(samples, "pgbouncer_pools_client_active_connections")
    }
    assert active == {(row[0], row[1]): float(row[2]) for row in rows["pools"]}
    assert all(labels["target"] == target for (_, ls) in samples for labels in [dict(ls)])
    # client connections are aggregated per (database, user, state), none lost
    per_state = Counter((row[2], row[1], row[3]) for row in rows["clients"])
    got = {
        (labels["database"], labels["user"], labels["state"]): value
        for labels, value in values_of(samples, "pgbouncer_clients")
    }
    assert got == {key: float(n) for key, n in per_state.items()}
    # SHOW DATABASES: one series per name, the PostgreSQL database name verbatim
    pool_size = {
        labels["name"]: (labels["database"], value)
        for labels, value in values_of(samples, "pgbouncer_databases_pool_size")
    }
    assert pool_size == {row[0]: (row[3], float(row[5])) for row in rows["databases"]}
    # non-secret settings as labels
    (info,) = values_of(samples, "pgbouncer_config_info")
    assert info[0]["auth_type"] == dict((k, v) for k, v, _, _ in rows["config"])["auth_type"]
    if rows["version"]:
        assert values_of(samples, "pgbouncer_version_info")[0][0]["version"] == rows["version"]


# ------------------------------------------------------------------------------------------------
# PostgreSQL: query rows → observation → families
# ------------------------------------------------------------------------------------------------
@st.composite
def activity_groups(draw: st.DrawFn) -> list[dict[str, Any]]:
    """GROUP BY (datname, usename, application_name, state) of client backends.

    As PostgreSQL reports them: a database or role name is never empty; a backend still logging in
    has every column NULL; application_name is "" when the client set none.
    """
    keys = draw(
        st.lists(
            st.tuples(
                # few databases, roles and states, so that groups share them as in real servers
                st.one_of(st.sampled_from(FEW), nonempty_names),
                st.one_of(st.sampled_from(FEW), nonempty_names),
                names,
                st.one_of(st.sampled_from(ACTIVITY_STATES[:2]), nonempty_names),
            ),
            max_size=12,
            unique=True,
        )
    )
    if draw(st.booleans()):
        keys.append((None, None, None, None))  # backends still authenticating
    return [
        {
            "datname": datname,
            "usename": usename,
            "application_name": app,
            "state": state,
            "connections": draw(st.integers(1, 50)),
            "oldest_xact_age_seconds": draw(st.one_of(st.none(), st.floats(0, 1e6))),
            "max_state_age_seconds": draw(st.one_of(st.none(), st.floats(0, 1e6))),
            "oldest_backend_age_seconds": draw(st.floats(0, 1e6)),
            "can_read_all_stats": True,
            "role_name": "poolwatch",
        }
        for datname, usename, app, state in keys
    ]


def _group(application_name: str, connections: int) -> dict[str, Any]:
    return {
        "datname": "d",
        "usename": "u",
        "application_name": application_name,
        "state": "idle",
        "connections": connections,
        "oldest_xact_age_seconds": None,
        "max_state_age_seconds": 1.0,
        "oldest_backend_age_seconds": 1.0,
        "can_read_all_stats": True,
        "role_name": "poolwatch",
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# a client calling itself "__other__", among the busiest, next to applications folded into "__other__"
@example(
    activity=[_group("__other__", 10), _group("a", 5), _group("b", 1), _group("c", 1)],
    wait_types=[],
    databases=[],
    target="t",
    cap=2,
)
@given(
    activity=activity_groups(),
    wait_types=st.lists(
        st.tuples(nonempty_names, st.one_of(st.none(), nonempty_names), st.integers(1, 9)),
        max_size=6,
        unique_by=lambda t: (t[0], t[1]),
    ),
    databases=st.lists(nonempty_names, max_size=5, unique=True),
    target=nonempty_names,
    cap=st.integers(1, 6),
)
def test_postgres_labels_round_trip(
    activity: list[dict[str, Any]],
    wait_types: list[tuple[str, str | None, int]],
    databases: list[str],
    target: str,
    cap: int,
) -> None:
    obs = build_observation(
        target,
        datetime(2026, 11, 25, tzinfo=UTC),
        server_version_num=160000,
        activity_rows=activity,
        wait_event_rows=[
            {"datname": d, "wait_event_type": w, "connections": n, "can_read_all_stats": True}
            for d, w, n in wait_types
        ],
        database_rows=[
            {
                "datname": d,
                "numbackends": 1,
                "xact_commit": 2,
                "xact_rollback": 3,
                "sessions": 4,
                "sessions_abandoned": 0,
                "sessions_fatal": 0,
                "sessions_killed": 0,
                "session_time": 1.5,
                "active_time": 0.5,
                "idle_in_transaction_time": 0.25,
            }
            for d in databases
        ],
    )
    samples = assert_round_trip(observation_families(obs, max_application_names=cap))
    total = sum(g["connections"] for g in activity)
    # folding application names beyond the cap keeps every connection: nothing dropped as a duplicate
    connections = values_of(samples, "pg_stat_activity_connections")
    assert sum(v for _, v in connections) == total
    assert len({labels["application_name"] for labels, _ in connections}) <= cap + 1
    # per database and state, the postgres_exporter-compatible count adds up to the same
    per_db: defaultdict[str, float] = defaultdict(float)
    for labels, value in values_of(samples, "pg_stat_activity_count"):
        per_db[labels["datname"]] += value
    expected: defaultdict[str, float] = defaultdict(float)
    for g in activity:
        expected[g["datname"] or ""] += g["connections"]
    assert {k: v for k, v in per_db.items() if v} == dict(expected)
    # names come back verbatim
    assert {
        labels["datname"] for labels, _ in values_of(samples, "pg_stat_database_xact_commit_total")
    } == set(databases)
    waits = {
        (labels["datname"], labels["wait_event_type"]): v
        for labels, v in values_of(samples, "pg_stat_activity_wait_event_type_count")
    }
    assert waits == {(d, w or ""): float(n) for d, w, n in wait_types}


# ------------------------------------------------------------------------------------------------
# Live
# ------------------------------------------------------------------------------------------------
ODD_DATABASE = "qu\"ote's dä tabase ✓"
ODD_APPLICATION = "line one\nline two é"


async def test_odd_names_live(pg: PostgresServer, make_pgbouncer: MakePgBouncer) -> None:
    ident = sql.Identifier(ODD_DATABASE)
    pg.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
    pg.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(ident, sql.Identifier(pg.app_user)))
    quoted = "'" + ODD_DATABASE.replace("'", "''") + "'"
    pgb = make_pgbouncer(
        databases={
            "odd": f"host={pg.host} port={pg.port} dbname={quoted}",
            "*": f"host={pg.host} port={pg.port}",  # any other name a client asks for, as is
        }
    )
    conninfo = make_conninfo(pgb.app_dsn(), dbname=ODD_DATABASE, application_name=ODD_APPLICATION)
    try:
        async with await psycopg.AsyncConnection.connect(
            conninfo, password=pgb.app_password, autocommit=False, prepare_threshold=None
        ) as client:
            await client.execute("SELECT 1")  # holds a server connection: idle in transaction
            rows = pg.execute(
                "SELECT application_name FROM pg_stat_activity WHERE datname = %s AND usename = 'app'",
                (ODD_DATABASE,),
            )
            (seen_application,) = {r[0] for r in rows}
            assert seen_application == "line one?line two ??"  # PostgreSQL: each non-printable byte → ?
            config = make_config(pgbouncers=[pgbouncer_target(pgb)], postgres=[postgres_target(pg)])
            async with running_daemon(config) as daemon:
                await asyncio.sleep(1.5)  # the first probe round, through every listed database
                status, text = await daemon.get("/metrics")
                assert status == 200
                samples = _parsed(text_string_to_metric_families(text))
                _, om_text = await daemon.get("/metrics", headers={"Accept": "application/openmetrics-text"})
                om_samples = _parsed(parse_openmetrics(om_text))
        # pool named by the client through "*"; SHOW DATABASES' database column for "odd"
        pool = dict(pgb.pool(ODD_DATABASE) or {})
        assert pool, "the fallback entry did not create the pool"
        odd_pool = frozenset({("target", "pgb"), ("database", ODD_DATABASE), ("user", "app")})
        assert ("pgbouncer_pools_client_active_connections", odd_pool) in samples
        assert ("pgbouncer_pools_client_active_connections", odd_pool) in om_samples
        odd = [
            dict(labels)
            for (n, labels) in samples
            if n == "pgbouncer_databases_pool_size" and dict(labels)["name"] == "odd"
        ]
        assert [labels["database"] for labels in odd] == [ODD_DATABASE]
        held = [
            (dict(labels), v)
            for (n, labels), v in samples.items()
            if n == "pg_stat_activity_connections"
            and dict(labels)["datname"] == ODD_DATABASE
            and dict(labels)["usename"] == "app"
        ]
        assert [(labels["application_name"], labels["state"], v) for labels, v in held] == [
            (seen_application, "idle in transaction", 1.0)
        ]
        # the probe logged in to the odd database through PgBouncer by its name
        probed = {
            dict(labels)["database"]: v
            for (n, labels), v in samples.items()
            if n == "poolwatch_probe_success" and dict(labels)["target"] == "pgb"
        }
        assert probed.get(ODD_DATABASE) == 1.0 and probed.get("odd") == 1.0, probed
    finally:
        pg.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
