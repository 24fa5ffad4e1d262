"""The PostgreSQL source: pure row → observation → family functions, then a real server.

The pure tests feed hand-built rows and check exact values. The live tests run a throwaway
PostgreSQL (``poolwatch.localcluster.PostgresServer``) and watch the source report sessions the
test itself opens, holds and kills, so every expected number is known.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from poolwatch.sources.postgres import (
    ACTIVITY,
    COLLECTORS,
    OTHER_APPLICATION,
    PG_STAT_ACTIVITY_SQL,
    ActivityGroup,
    ClientCount,
    PostgresObservation,
    PostgresSource,
    SettingOverride,
    asyncpg_dsn,
    build_observation,
    classify_connect_error,
    classify_query_error,
    describe_dsn,
    observation_families,
    parse_duration_seconds,
    scrub,
    split_pg_stat_activity,
    up_family,
)

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def settings_rows(
    *,
    version: int = 150004,
    max_connections: int = 100,
    superuser_reserved: int = 3,
    reserved: int | None = None,
    statement_timeout_ms: str = "30000",
    idle_in_tx_ms: str = "0",
    role: str = "poolwatch",
    database: str = "postgres",
) -> list[dict[str, Any]]:
    values: list[tuple[str, str, str | None]] = [
        ("server_version_num", str(version), None),
        ("max_connections", str(max_connections), None),
        ("superuser_reserved_connections", str(superuser_reserved), None),
        ("statement_timeout", statement_timeout_ms, "ms"),
        ("idle_in_transaction_session_timeout", idle_in_tx_ms, "ms"),
    ]
    if reserved is not None:
        values.append(("reserved_connections", str(reserved), None))
    return [
        {
            "name": name,
            "setting": value,
            "unit": unit,
            "reset_val": value,
            "role_name": role,
            "database_name": database,
        }
        for name, value, unit in values
    ]


def activity_row(
    datname: str | None,
    usename: str | None,
    app: str | None,
    state: str | None,
    connections: int,
    xact: float | None = None,
    state_age: float | None = 1.0,
    backend: float | None = 10.0,
    *,
    privileged: bool = True,
) -> dict[str, Any]:
    return {
        "datname": datname,
        "usename": usename,
        "application_name": app,
        "state": state,
        "connections": connections,
        "oldest_xact_age_seconds": xact,
        "max_state_age_seconds": state_age,
        "oldest_backend_age_seconds": backend,
        "can_read_all_stats": privileged,
        "role_name": "poolwatch",
    }


def database_row(datname: str, *, pre14: bool = False, **values: int | float) -> dict[str, Any]:
    row: dict[str, Any] = {
        "datname": datname,
        "numbackends": values.get("numbackends", 0),
        "xact_commit": values.get("xact_commit", 0),
        "xact_rollback": values.get("xact_rollback", 0),
    }
    for key in ("sessions", "sessions_abandoned", "sessions_fatal", "sessions_killed"):
        row[key] = None if pre14 else values.get(key, 0)
    for key in ("session_time", "active_time", "idle_in_transaction_time"):
        row[key] = None if pre14 else values.get(key, 0.0)
    return row


def value_of(families: Sequence[Metric], sample: str, **labels: str) -> float | None:
    """The one sample named ``sample`` whose labels include ``labels``; None if there is none."""
    found = [
        s.value
        for family in families
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) <= 1, f"{sample}{labels} matches {len(found)} samples"
    return found[0] if found else None


def total(families: Sequence[Metric], sample: str, **labels: str) -> float:
    return sum(
        s.value
        for family in families
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def family_names(families: Sequence[Metric]) -> set[str]:
    return {f.name for f in families}


class _Static(Collector):
    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def exposition(families: Sequence[Metric]) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Static(families))
    return generate_latest(registry).decode("utf-8")


def sample_observation() -> PostgresObservation:
    return build_observation(
        "pg-a",
        NOW,
        settings_rows=settings_rows(max_connections=100, superuser_reserved=3, reserved=2, version=160002),
        role_setting_rows=[],
        activity_rows=[
            activity_row("app", "web", "api", "active", 4, xact=2.5, state_age=0.5, backend=100.0),
            activity_row("app", "web", "api", "idle", 6, xact=None, state_age=30.0, backend=400.0),
            activity_row(
                "app", "web", "worker", "idle in transaction", 2, xact=75.0, state_age=70.0, backend=80.0
            ),
            activity_row(
                "postgres", "poolwatch", "poolwatch", "active", 1, xact=0.01, state_age=0.0, backend=5.0
            ),
        ],
        wait_event_rows=[
            {"datname": "app", "wait_event_type": "Client", "connections": 8, "can_read_all_stats": True},
            {"datname": "app", "wait_event_type": "Lock", "connections": 1, "can_read_all_stats": True},
            {"datname": "app", "wait_event_type": None, "connections": 3, "can_read_all_stats": True},
        ],
        client_rows=[
            {
                "client_addr": "10.0.0.5",
                "application_name": "api",
                "connections": 10,
                "can_read_all_stats": True,
            },
            {
                "client_addr": "10.0.0.9",
                "application_name": "worker",
                "connections": 2,
                "can_read_all_stats": True,
            },
            {
                "client_addr": None,
                "application_name": "poolwatch",
                "connections": 1,
                "can_read_all_stats": True,
            },
        ],
        database_rows=[
            database_row(
                "app",
                numbackends=14,
                xact_commit=1000,
                xact_rollback=7,
                sessions=50,
                sessions_abandoned=3,
                sessions_fatal=1,
                sessions_killed=2,
                session_time=120_000.0,
                active_time=30_000.0,
                idle_in_transaction_time=4_500.0,
            ),
            database_row("postgres", numbackends=1, xact_commit=10),
        ],
    )


# --------------------------------------------------------------------------------------------------
# pure: rows → observation
# --------------------------------------------------------------------------------------------------


def test_observation_from_rows_has_exact_values() -> None:
    obs = sample_observation()
    assert obs.server_version_num == 160002
    assert (obs.max_connections, obs.superuser_reserved_connections, obs.reserved_connections) == (100, 3, 2)
    assert obs.statement_timeout_seconds == 30.0
    assert obs.idle_in_transaction_session_timeout_seconds == 0.0
    assert obs.total_client_backends == 13
    assert obs.usable_connections == 95
    assert obs.connections_available == 82
    assert obs.can_read_all_stats is True
    assert obs.role == "poolwatch" and obs.database == "postgres"
    assert obs.oldest_backend_age_by_application == {"api": 400.0, "worker": 80.0, "poolwatch": 5.0}
    assert obs.connections_by_application() == {"api": 10, "worker": 2, "poolwatch": 1}
    assert obs.connections_by_client_addr() == {"10.0.0.5": 10, "10.0.0.9": 2, None: 1}
    # "bypassing PgBouncer": everything not from the pooler at 10.0.0.5 (Unix socket counted)
    assert obs.connections_not_from({"10.0.0.5"}) == 3
    assert obs.connections_not_from({"10.0.0.5", None}) == 2
    assert obs.session_counters_supported is True
    app = next(d for d in obs.databases or [] if d.datname == "app")
    assert (app.sessions, app.sessions_abandoned, app.sessions_fatal, app.sessions_killed) == (50, 3, 1, 2)
    assert (app.session_time_seconds, app.active_time_seconds, app.idle_in_transaction_time_seconds) == (
        120.0,
        30.0,
        4.5,
    )
    assert obs.wait_events is not None and len(obs.wait_events) == 3


def test_missing_collectors_leave_fields_unknown_not_zero() -> None:
    obs = build_observation("pg-a", NOW, activity_rows=[activity_row("db", "u", "a", "idle", 2)])
    assert obs.total_client_backends == 2
    assert obs.max_connections is None
    assert obs.usable_connections is None and obs.connections_available is None
    assert obs.databases is None and obs.clients is None and obs.wait_events is None
    assert obs.connections_by_client_addr() is None
    assert obs.connections_not_from({"10.0.0.1"}) is None
    names = family_names(observation_families(obs))
    assert "pg_settings_max_connections" not in names
    assert "pg_connections_available" not in names
    assert "pg_connections_used" in names


def test_reserved_connections_is_zero_before_16_and_read_from_16() -> None:
    old = build_observation("t", NOW, settings_rows=settings_rows(version=150004), role_setting_rows=[])
    assert old.reserved_connections == 0
    new = build_observation(
        "t", NOW, settings_rows=settings_rows(version=160000, reserved=5), role_setting_rows=[]
    )
    assert new.reserved_connections == 5


def test_session_counters_are_absent_before_14_not_zero() -> None:
    obs = build_observation(
        "pg-old",
        NOW,
        settings_rows=settings_rows(version=130011),
        role_setting_rows=[],
        database_rows=[database_row("app", pre14=True, numbackends=3, xact_commit=9, xact_rollback=1)],
    )
    assert obs.session_counters_supported is False
    db = (obs.databases or [])[0]
    assert db.sessions is None and db.session_time_seconds is None
    families = observation_families(obs)
    names = family_names(families)
    assert "pg_stat_database_sessions" not in names
    assert "pg_stat_database_session_time_seconds" not in names
    assert value_of(families, "pg_stat_database_xact_commit_total", datname="app") == 9
    assert value_of(families, "pg_stat_database_numbackends", datname="app") == 3


def test_without_pg_read_all_stats_activity_is_unknown() -> None:
    rows = [
        activity_row("db", "me", "x", "active", 1, privileged=False),
        activity_row("db", None, "", None, 7, privileged=False),
    ]
    obs = build_observation(
        "t",
        NOW,
        settings_rows=settings_rows(),
        role_setting_rows=[],
        activity_rows=rows,
        wait_event_rows=[
            {"datname": "db", "wait_event_type": None, "connections": 8, "can_read_all_stats": False}
        ],
        client_rows=[
            {"client_addr": None, "application_name": "", "connections": 8, "can_read_all_stats": False}
        ],
    )
    assert obs.can_read_all_stats is False
    assert obs.activity is None and obs.total_client_backends is None
    assert obs.wait_events is None and obs.clients is None
    names = family_names(observation_families(obs))
    assert not {n for n in names if n.startswith("pg_stat_activity")}
    assert "pg_connections_used" not in names
    assert "pg_settings_max_connections" in names


def test_timeout_default_is_unknown_when_an_override_hits_poolwatchs_own_session() -> None:
    overrides: list[dict[str, Any]] = [
        {"datname": None, "rolname": "poolwatch", "name": "statement_timeout", "value": "5s"},
        {"datname": "app", "rolname": None, "name": "idle_in_transaction_session_timeout", "value": "60000"},
        {"datname": "app", "rolname": "web", "name": "statement_timeout", "value": "1min"},
    ]
    obs = build_observation(
        "t", NOW, settings_rows=settings_rows(statement_timeout_ms="5000"), role_setting_rows=overrides
    )
    # reset_val (5000 ms) came from ALTER ROLE poolwatch: not the server default
    assert obs.statement_timeout_seconds is None
    # the database override is for "app", poolwatch sits in "postgres": reset_val is the default
    assert obs.idle_in_transaction_session_timeout_seconds == 0.0
    assert obs.setting_overrides == [
        SettingOverride(None, "poolwatch", "statement_timeout", 5.0, "5s"),
        SettingOverride("app", None, "idle_in_transaction_session_timeout", 60.0, "60000"),
        SettingOverride("app", "web", "statement_timeout", 60.0, "1min"),
    ]
    # without the override list the defaults cannot be vouched for either
    unknown = build_observation("t", NOW, settings_rows=settings_rows())
    assert unknown.statement_timeout_seconds is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("60000", 60.0),
        ("5s", 5.0),
        ("1min", 60.0),
        ("1.5h", 5400.0),
        ("250ms", 0.25),
        ("2d", 172800.0),
        ("'10s'", 10.0),
        ("500us", 0.0005),
        ("ten seconds", None),
        ("5 parsecs", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_duration_seconds(text: str | None, seconds: float | None) -> None:
    assert parse_duration_seconds(text) == seconds


# --------------------------------------------------------------------------------------------------
# pure: observation → families
# --------------------------------------------------------------------------------------------------


def test_families_have_exact_values() -> None:
    families = observation_families(sample_observation())
    v = value_of
    assert v(families, "pg_settings_max_connections", target="pg-a") == 100
    assert v(families, "pg_settings_superuser_reserved_connections") == 3
    assert v(families, "pg_settings_reserved_connections") == 2
    assert v(families, "pg_settings_server_version_num") == 160002
    assert v(families, "pg_settings_statement_timeout_seconds") == 30
    assert v(families, "pg_settings_idle_in_transaction_session_timeout_seconds") == 0
    assert v(families, "pg_connections_used") == 13
    assert v(families, "pg_connections_available") == 100 - 3 - 2 - 13

    # compat count: per (datname, state), summed over roles and applications, zero-filled
    assert v(families, "pg_stat_activity_count", datname="app", state="active") == 4
    assert v(families, "pg_stat_activity_count", datname="app", state="idle") == 6
    assert v(families, "pg_stat_activity_count", datname="app", state="idle in transaction") == 2
    assert v(families, "pg_stat_activity_count", datname="app", state="idle in transaction (aborted)") == 0
    assert v(families, "pg_stat_activity_count", datname="postgres", state="idle") == 0
    assert total(families, "pg_stat_activity_count") == 13

    api_idle = {"datname": "app", "usename": "web", "application_name": "api", "state": "idle"}
    assert v(families, "pg_stat_activity_connections", **api_idle) == 6
    assert v(families, "pg_stat_activity_max_tx_duration", **api_idle) == 0  # no open transaction
    assert v(families, "pg_stat_activity_max_state_duration_seconds", **api_idle) == 30
    stuck = {"datname": "app", "usename": "web", "application_name": "worker", "state": "idle in transaction"}
    assert v(families, "pg_stat_activity_max_tx_duration", **stuck) == 75
    assert v(families, "pg_stat_activity_max_state_duration_seconds", **stuck) == 70
    assert (
        v(
            families,
            "pg_stat_activity_oldest_backend_age_seconds",
            datname="app",
            usename="web",
            application_name="api",
        )
        == 400
    )
    assert v(families, "pg_stat_activity_wait_event_type_count", datname="app", wait_event_type="Lock") == 1
    assert v(families, "pg_stat_activity_wait_event_type_count", datname="app", wait_event_type="") == 3

    assert v(families, "pg_stat_database_numbackends", datname="app") == 14
    assert v(families, "pg_stat_database_xact_commit_total", datname="app") == 1000
    assert v(families, "pg_stat_database_xact_rollback_total", datname="app") == 7
    assert v(families, "pg_stat_database_sessions_total", datname="app") == 50
    assert v(families, "pg_stat_database_sessions_abandoned_total", datname="app") == 3
    assert v(families, "pg_stat_database_sessions_fatal_total", datname="app") == 1
    assert v(families, "pg_stat_database_sessions_killed_total", datname="app") == 2
    assert v(families, "pg_stat_database_session_time_seconds_total", datname="app") == 120
    assert v(families, "pg_stat_database_active_time_seconds_total", datname="app") == 30
    assert v(families, "pg_stat_database_idle_in_transaction_time_seconds_total", datname="app") == 4.5


def test_every_sample_carries_the_target_label() -> None:
    families = [up_family("pg-a", True), *observation_families(sample_observation())]
    assert len(families) > 20
    for family in families:
        for sample in family.samples:
            assert sample.labels.get("target") == "pg-a", sample


def test_up_family() -> None:
    assert value_of([up_family("x", True)], "pg_up", target="x") == 1
    assert value_of([up_family("x", False)], "pg_up", target="x") == 0


def test_application_names_beyond_the_cap_fold_into_other() -> None:
    rows = [activity_row("db", "u", f"app-{i:02d}", "idle", i + 1, backend=float(i)) for i in range(12)]
    obs = build_observation("t", NOW, activity_rows=rows)
    families = observation_families(obs, max_application_names=5)
    apps = {
        s.labels["application_name"]
        for f in families
        if f.name == "pg_stat_activity_connections"
        for s in f.samples
    }
    # the five busiest stay (app-07..app-11 have 8..12 connections), the rest are folded
    assert apps == {"app-07", "app-08", "app-09", "app-10", "app-11", OTHER_APPLICATION}
    assert value_of(families, "pg_stat_activity_connections", application_name=OTHER_APPLICATION) == sum(
        range(1, 8)
    )
    assert total(families, "pg_stat_activity_connections") == sum(range(1, 13))
    assert (
        value_of(families, "pg_stat_activity_oldest_backend_age_seconds", application_name=OTHER_APPLICATION)
        == 6.0
    )
    # the observation keeps every name for the doctor
    assert len(obs.connections_by_application() or {}) == 12


def test_null_labels_become_empty_and_backends_without_state_are_counted() -> None:
    obs = build_observation("t", NOW, activity_rows=[activity_row("db", None, None, None, 2, state_age=None)])
    families = observation_families(obs)
    assert (
        value_of(
            families, "pg_stat_activity_connections", datname="db", usename="", application_name="", state=""
        )
        == 2
    )
    assert value_of(families, "pg_stat_activity_count", datname="db", state="") == 2
    # no state age known: no sample rather than a made-up 0
    assert value_of(families, "pg_stat_activity_max_state_duration_seconds", datname="db") is None


_label_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datname=_label_text, usename=_label_text, app=_label_text)
def test_any_user_controlled_text_survives_exposition(datname: str, usename: str, app: str) -> None:
    obs = build_observation("t", NOW, activity_rows=[activity_row(datname, usename, app, "idle", 3)])
    text = exposition(observation_families(obs))
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    samples = parsed["pg_stat_activity_connections"].samples
    assert [
        (s.labels["datname"], s.labels["usename"], s.labels["application_name"], s.value) for s in samples
    ] == [(datname, usename, app, 3.0)]


def test_quotes_newlines_and_unicode_in_labels_render() -> None:
    weird = 'it\'s "quoted"\nline2 \\ é 漢字'
    obs = build_observation("t", NOW, activity_rows=[activity_row(weird, weird, weird, "idle", 1)])
    text = exposition(observation_families(obs))
    assert '\\"quoted\\"\\nline2 \\\\ é 漢字' in text


# --------------------------------------------------------------------------------------------------
# pure: error hygiene
# --------------------------------------------------------------------------------------------------


def test_describe_and_scrub_never_show_a_password() -> None:
    dsn = "postgresql://mon:S3cretPw@db.example:5433/postgres?sslmode=require&password=AlsoSecret"
    assert describe_dsn(dsn) == "postgresql://mon@db.example:5433/postgres"
    message = f"failed for {dsn}; password=AlsoSecret; conn postgresql://x:S3cretPw@h/d"
    cleaned = scrub(message, ["S3cretPw", "AlsoSecret"])
    assert "S3cretPw" not in cleaned and "AlsoSecret" not in cleaned
    # secrets the caller did not list are still caught by shape
    assert "hunter2" not in scrub("postgres://u:hunter2@h/db password='hunter2 x'", [])


def test_keyword_dsn_becomes_an_asyncpg_url() -> None:
    assert (
        asyncpg_dsn("host=127.0.0.1 port=5432 user=poolwatch dbname=postgres connect_timeout=5")
        == "postgresql://poolwatch@127.0.0.1:5432/postgres"
    )
    assert (
        asyncpg_dsn("host=/run/pg port=5433 user=a dbname=b sslmode=disable")
        == "postgresql://a@/b?host=/run/pg&port=5433&sslmode=disable"
    )
    url = "postgresql://u@h:1/d"
    assert asyncpg_dsn(url) == url
    with pytest.raises(ValueError):
        asyncpg_dsn("host=x password='unterminated")


def test_unparseable_dsn_is_a_config_failure_without_the_secret() -> None:
    source = PostgresSource("bad", "host=x password='Zq9unterminated", None, connect_timeout=1)
    assert "Zq9" not in repr(source)
    result = asyncio.run(source.collect(1))
    assert not result.up and result.reason == "config"
    assert "Zq9" not in (result.detail or "")


@pytest.mark.parametrize(
    ("exc", "reason", "needle"),
    [
        (
            asyncpg.exceptions.InvalidPasswordError('password authentication failed for user "m"'),
            "auth",
            "password",
        ),
        (asyncpg.exceptions.InvalidAuthorizationSpecificationError("no pg_hba.conf entry"), "auth", "pg_hba"),
        (asyncpg.exceptions.InvalidCatalogNameError('database "nope" does not exist'), "connect", "database"),
        (asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"), "connect", "slots"),
        (
            asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
            "connect",
            "starting",
        ),
        (ConnectionRefusedError(111, "Connect call failed"), "connect", "running"),
        (TimeoutError(), "connect", "within 2s"),
        (asyncpg.exceptions.ClientConfigurationError("bad sslmode"), "config", "sslmode"),
    ],
)
def test_connect_errors_are_classified(exc: BaseException, reason: str, needle: str) -> None:
    got_reason, detail = classify_connect_error(exc, "postgresql://m@h:5432/postgres", 2.0)
    assert got_reason == reason
    assert needle in detail


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout"), "timeout"),
        (asyncpg.exceptions.InsufficientPrivilegeError("permission denied for view x"), "privilege"),
        (asyncpg.exceptions.UndefinedColumnError('column "sessions" does not exist'), "query"),
        (asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"), "connect"),
        (TimeoutError(), "timeout"),
    ],
)
def test_query_errors_are_classified(exc: BaseException, reason: str) -> None:
    assert classify_query_error(exc, "activity")[0] == reason


# --------------------------------------------------------------------------------------------------
# live: a real PostgreSQL
# --------------------------------------------------------------------------------------------------

MAX_CONNECTIONS = 40
SUPERUSER_RESERVED = 3


def _start_server(**settings: str | int) -> Any:
    localcluster = pytest.importorskip("poolwatch.localcluster")
    try:
        localcluster.find_pg_bindir()
    except localcluster.ServerError as exc:
        pytest.skip(str(exc))
    # Not tmp_path: pytest's base directory is 0700 root, which the postgres OS user cannot enter.
    base = tempfile.mkdtemp(prefix="pw-pgsrc-")
    server = localcluster.PostgresServer(
        base,
        max_connections=MAX_CONNECTIONS,
        settings={"superuser_reserved_connections": SUPERUSER_RESERVED, **settings},
    )
    try:
        server.start()
    except BaseException:
        server.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)
        raise
    return server


def _stop_server(server: Any) -> None:
    server.stop("immediate")
    shutil.rmtree(server.base_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def pg_server() -> Iterator[Any]:
    server = _start_server()
    try:
        yield server
    finally:
        _stop_server(server)


@pytest.fixture
async def admin(pg_server: Any) -> AsyncIterator[asyncpg.Connection]:
    """Superuser over the Unix socket; waits until earlier tests' sessions are gone."""
    conn = await asyncpg.connect(asyncpg_dsn(pg_server.superuser_dsn()))
    try:
        await _wait_for(
            conn,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
            " AND pid <> pg_backend_pid()",
            0,
        )
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def source(pg_server: Any) -> AsyncIterator[PostgresSource]:
    src = PostgresSource("pg-live", pg_server.monitor_dsn(), pg_server.monitor_password, connect_timeout=5)
    try:
        yield src
    finally:
        await src.close()


async def _wait_for(conn: asyncpg.Connection, query: str, expected: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = await conn.fetchval(query)
        if got == expected or time.monotonic() > deadline:
            assert got == expected, f"{query} -> {got!r}, expected {expected!r}"
            return
        await asyncio.sleep(0.05)


async def _connect(
    server: Any, *, application_name: str = "", dbname: str = "postgres"
) -> asyncpg.Connection:
    return await asyncpg.connect(
        asyncpg_dsn(server.superuser_dsn(dbname)), server_settings={"application_name": application_name}
    )


@contextlib.asynccontextmanager
async def _sessions(server: Any, n: int, **kwargs: str) -> AsyncIterator[list[asyncpg.Connection]]:
    conns = [await _connect(server, **kwargs) for _ in range(n)]
    try:
        yield conns
    finally:
        for conn in conns:
            await conn.close()


def _group(result_obs: object, **match: str) -> ActivityGroup:
    assert isinstance(result_obs, PostgresObservation) and result_obs.activity is not None
    found = [g for g in result_obs.activity if all(getattr(g, k) == v for k, v in match.items())]
    assert len(found) == 1, (match, result_obs.activity)
    return found[0]


# The three queries the one pg_stat_activity scan replaced, as they were: the reference it must match.
_SEPARATE_ACTIVITY_SQL = {
    ACTIVITY: """SELECT datname, usename, application_name, state, count(*)::int8 AS connections
        FROM pg_catalog.pg_stat_activity WHERE backend_type = 'client backend'
        GROUP BY datname, usename, application_name, state""",
    "wait_events": """SELECT datname, wait_event_type, count(*)::int8 AS connections
        FROM pg_catalog.pg_stat_activity WHERE backend_type = 'client backend'
        GROUP BY datname, wait_event_type""",
    "clients": """SELECT pg_catalog.host(client_addr) AS client_addr, application_name,
            count(*)::int8 AS connections,
            array_agg(client_port) FILTER (WHERE client_port > 0) AS client_ports
        FROM pg_catalog.pg_stat_activity WHERE backend_type = 'client backend'
        GROUP BY client_addr, application_name""",
}


async def test_one_activity_scan_equals_the_three_separate_queries(
    pg_server: Any, admin: asyncpg.Connection
) -> None:
    """GROUPING SETS over one scan give the same groups and counts as three GROUP BY queries."""
    async with (
        _sessions(pg_server, 3, application_name="app-a") as a,
        _sessions(pg_server, 2, application_name="") as _,
        _sessions(pg_server, 2, application_name="app-b") as b,
    ):
        await a[0].execute("BEGIN; SELECT 1")  # idle in transaction
        with contextlib.suppress(asyncpg.PostgresError):
            await b[0].execute("BEGIN; SELECT 1/0")  # idle in transaction (aborted)
        # over TCP: a client address and ports
        tcp = await asyncpg.connect(
            asyncpg_dsn(pg_server.monitor_dsn()),
            password=pg_server.monitor_password,
            server_settings={"application_name": "app-a"},
        )
        try:
            # one transaction: pg_stat_activity is read once per transaction, so all four agree
            async with admin.transaction(isolation="repeatable_read"):
                combined = split_pg_stat_activity(await admin.fetch(PG_STAT_ACTIVITY_SQL))
                separate = {name: await admin.fetch(sql) for name, sql in _SEPARATE_ACTIVITY_SQL.items()}
        finally:
            await tcp.close()
    for name, rows in separate.items():
        keys = [k for k, _ in rows[0].items() if k != "client_ports"]  # a Record iterates values
        ports = name == "clients"

        def shape(
            records: Sequence[Any], keys: list[str] = keys, ports: bool = ports
        ) -> list[tuple[Any, ...]]:
            return sorted(
                (
                    (*(r[k] for k in keys), tuple(sorted(r["client_ports"] or ())) if ports else ())
                    for r in records
                ),
                key=repr,
            )

        assert shape(combined[name]) == shape(rows), name
        assert all(r["can_read_all_stats"] and r["role_name"] for r in combined[name])
    assert sum(r["connections"] for r in combined[ACTIVITY]) >= 8


async def test_live_collection_answers_every_collector(
    source: PostgresSource, admin: asyncpg.Connection
) -> None:
    result = await source.collect(5)
    assert result.up and result.reason is None, result.detail
    assert [o.collector for o in result.outcomes] == list(COLLECTORS)
    assert all(o.ok for o in result.outcomes), result.outcomes
    obs = result.observation
    assert isinstance(obs, PostgresObservation)
    assert obs.role == "poolwatch" and obs.can_read_all_stats is True
    assert obs.max_connections == MAX_CONNECTIONS
    assert obs.superuser_reserved_connections == SUPERUSER_RESERVED
    assert obs.server_version_num is not None and obs.server_version_num >= 100000
    assert obs.statement_timeout_seconds == 0.0  # the server default, not poolwatch's own SET
    assert value_of(result.families, "pg_up", target="pg-live") == 1
    # poolwatch's own connection is counted and recognisable
    mine = _group(obs, application_name="poolwatch")
    assert (mine.usename, mine.state, mine.connections) == ("poolwatch", "active", 1)
    mine_client = [
        c for c in obs.clients or [] if (c.client_addr, c.application_name) == ("127.0.0.1", "poolwatch")
    ]
    assert [c.connections for c in mine_client] == [1]
    assert len(mine_client[0].client_ports) == 1 and mine_client[0].client_ports[0] > 0
    for family in result.families:
        for sample in family.samples:
            assert sample.labels["target"] == "pg-live"
    exposition(result.families)  # renders without duplicates or bad labels


async def test_idle_in_transaction_session_is_counted_with_its_age(
    pg_server: Any, source: PostgresSource, admin: asyncpg.Connection
) -> None:
    holder = await _connect(pg_server, application_name="holder")
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1")
        await asyncio.sleep(2.1)
        result = await source.collect(5)
        await tx.rollback()
    finally:
        await holder.close()
    group = _group(result.observation, application_name="holder")
    assert group.state == "idle in transaction"
    assert group.connections == 1
    assert group.max_state_age_seconds is not None and group.max_state_age_seconds >= 2.0
    assert group.oldest_xact_age_seconds is not None and group.oldest_xact_age_seconds >= 2.0
    labels = {"datname": "postgres", "usename": "postgres", "application_name": "holder"}
    families = result.families
    assert value_of(families, "pg_stat_activity_count", datname="postgres", state="idle in transaction") == 1
    assert value_of(families, "pg_stat_activity_connections", state="idle in transaction", **labels) == 1
    assert (
        value_of(families, "pg_stat_activity_max_tx_duration", state="idle in transaction", **labels) or 0
    ) >= 2
    assert (
        value_of(
            families, "pg_stat_activity_max_state_duration_seconds", state="idle in transaction", **labels
        )
        or 0
    ) >= 2
    assert (value_of(families, "pg_stat_activity_oldest_backend_age_seconds", **labels) or 0) >= 2


async def test_sessions_are_counted_per_application_name(
    pg_server: Any, source: PostgresSource, admin: asyncpg.Connection
) -> None:
    async with _sessions(pg_server, 3, application_name="churny"):
        result = await source.collect(5)
    obs = result.observation
    assert isinstance(obs, PostgresObservation)
    assert (obs.connections_by_application() or {})["churny"] == 3
    assert total(result.families, "pg_stat_activity_connections", application_name="churny") == 3
    assert (
        value_of(result.families, "pg_stat_activity_connections", application_name="churny", state="idle")
        == 3
    )
    # over the Unix socket: no client address
    assert ClientCount(None, "churny", 3) in (obs.clients or [])
    assert "churny" in (obs.oldest_backend_age_by_application or {})


async def test_used_and_available_slots(
    pg_server: Any, source: PostgresSource, admin: asyncpg.Connection
) -> None:
    async with _sessions(pg_server, 4, application_name="slots"):
        result = await source.collect(5)
    # admin + 4 sessions + poolwatch's own connection
    used = 1 + 4 + 1
    obs = result.observation
    assert isinstance(obs, PostgresObservation)
    assert obs.total_client_backends == used
    if (obs.server_version_num or 0) < 160000:
        assert obs.reserved_connections == 0
    available = MAX_CONNECTIONS - SUPERUSER_RESERVED - (obs.reserved_connections or 0) - used
    assert obs.connections_available == available
    assert value_of(result.families, "pg_connections_used") == used
    assert value_of(result.families, "pg_connections_available") == available
    assert value_of(result.families, "pg_settings_max_connections") == MAX_CONNECTIONS


async def test_role_without_pg_monitor_reports_privilege(pg_server: Any, admin: asyncpg.Connection) -> None:
    password = "Wx-7f2-not-in-any-detail"
    await admin.execute(
        f"DROP ROLE IF EXISTS plain_watcher; CREATE ROLE plain_watcher LOGIN PASSWORD '{password}'"
    )
    dsn = f"postgresql://plain_watcher@127.0.0.1:{pg_server.port}/postgres"
    src = PostgresSource("pg-plain", dsn, password, connect_timeout=5)
    try:
        async with _sessions(pg_server, 2, application_name="someone-else"):
            result = await src.collect(5)
            outcomes = {o.collector: o for o in result.outcomes}
            # the server answered: up, but the activity view is partial and says how to fix it
            assert result.up
            assert result.reason == "privilege"
            for name in (ACTIVITY, "wait_events", "clients"):
                assert not outcomes[name].ok and outcomes[name].reason == "privilege"
            assert 'GRANT pg_monitor TO "plain_watcher"' in (outcomes[ACTIVITY].detail or "")
            assert outcomes["settings"].ok and outcomes["database"].ok and outcomes["role_settings"].ok
            names = family_names(result.families)
            assert "pg_stat_activity_connections" not in names and "pg_connections_used" not in names
            assert "pg_settings_max_connections" in names
            assert value_of(result.families, "pg_up") == 1

            await admin.execute("GRANT pg_monitor TO plain_watcher")
            fixed = await src.collect(5)
            assert fixed.reason is None and all(o.ok for o in fixed.outcomes), fixed.outcomes
            assert isinstance(fixed.observation, PostgresObservation)
            assert (fixed.observation.connections_by_application() or {})["someone-else"] == 2
        assert password not in repr([result, fixed])
    finally:
        await src.close()
        await admin.execute("DROP ROLE plain_watcher")


async def test_session_counters_count_how_sessions_end(
    pg_server: Any, source: PostgresSource, admin: asyncpg.Connection
) -> None:
    first = await source.collect(5)
    assert isinstance(first.observation, PostgresObservation)
    if not first.observation.session_counters_supported:
        pytest.skip("pg_stat_database session counters need PostgreSQL 14")
    await admin.execute("DROP DATABASE IF EXISTS counters")
    await admin.execute("CREATE DATABASE counters")

    async def counters() -> tuple[float | None, ...]:
        result = await source.collect(5)
        assert isinstance(result.observation, PostgresObservation)
        db = next(d for d in result.observation.databases or [] if d.datname == "counters")
        assert value_of(result.families, "pg_stat_database_sessions_total", datname="counters") == db.sessions
        return (
            db.sessions,
            db.sessions_abandoned,
            db.sessions_fatal,
            db.sessions_killed,
            db.session_time_seconds,
        )

    before = await counters()
    normal = await _connect(pg_server, dbname="counters")
    abandoned = await _connect(pg_server, dbname="counters")
    killed = await _connect(pg_server, dbname="counters")
    await asyncio.sleep(0.2)  # some session time to add up
    await normal.close()  # a clean Terminate message
    # asyncpg's terminate() still sends Terminate; a client that crashes just drops the socket.
    abandoned._transport.abort()
    abandoned.terminate()
    await admin.fetchval("SELECT pg_terminate_backend($1)", killed.get_server_pid())
    killed.terminate()

    expected = (before[0] or 0) + 3, (before[1] or 0) + 1, before[2], (before[3] or 0) + 1
    deadline = time.monotonic() + 10
    after = await counters()
    while after[:4] != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        after = await counters()
    assert after[:4] == expected
    assert (after[4] or 0) > (before[4] or 0)
    await admin.execute("DROP DATABASE counters")


async def test_concurrent_collections_share_one_and_stay_within_the_pool(
    pg_server: Any, admin: asyncpg.Connection
) -> None:
    await admin.execute("DROP DATABASE IF EXISTS pooltest")
    await admin.execute("CREATE DATABASE pooltest")
    dsn = f"postgresql://poolwatch@127.0.0.1:{pg_server.port}/pooltest"
    src = PostgresSource("pg-pool", dsn, pg_server.monitor_password, connect_timeout=5, pool_max_size=2)
    try:
        for _ in range(3):
            results = await asyncio.gather(
                *(src.collect(5) for _ in range(6)), *(src.select1(5) for _ in range(6))
            )
            collections = results[:6]
            assert all(r is collections[0] for r in collections)
            first = collections[0]
            assert first is not None and first.up
        again = await src.collect(5)
        assert again is not first  # a finished collection is not reused
        assert isinstance(again.observation, PostgresObservation)
        pooltest = next(d for d in again.observation.databases or [] if d.datname == "pooltest")
        if pooltest.sessions is not None:
            # every connection poolwatch ever opened to this database, over 3 rounds of 12 calls
            assert pooltest.sessions <= 2
    finally:
        await src.close()
    await _wait_for(admin, "SELECT count(*) FROM pg_stat_activity WHERE datname = 'pooltest'", 0)
    await admin.execute("DROP DATABASE pooltest")


class _HungActivity(PostgresSource):
    """The core query never returns: what a stuck catalog or a wedged server looks like."""

    def _plan(self, server_version_num: int) -> list[tuple[str, str]]:
        plan = super()._plan(server_version_num)
        return [(ACTIVITY, "SELECT pg_sleep(30) /* hung-activity */"), *plan[1:]]


async def test_hung_query_is_bounded_on_both_sides(pg_server: Any, admin: asyncpg.Connection) -> None:
    src = _HungActivity("pg-hung", pg_server.monitor_dsn(), pg_server.monitor_password, connect_timeout=5)
    try:
        started = time.monotonic()
        result = await src.collect(1.0)
        elapsed = time.monotonic() - started
        assert elapsed < 2.0
        assert not result.up and result.reason == "timeout"
        assert {o.collector: o.reason for o in result.outcomes}[ACTIVITY] == "timeout"
        assert value_of(result.families, "pg_up") == 0
        # the server does not keep running it for 30 s (statement_timeout + dropped connection)
        await _wait_for(
            admin,
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE query LIKE '%hung-activity%' AND pid <> pg_backend_pid()",
            0,
            timeout=5,
        )
        # and the next collection starts from fresh connections
        healthy = PostgresSource(
            "pg-ok", pg_server.monitor_dsn(), pg_server.monitor_password, connect_timeout=5
        )
        try:
            assert (await healthy.collect(5)).up
        finally:
            await healthy.close()
    finally:
        await src.close()


async def test_wrong_password_is_auth_and_never_echoed(pg_server: Any, admin: asyncpg.Connection) -> None:
    secret = "Qv8-wrong-password-91"
    as_param = PostgresSource("pg-auth", pg_server.monitor_dsn(), secret, connect_timeout=5)
    in_dsn = PostgresSource(
        "pg-auth2",
        f"postgresql://poolwatch:{secret}@127.0.0.1:{pg_server.port}/postgres",
        None,
        connect_timeout=5,
    )
    try:
        for src in (as_param, in_dsn):
            result = await src.collect(5)
            assert not result.up and result.reason == "auth", result.detail
            assert "password" in (result.detail or "")
            assert all(o.reason == "auth" and not o.ok for o in result.outcomes)
            assert secret not in repr(result) and secret not in repr(src)
            assert result.observation is None
    finally:
        await as_param.close()
        await in_dsn.close()


async def test_select1_probe(source: PostgresSource, admin: asyncpg.Connection) -> None:
    await source.select1(5)
    result = await source.collect(5)
    assert result.up


async def test_closed_source_refuses_work(source: PostgresSource) -> None:
    await source.close()
    with pytest.raises(RuntimeError):
        await source.collect(1)


@pytest.mark.slow
async def test_stopped_server_is_down_with_reason_connect_and_recovers() -> None:
    server = await asyncio.to_thread(_start_server)
    src = PostgresSource("pg-stop", server.monitor_dsn(), server.monitor_password, connect_timeout=2)
    try:
        assert (await src.collect(5)).up
        await asyncio.to_thread(server.stop, "fast")

        started = time.monotonic()
        result = await src.collect(3)
        assert time.monotonic() - started < 3.0
        assert not result.up and result.reason == "connect", result.detail
        assert value_of(result.families, "pg_up", target="pg-stop") == 0
        assert [o.collector for o in result.outcomes] == list(COLLECTORS)
        assert not any(o.ok for o in result.outcomes)
        assert result.observation is None

        await asyncio.to_thread(server.start)
        recovered = await src.collect(5)
        assert recovered.up and all(o.ok for o in recovered.outcomes), recovered.outcomes
    finally:
        await src.close()
        await asyncio.to_thread(_stop_server, server)


# --------------------------------------------------------------------------------------------------
# One statement per collection
# --------------------------------------------------------------------------------------------------


def test_groups_of_oids_without_a_name_merge_like_grouping_by_name() -> None:
    """Two dropped roles' sessions in one database and state: one group, as pg_stat_activity's
    usename (NULL for both) would give."""

    def row(usename: str | None, n: int, age: float | None) -> dict[str, Any]:
        return {**activity_row("app", usename, "web", "idle", n, state_age=age), "collector": ACTIVITY}

    rows = [row(None, 2, 5.0), row("app", 1, 1.0), row(None, 3, None)]
    parts = split_pg_stat_activity(rows)
    merged = [r for r in parts[ACTIVITY] if r["usename"] is None]
    assert len(parts[ACTIVITY]) == 2 and len(merged) == 1
    assert merged[0]["connections"] == 5 and merged[0]["max_state_age_seconds"] == 5.0
    named = [row("a", 1, 1.0), row("b", 1, 1.0)]
    assert split_pg_stat_activity(named)[ACTIVITY] == named  # nothing to merge: as they were


def _families_one_sample_at_a_time(obs: PostgresObservation, limit: int) -> list[tuple[Any, ...]]:
    """The per-group activity families as FamilyBuilder.add built them, sample by sample."""
    from poolwatch.metrics import gauge
    from poolwatch.sources.postgres import _fold_applications

    names = ("target", "datname", "usename", "application_name", "state")
    built = {n: gauge(n, "", names) for n in ("connections", "max_tx", "max_state")}
    for g in _fold_applications(obs.activity or [], limit):
        labels = [obs.target, g.datname, g.usename, g.application_name, g.state]
        built["connections"].add(labels, g.connections)
        built["max_tx"].add(labels, g.oldest_xact_age_seconds or 0.0)
        built["max_state"].add(labels, g.max_state_age_seconds)
    return [[(s.labels, s.value) for s in b.build().samples] for b in built.values()]


@pytest.mark.parametrize("limit", [50, 2])
@pytest.mark.parametrize("collide", [False, True])
def test_per_group_families_equal_sample_by_sample_building(limit: int, collide: bool) -> None:
    groups = [
        ActivityGroup("app", "web", "a", "idle", 3, None, 1.5, 10.0),
        ActivityGroup("app", "web", "b", "active", 2, 4.0, None, 20.0),
        ActivityGroup("app", None, "c", None, 1, float("nan"), 0.0, None),
        ActivityGroup("db2", "web", "a", "idle", 5, 0.0, 7.0, 3.0),
    ]
    if collide:  # NULL and "" give one label set: the first one wins
        groups.append(ActivityGroup("app", "", "c", "", 9, 1.0, 1.0, 1.0))
    obs = PostgresObservation(target="t", collected_at=NOW, activity=groups, total_client_backends=20)
    families = {f.name: f for f in observation_families(obs, max_application_names=limit)}
    got = [
        [(s.labels, s.value) for s in families[name].samples]
        for name in (
            "pg_stat_activity_connections",
            "pg_stat_activity_max_tx_duration",
            "pg_stat_activity_max_state_duration_seconds",
        )
    ]
    assert repr(got) == repr(_families_one_sample_at_a_time(obs, limit))


async def test_one_statement_answers_what_the_separate_queries_answer(
    pg_server: Any, admin: asyncpg.Connection
) -> None:
    """COLLECTION_SQL's parts equal PG_STAT_ACTIVITY_SQL, SETTINGS_SQL, database_sql() and
    ROLE_SETTINGS_SQL (in the same order where order matters: the overrides)."""
    from poolwatch.sources.postgres import (
        ROLE_SETTINGS_SQL,
        SETTINGS_SQL,
        collection_sql,
        database_sql,
    )

    await admin.execute(
        "DROP ROLE IF EXISTS web_a; CREATE ROLE web_a; DROP ROLE IF EXISTS web_b; CREATE ROLE web_b"
    )
    await admin.execute(
        "ALTER ROLE web_b SET statement_timeout = '5s'; ALTER ROLE web_a SET statement_timeout = '1min';"
        " ALTER ROLE web_a IN DATABASE postgres SET idle_in_transaction_session_timeout = 60000;"
        " ALTER DATABASE postgres SET statement_timeout = '30s'"
    )
    try:
        async with _sessions(pg_server, 3, application_name="app-a"):
            version = await admin.fetchval("SELECT current_setting('server_version_num')::int")
            async with admin.transaction(isolation="repeatable_read"):
                combined = split_pg_stat_activity(await admin.fetch(collection_sql(version), None))
                separate = split_pg_stat_activity(await admin.fetch(PG_STAT_ACTIVITY_SQL))
                separate["settings"] = await admin.fetch(SETTINGS_SQL)
                separate["database"] = await admin.fetch(database_sql(version))
                separate["role_settings"] = await admin.fetch(ROLE_SETTINGS_SQL)
    finally:
        await admin.execute(
            "ALTER DATABASE postgres RESET statement_timeout; DROP ROLE web_a; DROP ROLE web_b"
        )
    assert len(combined["role_settings"]) == 4
    for name, rows in separate.items():
        keys = [
            k
            for k in rows[0].keys()  # noqa: SIM118 (a Record iterates values)
            if k not in ("setting", "client_ports") and not k.endswith("_seconds")
        ]

        def shape(records: Sequence[Any], keys: list[str] = keys) -> list[tuple[Any, ...]]:
            return [tuple(r[k] for k in keys) for r in records]

        if name == "role_settings":
            assert shape(combined[name]) == shape(rows)  # in ORDER BY order
        else:
            assert sorted(shape(combined[name]), key=repr) == sorted(shape(rows), key=repr), name


class _CountingStatements:
    """Statements poolwatch's connections send (asyncpg looks the methods up on the class)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[str] = []
        for method in ("fetch", "execute", "fetchval", "fetchrow"):
            original = getattr(asyncpg.Connection, method)

            async def counted(conn: Any, query: str, *args: Any, _original: Any = original, **kw: Any) -> Any:
                self.sent.append(query)
                return await _original(conn, query, *args, **kw)

            monkeypatch.setattr(asyncpg.Connection, method, counted)


async def test_one_round_trip_per_collection_and_settings_read_when_reloaded(
    pg_server: Any, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = PostgresSource("pg-rt", pg_server.monitor_dsn(), pg_server.monitor_password, connect_timeout=5)
    statements = _CountingStatements(monkeypatch)
    try:
        first = await src.collect(5)  # a new session: its statement_timeout, then the collection
        assert first.up and len(statements.sent) == 2
        for _ in range(3):
            statements.sent.clear()
            result = await src.collect(5)
            # one statement, no SET and no reset on release; settings come from the session's copy
            assert len(statements.sent) == 1 and statements.sent[0].startswith("WITH ")
            assert all(o.ok for o in result.outcomes), result.outcomes
            assert isinstance(result.observation, PostgresObservation)
            assert result.observation.max_connections == MAX_CONNECTIONS
            assert result.observation.statement_timeout_seconds == 0.0
            assert value_of(result.families, "pg_settings_max_connections") == MAX_CONNECTIONS
        # the session's statement_timeout is the collection's, kept across collections
        assert (await src._pool.fetchval("SHOW statement_timeout")) == "5s"

        await admin.execute("ALTER SYSTEM SET statement_timeout = '45s'")
        await admin.execute("SELECT pg_reload_conf()")
        try:
            deadline = time.monotonic() + 10
            seen = None
            while seen != 45.0 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                result = await src.collect(5)
                assert isinstance(result.observation, PostgresObservation)
                seen = result.observation.statement_timeout_seconds
            assert seen == 45.0  # re-read after the session reloaded its configuration
        finally:
            await admin.execute("ALTER SYSTEM RESET statement_timeout")
            await admin.execute("SELECT pg_reload_conf()")
    finally:
        await src.close()


async def test_a_failing_part_is_reported_by_its_own_collector(
    pg_server: Any, admin: asyncpg.Connection
) -> None:
    """The one statement fails as a whole: the collectors are then asked one by one."""
    src = PostgresSource("pg-part", pg_server.monitor_dsn(), pg_server.monitor_password, connect_timeout=5)
    await admin.execute("REVOKE SELECT ON pg_catalog.pg_stat_database FROM PUBLIC")
    try:
        result = await src.collect(5)
    finally:
        await admin.execute("GRANT SELECT ON pg_catalog.pg_stat_database TO PUBLIC")
        await src.close()
    outcomes = {o.collector: o for o in result.outcomes}
    assert result.up and result.reason == "privilege"
    assert not outcomes["database"].ok and outcomes["database"].reason == "privilege"
    assert all(outcomes[name].ok for name in COLLECTORS if name != "database"), outcomes
    assert value_of(result.families, "pg_settings_max_connections") == MAX_CONNECTIONS
    assert "pg_stat_database_xact_commit_total" not in family_names(result.families)
