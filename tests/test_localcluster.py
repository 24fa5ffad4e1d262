"""The throwaway-server toolkit itself: servers, identities, load determinism, teardown."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from poolwatch.localcluster import (
    ClientGroup,
    Load,
    LoadError,
    LocalCluster,
    PgBouncerServer,
    PostgresServer,
    hold_transactions,
    scram_sha256_verifier,
)

MakePgBouncer = Callable[..., PgBouncerServer]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)


def _console_rows(server: PgBouncerServer, command: str) -> list[dict[str, Any]]:
    """Read the console as poolwatch will: stats user, autocommit, simple protocol."""
    with (
        psycopg.connect(
            server.stats_dsn,
            password=server.stats_password,
            autocommit=True,
            prepare_threshold=None,
            row_factory=psycopg.rows.dict_row,
        ) as conn,
        conn.cursor() as cur,
    ):
        cur.execute(command)
        return cur.fetchall()


# ---- identities -------------------------------------------------------------------------------


def test_app_runs_select_1_through_pgbouncer(pgb: PgBouncerServer) -> None:
    with psycopg.connect(pgb.app_dsn(), password=pgb.app_password, prepare_threshold=None) as conn:
        row = conn.execute("SELECT 1, current_user, current_database(), inet_server_port()").fetchone()
    assert row == (1, "app", "app", pgb.postgres.port)


def test_monitor_user_reads_show_pools_but_is_not_admin(pgb: PgBouncerServer) -> None:
    with psycopg.connect(pgb.app_dsn(), password=pgb.app_password, prepare_threshold=None) as conn:
        conn.execute("SELECT 1")
        pools = _console_rows(pgb, "SHOW POOLS")
        by_key = {(row["database"], row["user"]): row for row in pools}
        assert by_key[("app", "app")]["pool_mode"] == "transaction"
        assert by_key[("app", "app")]["cl_active"] == 1
        # The console connection itself is an active client of the pseudo-database.
        assert by_key[("pgbouncer", "pgbouncer")]["cl_active"] == 1
    with pytest.raises(psycopg.Error, match="admin access needed"):
        _console_rows(pgb, "PAUSE app")


def test_monitor_role_is_least_privilege(pg: PostgresServer) -> None:
    rows = pg.execute(
        "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolcanlogin,"
        " pg_has_role(oid, 'pg_monitor', 'MEMBER') FROM pg_roles WHERE rolname = %s",
        (pg.monitor_user,),
    )
    assert rows == [(False, False, False, False, True, True)]
    assert pg.execute(
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (pg.app_database,)
    ) == [(pg.app_user,)]
    with psycopg.connect(pg.monitor_dsn(pg.app_database), password=pg.monitor_password) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE poolwatch_may_not (x int)")
        conn.rollback()
        # pg_monitor (pg_read_all_stats) shows other roles' sessions in full.
        hidden = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query = '<insufficient privilege>'"
        ).fetchone()
        assert hidden == (0,)


def test_wrong_password_is_refused(pg: PostgresServer, pgb: PgBouncerServer) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.monitor_dsn(), password="wrong", connect_timeout=5)
    # PgBouncer words it differently from PostgreSQL (auth_type scram-sha-256).
    with pytest.raises(psycopg.OperationalError, match="SASL authentication failed"):
        psycopg.connect(pgb.stats_dsn, password="wrong", connect_timeout=5)


def test_passwords_stay_out_of_dsns_and_files_are_private(pg: PostgresServer, pgb: PgBouncerServer) -> None:
    passwords = {pg.monitor_password, pg.app_password, pgb.admin_password}
    assert len(passwords) == 3 and all(len(p) >= 24 for p in passwords)
    dsns = [pg.superuser_dsn(), pg.monitor_dsn(), pg.app_dsn(), pgb.admin_dsn, pgb.stats_dsn, pgb.app_dsn()]
    texts = [*dsns, repr(pg), repr(pgb), pg.log_file.read_text()]
    assert not [t for t in texts for p in passwords if p in t]
    assert "password" not in " ".join(dsns)
    assert stat.S_IMODE(pgb.userlist_file.stat().st_mode) == 0o600


def test_scram_verifier_matches_postgres_format() -> None:
    verifier = scram_sha256_verifier("pencil", salt=b"0123456789abcdef")
    assert verifier.startswith("SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$")
    assert scram_sha256_verifier("pencil", salt=b"0123456789abcdef") == verifier


# ---- load determinism ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.18", "1.24"])
async def test_five_clients_on_pool_of_two_two_active_three_waiting(
    make_pgbouncer: MakePgBouncer, version: str
) -> None:
    pgb = make_pgbouncer(version=version, default_pool_size=2)
    async with Load() as load:
        group = await load.hold_transactions(pgb.app_dsn(), pgb.app_password, 5, wait_holding=2)
        assert (group.holding, group.waiting) == (2, 3)
        row = await asyncio.to_thread(pgb.wait_for_pool, "app", cl_active=2, cl_waiting=3)
        assert (row["sv_active"], row["sv_idle"]) == (2, 0)
        # The two holders are idle in transaction on the server.
        states = pgb.postgres.execute(
            "SELECT state FROM pg_stat_activity WHERE pid = ANY(%s)", (group.backend_pids,)
        )
        assert sorted(states) == [("idle in transaction",)] * 2
    row = await asyncio.to_thread(pgb.wait_for_pool, "app", cl_active=0, cl_waiting=0)
    assert group == ClientGroup(
        name="holders",
        size=5,
        connected=0,
        waiting=0,
        holding=0,
        transactions=5,
        backend_pids=group.backend_pids,
    )
    assert len(group.backend_pids) == 5


async def test_busy_holders_are_active_on_postgres_and_released_on_close(
    make_pgbouncer: MakePgBouncer,
) -> None:
    pgb = make_pgbouncer(default_pool_size=3)
    async with hold_transactions(pgb.app_dsn(), pgb.app_password, 3, busy=True, wait_holding=3) as group:

        def sleeping() -> list[tuple[Any, ...]]:
            return pgb.postgres.execute(
                "SELECT state FROM pg_stat_activity WHERE pid = ANY(%s) AND wait_event = 'PgSleep'",
                (group.backend_pids,),
            )

        await _eventually(lambda: len(sleeping()) == 3)
        assert sleeping() == [("active",)] * 3
    started = time.monotonic()
    await asyncio.to_thread(pgb.wait_for_pool, "app", cl_active=0, sv_active=0)
    assert time.monotonic() - started < 5
    assert group.errors == []


async def test_idle_in_transaction_session_directly_on_postgres(pg: PostgresServer) -> None:
    async with Load() as load:
        pid = await load.idle_in_transaction(pg.app_dsn(), pg.app_password)
        with psycopg.connect(pg.monitor_dsn(), password=pg.monitor_password) as conn:
            row = conn.execute(
                "SELECT usename, datname, state FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
        assert row == ("app", "app", "idle in transaction")
    assert pg.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)) == [(0,)]


async def test_churn_and_trickle_make_progress_and_stop(make_pgbouncer: MakePgBouncer) -> None:
    pgb = make_pgbouncer(default_pool_size=2)
    async with Load(seed=7) as load:
        churn = load.churn(pgb.app_dsn(), pgb.app_password, workers=4, tx_seconds=(0.05, 0.2))
        trickle = load.trickle(pgb.app_dsn("postgres"), pgb.app_password, interval=0.05)
        await _eventually(lambda: churn.transactions >= 8 and trickle.queries >= 5, timeout=15)
    assert churn.transactions >= 8 and trickle.queries >= 5
    assert churn.errors == [] and trickle.errors == []
    assert (churn.connected, churn.holding, churn.waiting) == (0, 0, 0)


async def test_connection_error_is_raised_not_hung(pgb: PgBouncerServer) -> None:
    async with Load() as load:
        with pytest.raises(LoadError, match="SASL authentication failed"):
            await load.hold_transactions(pgb.app_dsn(), "wrong", 2, wait_timeout=10)


# ---- PgBouncer lifecycle -----------------------------------------------------------------------------


def test_pgbouncer_124_starts_and_reports_its_version(make_pgbouncer: MakePgBouncer) -> None:
    pgb = make_pgbouncer(version="1.24")
    assert pgb.version_info[:2] == (1, 24)
    assert pgb.version.startswith("1.24.")
    version_rows = pgb.show("VERSION")
    assert list(version_rows[0].values()) == [f"PgBouncer {pgb.version}"]
    # A column 1.24 added to SHOW POOLS (see shared/reference/pgbouncer-admin-console).
    assert "load_balance_hosts" in pgb.show("POOLS")[0]
    with psycopg.connect(pgb.app_dsn(), password=pgb.app_password, prepare_threshold=None) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_pgbouncer_118_exits_at_once_on_sigterm(make_pgbouncer: MakePgBouncer) -> None:
    pgb = make_pgbouncer(version="1.18")
    with psycopg.connect(pgb.stats_dsn, password=pgb.stats_password, autocommit=True, prepare_threshold=None):
        pgb.sigterm()
        assert pgb.wait_exit(5)
    assert not pgb.is_running()


@pytest.mark.slow
def test_pgbouncer_124_waits_for_clients_on_sigterm_and_stop_still_ends_it(
    make_pgbouncer: MakePgBouncer,
) -> None:
    pgb = make_pgbouncer(version="1.24", term_timeout=1.0)
    console = psycopg.connect(
        pgb.stats_dsn, password=pgb.stats_password, autocommit=True, prepare_threshold=None
    )
    try:
        pgb.sigterm()
        assert not pgb.wait_exit(1.5), "1.24 should wait for the open console connection"
        pid = pgb.pid
        assert pid is not None
        started = time.monotonic()
        pgb.stop()  # SIGTERM again, 1 s, then SIGQUIT
        assert time.monotonic() - started < 5
        assert not pgb.is_running() and not _alive(pid)
    finally:
        console.close()


def test_pgbouncer_restarts_on_the_same_port_after_a_crash(make_pgbouncer: MakePgBouncer) -> None:
    pgb = make_pgbouncer()
    port, pid = pgb.port, pgb.pid
    assert pid is not None
    pgb.kill()
    assert not _alive(pid)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(pgb.app_dsn(), password=pgb.app_password, connect_timeout=2)
    pgb.start()
    assert pgb.port == port and pgb.pid not in (None, pid)
    with psycopg.connect(pgb.app_dsn(), password=pgb.app_password, prepare_threshold=None) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_reload_config_applies_new_settings(make_pgbouncer: MakePgBouncer) -> None:
    pgb = make_pgbouncer(default_pool_size=2)
    assert pgb.reload_config(default_pool_size=3, server_lifetime=60)
    config = {row["key"]: row["value"] for row in pgb.show("CONFIG", admin=True)}
    assert (config["default_pool_size"], config["server_lifetime"]) == ("3", "60")
    databases = {row["name"]: row for row in pgb.show("DATABASES")}
    assert databases["app"]["pool_size"] == 3


def test_extra_database_entries(make_pgbouncer: MakePgBouncer) -> None:
    pgb = make_pgbouncer(databases={"app_small": {"dbname": "app", "pool_size": 1}})
    with psycopg.connect(pgb.app_dsn("app_small"), password=pgb.app_password, prepare_threshold=None) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("app",)
    databases = {row["name"]: row for row in pgb.show("DATABASES")}
    assert databases["app_small"]["pool_size"] == 1
    assert databases["app_small"]["database"] == "app"


def test_admin_user_can_pause_and_resume(make_pgbouncer: MakePgBouncer) -> None:
    pgb = make_pgbouncer()
    pgb.admin_command("PAUSE app")
    assert {row["name"]: row["paused"] for row in pgb.show("DATABASES")}["app"] == 1
    pgb.admin_command("RESUME app")
    assert {row["name"]: row["paused"] for row in pgb.show("DATABASES")}["app"] == 0


# ---- whole cluster ----------------------------------------------------------------------------------


def test_local_cluster_leaves_nothing_behind() -> None:
    with LocalCluster() as cluster:
        pg, pgb = cluster.postgres, cluster.pgbouncer
        pids = [pg.pid, pgb.pid]
        backends = [
            row[0]
            for row in pg.execute("SELECT pid FROM pg_stat_activity WHERE backend_type <> 'client backend'")
        ]
        port = pg.port
        pg.restart()  # same port, same passwords
        assert pg.port == port
        with psycopg.connect(pgb.app_dsn(), password=pgb.app_password, prepare_threshold=None) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        pids += [pg.pid]
        base_dir = cluster.base_dir
    assert all(pid is not None for pid in pids)
    assert [pid for pid in [*pids, *backends] if pid is not None and _alive(pid)] == []
    assert not base_dir.exists()


def test_local_cluster_stops_servers_when_the_body_raises() -> None:
    with pytest.raises(RuntimeError, match="boom"), LocalCluster() as cluster:
        pids = [cluster.postgres.pid, cluster.pgbouncer.pid]
        raise RuntimeError("boom")
    assert [pid for pid in pids if pid is not None and _alive(pid)] == []
