"""PgBouncer parsing and families, against real SHOW output of PgBouncer 1.18 … 1.25.2.

The files under tests/data/pgbouncer-admin-console/ were captured with psql from real processes
(see the README there). psql prints NULL and "" alike, so the loader maps digit strings to int
(as psycopg does for PgBouncer's int/numeric columns) and leaves everything else as text.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.core import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from poolwatch.metrics import BuildCache, FamilyBuilder
from poolwatch.sources.pgbouncer import (
    COLLECTORS,
    Listener,
    PgBouncerObservation,
    aggregate_connections,
    classify_pgbouncer_error,
    collector_families,
    families_from_observation,
    find_listeners,
    matching_listeners,
    parse_config,
    parse_lists,
    parse_pgbouncer_time,
    parse_rows,
    parse_table,
    parse_version,
)
from poolwatch.sources.pgbouncer_columns import (
    COLUMNS,
    CONFIG_INFO_KEYS,
    DERIVED,
    OBSERVED_CONFIG_KEYS,
    metrics_reference,
)
from tests.console_columns import POOL_COLUMNS

DATA = Path(__file__).parent / "data" / "pgbouncer-admin-console"
VERSIONS = ("1.18", "1.23.0", "1.23.1", "1.24.0", "1.24.1", "1.25.0", "1.25.2")
TARGET = "pgb-main"


# -- loading the captured psql output -------------------------------------------------------------
@dataclass
class Result:
    columns: list[str]
    rows: list[tuple[Any, ...]]


def _value(text: str) -> Any:
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def load(version: str) -> dict[str, Result]:
    """``{"POOLS": Result, ...}`` from one capture file."""
    results: dict[str, Result] = {}
    lines = (DATA / f"pgbouncer-{version}.txt").read_text().splitlines()
    i = 0
    while i < len(lines):
        match = re.fullmatch(r"=== SHOW (\w+)", lines[i])
        if not match:
            i += 1
            continue
        command = match.group(1)
        while not lines[i].startswith("columns:"):
            i += 1
        columns = lines[i].removeprefix("columns:").split()
        i += 1
        while lines[i].startswith("config keys:"):
            i += 1
        assert lines[i].split("|") == columns, f"{version} {command}: header does not match columns"
        i += 1
        rows = []
        while not re.fullmatch(r"\(\d+ rows?\)", lines[i]):
            cells = lines[i].split("|")
            assert len(cells) == len(columns), f"{version} {command}: {lines[i]!r}"
            rows.append(tuple(_value(c) for c in cells))
            i += 1
        results[command] = Result(columns, rows)
    return results


def observe(results: dict[str, Result], collected_at: float | None = None) -> PgBouncerObservation:
    """What PgBouncerSource._absorb does, from captured results."""
    obs = PgBouncerObservation(collected_at=collected_at if collected_at is not None else time.time())
    version = results["VERSION"].rows[0][0]
    obs.version, obs.version_tuple = version, parse_version(version)
    obs.pools = parse_rows(results["POOLS"].columns, results["POOLS"].rows)
    obs.stats = parse_rows(results["STATS"].columns, results["STATS"].rows)
    obs.databases = parse_rows(results["DATABASES"].columns, results["DATABASES"].rows)
    obs.lists = parse_lists(results["LISTS"].columns, results["LISTS"].rows)
    obs.config = parse_config(results["CONFIG"].columns, results["CONFIG"].rows)
    obs.clients, _ = aggregate_connections(results["CLIENTS"].columns, results["CLIENTS"].rows)
    obs.servers, obs.server_endpoints = aggregate_connections(
        results["SERVERS"].columns, results["SERVERS"].rows
    )
    obs.collected = {name for name, _ in COLLECTORS}
    return obs


def samples(families: Iterable[Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value}; fails on a duplicate series."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in families:
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def value(families: Iterable[Metric], metric: str, /, **labels: str) -> float | None:
    wanted = {"target": TARGET, **labels}
    for family in families:
        for s in family.samples:
            if s.name == metric and s.labels == wanted:
                return s.value
    return None


def names(families: Iterable[Metric]) -> set[str]:
    return {s.name for f in families for s in f.samples}


class _Families:
    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Sequence[Metric]:
        return self._families


def render(families: Sequence[Metric], *, openmetrics: bool = False) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))  # type: ignore[arg-type,unused-ignore]
    rendered: bytes = generate_openmetrics(registry) if openmetrics else generate_latest(registry)  # type: ignore[no-untyped-call,unused-ignore]
    return rendered.decode()


@pytest.fixture(scope="module", params=VERSIONS)
def captured(request: pytest.FixtureRequest) -> tuple[str, dict[str, Result]]:
    return request.param, load(request.param)


# -- every captured version ------------------------------------------------------------------------
def test_every_version_parses_and_renders(captured: tuple[str, dict[str, Result]]) -> None:
    version, results = captured
    obs = observe(results)
    families = families_from_observation(obs, TARGET)
    samples(families)  # no duplicate series
    # the file's second line is what the binary calls itself (the 1.23.1 tag still says 1.23.0)
    reported = (DATA / f"pgbouncer-{version}.txt").read_text().splitlines()[1].removeprefix("# ")
    assert obs.version == reported
    assert obs.version_tuple is not None
    assert obs.version_tuple[:2] == tuple(int(x) for x in version.split(".")[:2])
    # target is the first label of every sample
    for family in families:
        for s in family.samples:
            assert next(iter(s.labels)) == "target", s
    text = render(families)
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    assert parsed["pgbouncer_pools_client_active_connections"].type == "gauge"
    assert parsed["pgbouncer_stats_queries_pooled"].type == "counter"
    # the OpenMetrics rendering parses too (the server offers both)
    om = {f.name: f for f in parse_openmetrics(render(families, openmetrics=True))}  # type: ignore[no-untyped-call,unused-ignore]
    assert om["pgbouncer_version"].type == "info"
    assert om["pgbouncer_stats_queries_pooled"].type == "counter"


def test_every_family_is_in_the_reference(captured: tuple[str, dict[str, Result]]) -> None:
    _, results = captured
    documented = {row.name for row in metrics_reference()}
    produced = names(families_from_observation(observe(results), TARGET))
    assert produced <= documented, produced - documented


def test_pgbouncer_pseudo_database_is_kept(captured: tuple[str, dict[str, Result]]) -> None:
    _, results = captured
    families = families_from_observation(observe(results), TARGET)
    assert (
        value(families, "pgbouncer_pools_client_active_connections", database="pgbouncer", user="pgbouncer")
        == 1
    )
    assert value(families, "pgbouncer_stats_queries_pooled_total", database="pgbouncer") == 4


def test_app_pool_has_one_client_in_a_transaction(captured: tuple[str, dict[str, Result]]) -> None:
    _, results = captured
    families = families_from_observation(observe(results), TARGET)
    pool = {"database": "app", "user": "app"}
    assert value(families, "pgbouncer_pools_client_active_connections", **pool) == 1
    assert value(families, "pgbouncer_pools_server_active_connections", **pool) == 1
    assert value(families, "pgbouncer_pools_client_waiting_connections", **pool) == 0
    assert value(families, "pgbouncer_pools_client_maxwait_seconds", **pool) == 0
    assert value(families, "pgbouncer_clients", database="app", user="app", state="active") == 1
    assert value(families, "pgbouncer_servers", database="app", user="app", state="active") == 1
    assert value(families, "pgbouncer_servers_close_needed", database="app", user="app") == 0


def test_reserve_pool_keeps_its_metric_across_the_rename(captured: tuple[str, dict[str, Result]]) -> None:
    version, results = captured
    columns = results["DATABASES"].columns
    assert ("reserve_pool_size" in columns) == (version >= "1.24"), columns
    obs = observe(results)
    for row in obs.databases:
        assert "reserve_pool_size" in row and "reserve_pool" not in row
    families = families_from_observation(obs, TARGET)
    labels = {"name": "app", "host": "127.0.0.1", "database": "app", "force_user": "", "pool_mode": ""}
    port = str(next(r["port"] for r in obs.databases if r["name"] == "app"))
    assert value(families, "pgbouncer_databases_reserve_pool", port=port, **labels) == 0
    assert value(families, "pgbouncer_databases_pool_size", port=port, **labels) == 2
    assert value(families, "pgbouncer_databases_current_connections", port=port, **labels) == 1


def test_lists_and_config(captured: tuple[str, dict[str, Result]]) -> None:
    version, results = captured
    obs = observe(results)
    families = families_from_observation(obs, TARGET)
    assert value(families, "pgbouncer_databases") == 3
    assert value(families, "pgbouncer_used_clients") == 2
    assert value(families, "pgbouncer_in_flight_dns_queries") == 0
    assert (value(families, "pgbouncer_peers") is not None) == (version != "1.18")
    assert "dns_pending" in obs.lists and not any("dns_pending" in n for n in names(families))
    assert value(families, "pgbouncer_config_max_client_connections") == 500
    assert value(families, "pgbouncer_config_default_pool_size") == 2
    assert value(families, "pgbouncer_config_query_wait_timeout_seconds") == 120
    assert value(families, "pgbouncer_config_reserve_pool_timeout_seconds") == 5
    assert (value(families, "pgbouncer_config_max_prepared_statements") is not None) == (version != "1.18")
    info = next(s for f in families for s in f.samples if s.name == "pgbouncer_config_info")
    assert info.labels["pool_mode"] == "transaction"
    # 1.25 changed the default to <empty> ("send an empty query"), which reads as ""
    assert info.labels["server_check_query"] == ("" if version >= "1.25" else "select 1")
    assert info.labels["auth_type"] == "md5"
    assert list(info.labels) == ["target", *CONFIG_INFO_KEYS]
    # only allowlisted keys reach the observation; auth_query, auth_file and friends never do
    assert set(obs.config) <= OBSERVED_CONFIG_KEYS
    assert "auth_query" not in obs.config and "auth_file" not in obs.config
    assert "pg_authid" not in render(families)


# -- exact values and conversions ------------------------------------------------------------------
def test_stats_microseconds_become_seconds() -> None:
    families = families_from_observation(observe(load("1.18")), TARGET)
    app = {"database": "app"}
    assert value(families, "pgbouncer_stats_client_wait_seconds_total", **app) == pytest.approx(0.005166)
    assert value(families, "pgbouncer_stats_avg_client_wait_seconds", **app) == pytest.approx(0.001965)
    assert value(families, "pgbouncer_stats_queries_duration_seconds_total", database="app") == pytest.approx(
        0.000597
    )
    assert value(families, "pgbouncer_stats_queries_pooled_total", database="app") == 2
    assert value(families, "pgbouncer_stats_received_bytes_total", database="app") == 27
    assert value(families, "pgbouncer_stats_sent_bytes_total", database="app") == 125
    # 1.18 has no server assignment or prepared-statement counters: no sample, no error
    assert value(families, "pgbouncer_stats_server_assignments_total", database="app") is None
    later = families_from_observation(observe(load("1.24.1")), TARGET)
    assert value(later, "pgbouncer_stats_server_assignments_total", database="app") == 1
    assert value(later, "pgbouncer_stats_binds_total", database="app") == 0
    assert value(later, "pgbouncer_stats_client_wait_seconds_total", **app) == pytest.approx(0.005575)


def _pool_row(database: str, user: str, **values: Any) -> tuple[Any, ...]:
    row: dict[str, Any] = dict.fromkeys(POOL_COLUMNS, 0)
    row.update(database=database, user=user, pool_mode="transaction", **values)
    return tuple(row[c] for c in POOL_COLUMNS)


def _pools_families(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[Metric]:
    obs = PgBouncerObservation(collected_at=time.time(), pools=parse_rows(columns, rows))
    return families_from_observation(obs, TARGET)


def test_maxwait_adds_the_microsecond_remainder() -> None:
    rows = [_pool_row("app", "app", cl_waiting=3, maxwait=2, maxwait_us=500000)]
    families = _pools_families(POOL_COLUMNS, rows)
    assert value(families, "pgbouncer_pools_client_maxwait_seconds", database="app", user="app") == 2.5
    assert value(families, "pgbouncer_pools_client_waiting_connections", database="app", user="app") == 3


def test_unknown_column_is_ignored() -> None:
    columns = [*POOL_COLUMNS, "zz_from_the_future"]
    rows = [(*_pool_row("app", "app", cl_active=4), 12345)]
    families = _pools_families(columns, rows)
    assert value(families, "pgbouncer_pools_client_active_connections", database="app", user="app") == 4
    assert not any("zz_from_the_future" in n for n in names(families))
    assert 12345 not in samples(families).values()


def test_missing_column_is_skipped() -> None:
    columns = [c for c in POOL_COLUMNS if c not in ("sv_login", "maxwait_us")]
    rows = [
        tuple(
            v
            for c, v in zip(POOL_COLUMNS, _pool_row("app", "app", sv_login=1, maxwait=7), strict=True)
            if c in columns
        )
    ]
    families = _pools_families(columns, rows)
    assert value(families, "pgbouncer_pools_server_login_connections", database="app", user="app") is None
    assert "pgbouncer_pools_server_login_connections" not in names(families)
    assert value(families, "pgbouncer_pools_client_maxwait_seconds", database="app", user="app") == 7


def test_null_gives_no_sample() -> None:
    rows = [_pool_row("app", "app", cl_active=None, sv_idle=2)]
    families = _pools_families(POOL_COLUMNS, rows)
    assert value(families, "pgbouncer_pools_client_active_connections", database="app", user="app") is None
    assert value(families, "pgbouncer_pools_server_idle_connections", database="app", user="app") == 2


def test_duplicate_rows_make_one_series() -> None:
    rows = [
        _pool_row("app", "app", cl_active=1),
        _pool_row("app", "app", cl_active=9),
        _pool_row("app", "other", cl_active=2),
    ]
    families = _pools_families(POOL_COLUMNS, rows)
    samples(families)  # asserts no duplicate series
    assert value(families, "pgbouncer_pools_client_active_connections", database="app", user="app") == 1
    assert value(families, "pgbouncer_pools_client_active_connections", database="app", user="other") == 2


def test_duplicate_rows_stay_one_series_when_the_next_collection_reuses_them() -> None:
    """The next collection with the very same columns takes last time's labels and row choice."""
    rows = [
        _pool_row("app", "app", cl_active=1),
        _pool_row("app", "app", cl_active=9),
        _pool_row("app", "other", cl_active=2),
    ]
    cache = BuildCache()
    first_table = parse_table(POOL_COLUMNS, rows)
    again_table = parse_table(POOL_COLUMNS, [tuple(r) for r in rows], previous=first_table)
    for table in (first_table, again_table, again_table):
        obs = PgBouncerObservation(collected_at=0.0, pools=table, collected={"pools"})
        families = collector_families("pools", obs, TARGET, None, cache)
        samples(families)  # asserts no duplicate series
        assert value(families, "pgbouncer_pools_client_active_connections", database="app", user="app") == 1
        assert value(families, "pgbouncer_pools_client_active_connections", database="app", user="other") == 2


def test_older_column_names_map_to_the_newest() -> None:
    # 1.16/1.17: cl_cancel_req is what 1.18 calls cl_waiting_cancel_req; 1.12: no min_pool_size
    columns = ["database", "user", "cl_active", "cl_waiting", "cl_cancel_req", "sv_active", "maxwait"]
    obs = PgBouncerObservation(collected_at=0.0, pools=parse_rows(columns, [("app", "app", 1, 0, 3, 1, 0)]))
    assert obs.pools[0]["cl_waiting_cancel_req"] == 3 and "cl_cancel_req" not in obs.pools[0]
    families = families_from_observation(obs, TARGET)
    pool = {"database": "app", "user": "app"}
    assert value(families, "pgbouncer_pools_client_waiting_cancel_connections", **pool) == 3
    db_columns = [
        "name",
        "host",
        "port",
        "database",
        "force_user",
        "pool_size",
        "reserve_pool",
        "pool_mode",
        "max_connections",
        "current_connections",
        "paused",
        "disabled",
    ]
    obs.databases = parse_rows(db_columns, [("app", "db1", 5432, "app", None, 20, 5, None, 0, 3, 0, 0)])
    families = families_from_observation(obs, TARGET)
    labels = {
        "name": "app",
        "host": "db1",
        "port": "5432",
        "database": "app",
        "force_user": "",
        "pool_mode": "",
    }
    assert value(families, "pgbouncer_databases_reserve_pool", **labels) == 5
    assert value(families, "pgbouncer_databases_min_pool_size", **labels) is None


def test_new_column_name_wins_if_both_are_present() -> None:
    rows = parse_rows(["name", "reserve_pool", "reserve_pool_size"], [("app", 1, 2)])
    assert rows == [{"name": "app", "reserve_pool": 1, "reserve_pool_size": 2}]


def test_decimal_values_become_numbers() -> None:
    from decimal import Decimal

    rows = parse_rows(
        ["database", "total_query_count", "avg_recv"],
        [("app", Decimal("18446744073709551615"), Decimal("1.5"))],
    )
    count = rows[0]["total_query_count"]
    assert count == 18446744073709551615 and isinstance(count, int)
    assert rows[0]["avg_recv"] == 1.5


def test_config_three_and_four_columns_and_empty() -> None:
    rows3 = [
        ("max_client_conn", "100", "yes"),
        ("auth_type", "md5", "yes"),
        ("server_check_query", "<empty>", "yes"),
        ("auth_query", "SELECT secret", "yes"),
        ("auth_ldap_options", "ldapbindpasswd=hunter2", "yes"),
    ]
    config3 = parse_config(["key", "value", "changeable"], rows3)
    config4 = parse_config(["key", "value", "default", "changeable"], [(k, v, "", c) for k, v, c in rows3])
    assert config3 == config4 == {"max_client_conn": "100", "auth_type": "md5", "server_check_query": ""}
    obs = PgBouncerObservation(collected_at=0.0, config=config3)
    families = families_from_observation(obs, TARGET)
    assert value(families, "pgbouncer_config_max_client_connections") == 100
    text = render(families)
    assert "hunter2" not in text and "SELECT secret" not in text
    # keys this release lacks are "" in the info labels, and non-numeric keys never become gauges
    assert 'pool_mode=""' in text and "pgbouncer_config_auth_type" not in text


def test_version_parsing_and_notice() -> None:
    assert parse_version("PgBouncer 1.24.1") == (1, 24, 1)
    assert parse_version("PgBouncer version 1.9.0") == (1, 9, 0)  # pre-1.12 NOTICE text
    assert parse_version("PgBouncer 1.25") == (1, 25, 0)
    assert parse_version("odyssey") is None and parse_version(None) is None


def test_connect_time_parsing() -> None:
    assert parse_pgbouncer_time("2026-11-25 17:33:46 UTC") == 1795628026.0
    assert parse_pgbouncer_time("2026-11-25 17:33:46 GMT") == 1795628026.0
    assert parse_pgbouncer_time("2026-11-25 17:33:46 XYZT") is None  # ambiguous zone: no sample
    assert parse_pgbouncer_time(None) is None and parse_pgbouncer_time("garbage") is None


def test_clients_and_servers_aggregates() -> None:
    results = load("1.24.1")
    collected_at = 1795628064.0  # 2026-11-25 17:34:24 UTC
    obs = observe(results, collected_at)
    families = families_from_observation(obs, TARGET)
    assert value(families, "pgbouncer_clients", database="pgbouncer", user="monitor", state="active") == 1
    # server connected at 17:34:17 → 7 s old; client monitor at 17:34:19 → 5 s old
    assert value(families, "pgbouncer_servers_oldest_connection_age_seconds", database="app", user="app") == 7
    assert (
        value(
            families, "pgbouncer_clients_oldest_connection_age_seconds", database="pgbouncer", user="monitor"
        )
        == 5
    )
    assert value(families, "pgbouncer_clients_max_wait_seconds", database="app", user="app") == 0
    assert obs.server_endpoints == {("127.0.0.1", 41396)}


def test_client_wait_and_oldest_over_many_rows() -> None:
    columns = ["type", "user", "database", "state", "connect_time", "wait", "wait_us", "close_needed"]
    rows = [
        ("C", "u", "d", "waiting", "2026-01-01 00:00:05 UTC", 1, 250000, 0),
        ("C", "u", "d", "waiting", "2026-01-01 00:00:01 UTC", 3, 100, 0),
        ("C", "u", "d", "active", "2026-01-01 00:00:09 UTC", 0, 0, 0),
        ("C", "v", "d", "idle", None, 0, 0, 1),
    ]
    groups, endpoints = aggregate_connections(columns, rows)
    assert groups[("d", "u")].states == {"waiting": 2, "active": 1}
    assert groups[("d", "u")].max_wait_seconds == pytest.approx(3.0001)
    assert groups[("d", "u")].oldest_connect_time == parse_pgbouncer_time("2026-01-01 00:00:01 UTC")
    assert groups[("d", "v")].oldest_connect_time is None and groups[("d", "v")].close_needed == 1
    assert endpoints == set()


def test_failed_collectors_leave_their_families_out() -> None:
    obs = observe(load("1.24.1"))
    obs.collected -= {"clients"}
    obs.clients = {}
    families = families_from_observation(obs, TARGET)
    assert not any(n.startswith("pgbouncer_clients") for n in names(families))
    assert "pgbouncer_servers" in names(families)


# -- the table -------------------------------------------------------------------------------------
def test_reference_rows() -> None:
    rows = list(metrics_reference())
    assert len({r.name for r in rows}) == len(rows) == len(COLUMNS) + len(DERIVED)
    for r in rows:
        assert r.labels[0] == "target" and r.help and r.source.startswith("SHOW ")
        assert r.type in ("gauge", "counter", "info")
    by_name = {r.name: r for r in rows}
    # pgbouncer_exporter's names where it has the metric
    for name in (
        "pgbouncer_pools_client_active_connections",
        "pgbouncer_pools_client_waiting_connections",
        "pgbouncer_pools_server_active_connections",
        "pgbouncer_pools_server_idle_connections",
        "pgbouncer_pools_server_used_connections",
        "pgbouncer_pools_server_testing_connections",
        "pgbouncer_pools_server_login_connections",
        "pgbouncer_pools_client_maxwait_seconds",
        "pgbouncer_stats_queries_pooled_total",
        "pgbouncer_stats_queries_duration_seconds_total",
        "pgbouncer_stats_client_wait_seconds_total",
        "pgbouncer_stats_sql_transactions_pooled_total",
        "pgbouncer_stats_server_in_transaction_seconds_total",
        "pgbouncer_stats_received_bytes_total",
        "pgbouncer_stats_sent_bytes_total",
        "pgbouncer_databases_pool_size",
        "pgbouncer_databases_reserve_pool",
        "pgbouncer_databases_max_connections",
        "pgbouncer_databases_current_connections",
        "pgbouncer_databases_paused",
        "pgbouncer_databases_disabled",
        "pgbouncer_free_clients",
        "pgbouncer_cached_dns_names",
        "pgbouncer_in_flight_dns_queries",
        "pgbouncer_config_max_client_connections",
        "pgbouncer_config_max_user_connections",
        "pgbouncer_version_info",
    ):
        assert name in by_name, name
    assert by_name["pgbouncer_databases_pool_size"].labels == (
        "target",
        "name",
        "host",
        "port",
        "database",
        "force_user",
        "pool_mode",
    )
    assert "reserve_pool" in by_name["pgbouncer_databases_reserve_pool"].source


# -- performance -----------------------------------------------------------------------------------
def test_ten_thousand_pools_are_fast() -> None:
    rows = [_pool_row(f"db{i // 100}", f"user{i % 100}", cl_active=i % 7, sv_idle=1) for i in range(10_000)]
    started = time.perf_counter()
    families = _pools_families(POOL_COLUMNS, rows)
    elapsed = time.perf_counter() - started
    assert sum(len(f.samples) for f in families) == 10_000 * 12
    assert elapsed < 3.0, f"{elapsed:.2f}s for 10,000 pools"  # ~0.5 s here; O(n²) would be minutes


def test_family_builder_fast_path_refuses_duplicates() -> None:
    builder = FamilyBuilder("x", "x", "gauge", ("target",))
    builder.add_prepared(("a",), 1.0)
    builder.add_prepared(("a",), 2.0)
    assert len(builder) == 1 and builder.duplicates == 1


# -- /proc/net/tcp ---------------------------------------------------------------------------------
# Shaped like the real files: LISTEN (0A) and ESTABLISHED (01) rows, inodes in column 10.
PROC_NET_TCP = (DATA.parent / "proc" / "net-tcp.txt").read_text()
PROC_NET_TCP6 = (DATA.parent / "proc" / "net-tcp6.txt").read_text()


def test_find_listeners_on_ipv4() -> None:
    # 6432 = 0x1920: the LISTEN row only, not the ESTABLISHED ones
    assert find_listeners(PROC_NET_TCP, 6432) == [Listener("127.0.0.1", 6432, 41001)]
    assert find_listeners(PROC_NET_TCP, 5432) == [Listener("0.0.0.0", 5432, 41002)]
    assert find_listeners(PROC_NET_TCP, 6433) == [Listener("10.0.0.5", 6433, 41005)]
    assert find_listeners(PROC_NET_TCP, 53924) == []  # 0xD2A4 only as an established client port
    assert find_listeners("", 6432) == []


def test_find_listeners_on_ipv6() -> None:
    assert find_listeners(PROC_NET_TCP6, 6433) == [Listener("::", 6433, 42001)]
    assert find_listeners(PROC_NET_TCP6, 6434) == [Listener("::1", 6434, 42002)]


def test_matching_listeners() -> None:
    v4 = find_listeners(PROC_NET_TCP, 6432)
    assert matching_listeners(v4, "127.0.0.1") == v4
    assert matching_listeners(v4, "10.0.0.5") == []  # bound to loopback only
    wildcard = find_listeners(PROC_NET_TCP, 5432)
    assert matching_listeners(wildcard, "10.0.0.5") == wildcard
    dual = find_listeners(PROC_NET_TCP6, 6433)
    assert matching_listeners(dual, "127.0.0.1") == dual  # a v6 wildcard may accept IPv4 too
    assert matching_listeners(dual, "::ffff:127.0.0.1") == dual
    loop6 = find_listeners(PROC_NET_TCP6, 6434)
    assert matching_listeners(loop6, "::1") == loop6
    assert matching_listeners(loop6, "127.0.0.1") == []


def test_listener_identity_reads_proc(tmp_path: Path) -> None:
    from poolwatch.sources.pgbouncer import _Endpoint, listener_identity

    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "tcp").write_text(PROC_NET_TCP)
    (tmp_path / "net" / "tcp6").write_text(PROC_NET_TCP6)
    proc = str(tmp_path)
    assert listener_identity(_Endpoint(peer_ip="127.0.0.1", port=6432), proc) == {"inode:41001"}
    assert listener_identity(_Endpoint(peer_ip="127.0.0.1", port=6433), proc) == {"inode:42001"}
    assert listener_identity(_Endpoint(peer_ip="127.0.0.1", port=7000), proc) == frozenset()
    assert listener_identity(_Endpoint(), proc) == frozenset()  # PgBouncer not on this host
    sock = tmp_path / ".s.PGSQL.6432"
    assert listener_identity(_Endpoint(port=6432, socket_path=str(sock)), proc) == frozenset()
    sock.write_text("")
    assert listener_identity(_Endpoint(port=6432, socket_path=str(sock)), proc)


# -- error classification -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("message", "reason", "hint"),
    [
        ("FATAL:  not allowed", "privilege", "stats_users"),
        ('unrecognized configuration parameter "pools"', "config", "dbname=pgbouncer"),
        ("FATAL:  no such database: pgbouncr", "config", "dbname=pgbouncer"),
        ('FATAL:  password authentication failed for user "poolwatch"', "auth", "password"),
        (
            'connection failed: connection to server at "127.0.0.1", port 1 failed: Connection refused',
            "connect",
            "nothing listens",
        ),
        (
            "failed to resolve host 'nope.invalid': [Errno -2] Name or service not known",
            "connect",
            "does not resolve",
        ),
        ("ERROR:  invalid command 'SHOW FOO', use SHOW HELP;", "query", "does not know the command"),
    ],
)
def test_error_classification(message: str, reason: str, hint: str) -> None:
    got_reason, detail = classify_pgbouncer_error(RuntimeError(message))
    assert got_reason == reason
    assert hint in detail


def test_error_detail_never_has_the_password() -> None:
    exc = RuntimeError(
        "connection to host=pgb password=s3cr3t-pw user=x failed: Connection refused s3cr3t-pw"
    )
    reason, detail = classify_pgbouncer_error(exc, "s3cr3t-pw")
    assert reason == "connect"
    assert "s3cr3t-pw" not in detail
    _, detail = classify_pgbouncer_error(TimeoutError())
    assert detail


def test_not_allowed_names_the_user() -> None:
    reason, detail = classify_pgbouncer_error(RuntimeError("FATAL:  not allowed"), user="grafana")
    assert reason == "privilege" and "user 'grafana'" in detail and "stats_users" in detail


def test_show_version_notice_fallback() -> None:
    """Before 1.12 SHOW VERSION sends a NOTICE and no row; the source reads the notice."""
    from poolwatch.sources.pgbouncer import PgBouncerSource, ShowResult

    source = PgBouncerSource("t", "host=127.0.0.1 dbname=pgbouncer user=x", None, connect_timeout=1)
    obs = PgBouncerObservation(collected_at=0.0)
    source._absorb(obs, "version", ShowResult([], [], 0), ["PgBouncer version 1.9.0"])
    assert obs.version == "PgBouncer version 1.9.0" and obs.version_tuple == (1, 9, 0)
    with pytest.raises(ValueError):
        source._absorb(obs, "version", ShowResult([], [], 0), [])


def test_source_keeps_the_password_out_of_its_conninfo() -> None:
    from poolwatch.sources.pgbouncer import PgBouncerSource

    source = PgBouncerSource(
        "t", "host=h port=6432 dbname=pgbouncer user=u password=inline-pw", None, connect_timeout=1
    )
    assert "inline-pw" not in source._conninfo and source._password == "inline-pw"
    assert "application_name=poolwatch" in source._conninfo


def test_a_trivial_password_does_not_garble_the_advice() -> None:
    exc = RuntimeError('FATAL:  password authentication failed for user "x" (tried password)')
    reason, detail = classify_pgbouncer_error(exc, password="password")
    assert reason == "auth" and detail.startswith("wrong password")
    assert "(tried ***)" in detail


def test_unknown_error_text_with_the_password_is_cleaned() -> None:
    reason, detail = classify_pgbouncer_error(
        RuntimeError("weird failure mentioning Tr0ub4dor&3"), password="Tr0ub4dor&3"
    )
    assert reason == "query" and "Tr0ub4dor&3" not in detail and "***" in detail


# ------------------------------------------------------------------------------------------------
# The renderer's fast paths: integer-with-exponent values, one-value columns, regrouped chunks
# ------------------------------------------------------------------------------------------------
def _columnar(values: Sequence[int | float], exponent: int = 0) -> Metric:
    from poolwatch.metrics import ColumnarFamily, LabelTable

    names = [f"p{i}" for i in range(len(values))]
    labels = LabelTable(("target", "database"), [["t"] * len(values), names])
    return ColumnarFamily("x_seconds", "help", "counter", labels, values, exponent=exponent)


@pytest.mark.parametrize(
    ("values", "exponent"),
    [
        ([0, 85817, 1, 10**15, 0], -6),  # microseconds, zeros among them
        ([7, 7, 7], -6),  # one value everywhere
        ([0, 0, 0, 0], -3),
        ([80894, 5], -3),
        ([1, 1, 1], 0),
        ([0.5, 0.5], 0),
        ([3, 0, 2**70], 0),
    ],
)
def test_integer_exponent_and_constant_columns_parse_to_the_samples(
    values: list[int | float], exponent: int
) -> None:
    from poolwatch.metrics import exposition

    family = _columnar(values, exponent)
    for openmetrics, parse in ((False, text_string_to_metric_families), (True, parse_openmetrics)):
        text = exposition([family], openmetrics=openmetrics).join().decode()
        parsed = [s for f in parse(text) for s in f.samples if s.name == "x_seconds_total"]
        assert [(s.labels["database"], s.value) for s in parsed] == [
            (s.labels["database"], s.value) for s in family.samples
        ]
    assert [s.value for s in family.samples] == [v / 10**-exponent if exponent else v for v in values]
    if exponent == -6 and values[1] == 85817:
        assert 'database="p1"} 85817e-6\n' in exposition([family]).join().decode()  # exact, not 0.0858169999…


def test_exponent_needs_integer_values() -> None:
    with pytest.raises(ValueError, match="integer"):
        _columnar([1.5, 2.0], -6)


def test_regrouped_body_is_the_same_bytes() -> None:
    from poolwatch.metrics import exposition

    families = [_columnar([i] * n) for i, n in enumerate((1, 3000, 2, 5, 40_000, 1, 1))]
    body = exposition(families)
    whole = body.join()
    body.coalesce(64 << 10, 256 << 10)
    assert body.join() == whole
    assert all(len(c) >= 64 << 10 for c in body.chunks[:-1] if len(c) > 256 << 10)
    assert len(body.chunks) < len(families)


def test_table_keeps_few_objects_and_reads_as_rows() -> None:
    """A SHOW is kept as columns: a column equal to last collection's is that column, a column with
    one value everywhere is one object; read back, the rows are what PgBouncer sent."""
    columns = ["database", "user", "pool_mode", "cl_active", "total_xact_count"]

    def rows(counts: list[int]) -> list[tuple[Any, ...]]:
        # fresh string objects each time, as the driver makes them
        return [
            (f"db{i}", "".join(["ap", "p"]), "".join(["sess", "ion"]), 0, n) for i, n in enumerate(counts)
        ]

    first = parse_table(columns, rows([10**12, 10**12 + 1, 10**12 + 2]))
    second = parse_table(columns, rows([10**12, 10**12 + 5, 10**12 + 9]), previous=first)
    assert second.column("database") is first.column("database")  # unchanged: last time's column
    assert second.column("total_xact_count") is not first.column("total_xact_count")
    assert list(second.column("total_xact_count") or ()) == [10**12, 10**12 + 5, 10**12 + 9]
    users = second.column("user") or ()
    assert len({id(u) for u in users}) == 1 and list(users) == ["app"] * 3
    assert list(second) == [
        dict(zip(columns, row, strict=True)) for row in rows([10**12, 10**12 + 5, 10**12 + 9])
    ]
    assert second[-1]["database"] == "db2" and second[0:2] == list(second)[0:2]
    picked = second.take([2, 0])
    assert [row["database"] for row in picked] == ["db2", "db0"] and len(second.take([])) == 0
    # a different number of rows: nothing to reuse, nothing shared by mistake
    third = parse_table(columns, rows([1, 2]), previous=second)
    assert list(third.column("database") or ()) == ["db0", "db1"]


def test_text_columns_hold_one_object_per_value_across_tables() -> None:
    """The driver makes a new ``str`` per row. With one ``strings`` map per collection, a column
    with one value on all rows but PgBouncer's own (``user``, ``pool_mode``) holds two objects,
    and the database names of SHOW POOLS and SHOW STATS are the same objects."""

    def fresh(text: str) -> str:
        return "".join(list(text))  # a new object with the same value

    n = 50
    pool_rows = [(fresh(f"db{i}"), fresh("app"), fresh("transaction"), 0) for i in range(n)]
    pool_rows.append(("pgbouncer", "pgbouncer", "statement", 0))
    strings: dict[Any, Any] = {}
    pool_columns = ["database", "user", "pool_mode", "cl_active"]
    pools = parse_table(pool_columns, pool_rows, None, strings)
    stat_rows = [(fresh(f"db{i}"), i) for i in range(n)]
    stats = parse_table(["database", "total_xact_count"], stat_rows, None, strings)
    for column in ("user", "pool_mode"):
        assert len({id(v) for v in pools.column(column) or ()}) == 2
    pool_names, stat_names = list(pools.column("database") or ())[:n], list(stats.column("database") or ())
    assert all(a is b for a, b in zip(pool_names, stat_names, strict=True))
    assert list(pools) == [dict(zip(pool_columns, r, strict=True)) for r in pool_rows]


@pytest.mark.parametrize("intern_all", [True, False])
def test_columns_builder_keeps_columns_not_rows(intern_all: bool) -> None:
    """A SHOW's rows arrive a slice at a time and leave as columns: the slices in order, the
    columns no one reads left empty, a text column with one value in a slice as that value's one
    object, and (``intern_all``) every text value as the one object per value of the collection.
    Without ``intern_all`` (the SHOW tables, which ``table_from_columns`` interns after comparing
    with the last collection) the varying text columns are left as they came."""
    from poolwatch.sources.pgbouncer import _ColumnsBuilder

    def fresh(text: str) -> str:
        return "".join(list(text))  # a new object with the same value

    strings: dict[Any, Any] = {"db1": "db1"}
    read = {"database", "user", "wait"}
    builder = _ColumnsBuilder(["database", "user", "addr", "wait"], read, strings, intern_all)
    rows = [(fresh(f"db{i % 3}"), fresh("app"), fresh("10.0.0.1"), i) for i in range(7)]
    for start in range(0, 7, 3):
        builder.add(rows[start : start + 3])
    builder.add([])
    result = builder.result()
    assert result.names == ["database", "user", "addr", "wait"] and result.length == 7
    assert result.values[2] == () and result.values[3] == tuple(range(7))
    assert result.values[0] == tuple(f"db{i % 3}" for i in range(7)) and result.values[1] == ("app",) * 7
    assert all(user is strings["app"] for user in result.values[1])
    names = result.values[0]
    assert names[6] is strings["db0"]  # the last slice is one row: one value
    assert (names[1] is strings["db1"]) is intern_all and (names[4] is strings["db1"]) is intern_all
