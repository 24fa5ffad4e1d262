"""The cardinality guard: pgbouncers[].databases / users patterns and max_pools.

Pure tests on hand-built SHOW results (which pools are exported, what the dropped counts say),
config validation (one line naming the field and the value), and one live daemon scrape.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import pytest
from prometheus_client.metrics_core import Metric

from poolwatch.config import ConfigError, config_from_mapping
from poolwatch.localcluster import PgBouncerServer
from poolwatch.sources.pgbouncer import (
    PgBouncerObservation,
    PoolFilter,
    aggregate_connections,
    families_from_observation,
    parse_table,
    select_pools,
)
from tests.daemon import make_config, pgbouncer_target, running_daemon

POOL_COLUMNS = [
    "database",
    "user",
    "cl_active",
    "cl_waiting",
    "sv_active",
    "sv_idle",
    "maxwait",
    "maxwait_us",
]
STATS_COLUMNS = ["database", "total_query_count", "total_query_time"]
DB_COLUMNS = ["name", "host", "port", "database", "force_user", "pool_size", "pool_mode"]
CLIENT_COLUMNS = ["type", "user", "database", "state", "connect_time", "wait", "wait_us"]
POOLS = [
    (db, user) for db in ("app", "app_ro", "billing", "tenant_1", "tenant_2") for user in ("app", "report")
]


def observation() -> PgBouncerObservation:
    obs = PgBouncerObservation(collected_at=time.time())
    obs.pools = parse_table(POOL_COLUMNS, [(db, user, 1, 0, 1, 0, 0, 0) for db, user in POOLS])
    databases = sorted({db for db, _ in POOLS})
    obs.stats = parse_table(STATS_COLUMNS, [(db, 10, 5000) for db in databases])
    obs.databases = parse_table(DB_COLUMNS, [(db, "db1", 5432, db, None, 5, None) for db in databases])
    clients = [("C", user, db, "active", "2026-01-01 00:00:00 UTC", 0, 0) for db, user in POOLS]
    obs.clients, _ = aggregate_connections(CLIENT_COLUMNS, clients)
    obs.collected = {"pools", "stats", "databases", "clients"}
    return obs


def label_sets(families: Iterable[Metric], name: str, *labels: str) -> set[tuple[str, ...]]:
    return {
        tuple(s.labels[label] for label in labels)
        for family in families
        for s in family.samples
        if s.name == name
    }


def export(pool_filter: PoolFilter) -> tuple[list[Metric], int, int]:
    obs = observation()
    selection = select_pools(obs, pool_filter)
    return (
        families_from_observation(obs, "pgb", selection),
        selection.dropped_by_filter,
        selection.dropped_by_cap,
    )


def test_no_filter_exports_everything() -> None:
    families, by_filter, by_cap = export(PoolFilter.build())
    assert (by_filter, by_cap) == (0, 0)
    assert label_sets(families, "pgbouncer_pools_client_active_connections", "database", "user") == set(POOLS)


def test_include_and_exclude_databases() -> None:
    families, by_filter, by_cap = export(
        PoolFilter.build(include_databases=["app.*", "tenant_.*"], exclude_databases=["tenant_2"])
    )
    kept = {(db, user) for db, user in POOLS if db in ("app", "app_ro", "tenant_1")}
    assert label_sets(families, "pgbouncer_pools_client_active_connections", "database", "user") == kept
    assert by_filter == len(POOLS) - len(kept) and by_cap == 0
    assert label_sets(families, "pgbouncer_stats_queries_pooled_total", "database") == {
        ("app",),
        ("app_ro",),
        ("tenant_1",),
    }
    assert {n for (n,) in label_sets(families, "pgbouncer_databases_pool_size", "name")} == {
        "app",
        "app_ro",
        "tenant_1",
    }
    assert label_sets(families, "pgbouncer_clients", "database", "user") == kept


def test_patterns_are_anchored() -> None:
    # "app" alone must not match "app_ro" (a whole-name match, as in Prometheus relabelling)
    families, _, _ = export(PoolFilter.build(include_databases=["app"]))
    assert {
        db for db, _ in label_sets(families, "pgbouncer_pools_server_idle_connections", "database", "user")
    } == {"app"}


def test_users_filter() -> None:
    families, by_filter, _ = export(PoolFilter.build(exclude_users=["rep.*"]))
    assert {
        user
        for _, user in label_sets(families, "pgbouncer_pools_client_active_connections", "database", "user")
    } == {"app"}
    assert by_filter == 5
    # SHOW STATS / SHOW DATABASES have no user: the user patterns leave them alone
    assert len(label_sets(families, "pgbouncer_stats_queries_pooled_total", "database")) == 5


def test_max_pools_keeps_the_first_by_name_and_their_databases() -> None:
    families, by_filter, by_cap = export(PoolFilter.build(max_pools=3))
    pools = label_sets(families, "pgbouncer_pools_client_active_connections", "database", "user")
    assert pools == {("app", "app"), ("app", "report"), ("app_ro", "app")}
    assert (by_filter, by_cap) == (0, len(POOLS) - 3)
    assert label_sets(families, "pgbouncer_stats_queries_pooled_total", "database") == {("app",), ("app_ro",)}
    assert label_sets(families, "pgbouncer_clients", "database", "user") == pools


def test_max_pools_applies_after_the_patterns() -> None:
    _, by_filter, by_cap = export(PoolFilter.build(include_databases=["tenant_.*"], max_pools=3))
    assert (by_filter, by_cap) == (6, 1)


def test_the_observation_keeps_every_pool() -> None:
    obs = observation()
    select_pools(obs, PoolFilter.build(max_pools=1))
    assert len(obs.pools) == len(POOLS)  # the pool doctor still sees all of them


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (
            {"databases": {"include": ["ok", "tenant_(", "x"]}},
            "pgbouncers[0].databases.include[1]: not a valid regular expression: missing ), unterminated "
            "subpattern at position 7 (got 'tenant_(')",
        ),
        (
            {"users": {"exclude": ["*bad"]}},
            "pgbouncers[0].users.exclude[0]: not a valid regular expression: nothing to repeat at position 0 "
            "(got '*bad')",
        ),
        ({"max_pools": -1}, "pgbouncers[0].max_pools: Input should be greater than or equal to 0 (got -1)"),
        ({"databases": {"inclde": ["x"]}}, "pgbouncers[0].databases.inclde: unknown key"),
    ],
)
def test_bad_guard_config_is_one_clear_line(target: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"pgbouncers": [{"name": "pgb", **target}]}, "poolwatch.yaml")
    assert caught.value.lines == [f"poolwatch.yaml: {expected}"]


def test_defaults() -> None:
    config = config_from_mapping({"pgbouncers": [{"name": "pgb"}]}, "x")
    pgb = config.pgbouncers[0]
    assert pgb.max_pools == 10000 and pgb.databases.include == [] and pgb.users.exclude == []


MakePgBouncer = Callable[..., PgBouncerServer]


async def test_dropped_pools_metric_live(make_pgbouncer: MakePgBouncer) -> None:
    pgb = make_pgbouncer()
    config = make_config(
        pgbouncers=[pgbouncer_target(pgb, probe={"databases": []}, databases={"exclude": ["pgbouncer"]})],
    )
    async with running_daemon(config) as daemon:
        samples = await daemon.metrics()
    dropped = {
        dict(labels)["reason"]: value
        for (name, labels), value in samples.items()
        if name == "poolwatch_pools_dropped"
    }
    assert dropped == {"filter": 1, "max_pools": 0}  # the console's own pgbouncer/pgbouncer pool
    exported = {
        dict(labels)["database"]
        for (name, labels), _ in samples.items()
        if name == "pgbouncer_pools_client_active_connections"
    }
    assert "pgbouncer" not in exported
