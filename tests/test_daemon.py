"""The whole daemon against real PostgreSQL and PgBouncer: values, probes, readiness, lifecycle."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from poolwatch.localcluster import Load, PgBouncerServer, PostgresServer
from tests.conftest import MakePgBouncer
from tests.daemon import make_config, pgbouncer_target, pick, postgres_target, running_daemon


async def test_saturated_pool_exact_counts_and_recovery(
    pg: PostgresServer, make_pgbouncer: MakePgBouncer
) -> None:
    # max_db_connections makes the probe's own pool (app, poolwatch) share the app pool's two server
    # connections, so the probe meets the saturation without adding to the app pool's queue
    pgb = make_pgbouncer(default_pool_size=2, reserve_pool_size=0, max_db_connections=2)
    config = make_config(
        pgbouncers=[pgbouncer_target(pgb, probe={"databases": ["app"]})],
        postgres=[postgres_target(pg)],
        probes={"interval": 0.5, "timeout": 1.0},
    )
    async with running_daemon(config) as daemon:
        async with Load() as load:
            await load.hold_transactions(pgb.app_dsn(), pgb.app_password, 5, wait_holding=2)
            await asyncio.sleep(1.2)  # maxwait is whole seconds plus maxwait_us
            samples = await daemon.metrics()
            labels = {"target": "pgb", "database": "app", "user": "app"}
            assert pick(samples, "pgbouncer_pools_client_waiting_connections", **labels) == 3
            assert pick(samples, "pgbouncer_pools_client_active_connections", **labels) == 2
            assert pick(samples, "pgbouncer_pools_server_active_connections", **labels) == 2
            maxwait = pick(samples, "pgbouncer_pools_client_maxwait_seconds", **labels)
            assert maxwait is not None and maxwait > 1.0
            assert pick(samples, "pgbouncer_up", target="pgb") == 1
            assert pick(samples, "pg_up", target="db") == 1
            # 2 server connections idle in transaction, held by the app role through PgBouncer
            idle_tx = pick(
                samples, "pg_stat_activity_count", target="db", datname="app", state="idle in transaction"
            )
            assert idle_tx == 2
            # the SELECT 1 through the saturated pool cannot get a server: it times out, it is not hidden
            await asyncio.sleep(2.0)
            samples = await daemon.metrics()
            probe = {"target": "pgb", "kind": "pgbouncer", "database": "app"}
            assert pick(samples, "poolwatch_probe_success", **probe) == 0
            assert (pick(samples, "poolwatch_probe_failures_total", reason="timeout", **probe) or 0) >= 1
            duration = pick(samples, "poolwatch_probe_last_duration_seconds", **probe)
            assert duration is not None and duration >= 1.0
        # load gone: the gauges return to zero and the probe passes again
        assert await daemon.wait_for("pgbouncer_pools_client_waiting_connections", 0, **labels) == 0
        assert await daemon.wait_for("pgbouncer_pools_client_active_connections", 0, **labels) == 0
        assert await daemon.wait_for("poolwatch_probe_success", 1, **probe) == 1
        status, body = await daemon.get("/readyz")
        assert status == 200, body


async def test_idle_in_transaction_counted_with_age(pg: PostgresServer) -> None:
    config = make_config(postgres=[postgres_target(pg)])
    async with running_daemon(config) as daemon, Load() as load:
        await load.idle_in_transaction(pg.app_dsn(), pg.app_password)
        await asyncio.sleep(2.1)
        samples = await daemon.metrics()
        labels = {"target": "db", "datname": "app", "usename": "app", "state": "idle in transaction"}
        assert pick(samples, "pg_stat_activity_connections", application_name="", **labels) == 1
        age = pick(samples, "pg_stat_activity_max_state_duration_seconds", application_name="", **labels)
        assert age is not None and age >= 2.0
        xact = pick(samples, "pg_stat_activity_max_tx_duration", application_name="", **labels)
        assert xact is not None and xact >= 2.0


async def test_readyz_names_failing_target_and_others_unaffected(
    pg: PostgresServer, pgb: PgBouncerServer
) -> None:
    dead = {"name": "gone", "host": "127.0.0.1", "port": 1, "user": "x", "connect_timeout": 1}
    config = make_config(pgbouncers=[pgbouncer_target(pgb), dead], postgres=[postgres_target(pg)])
    async with running_daemon(config) as daemon:
        started = time.monotonic()
        samples = await daemon.metrics()
        assert time.monotonic() - started < 4.0
        assert pick(samples, "pgbouncer_up", target="pgb") == 1
        assert pick(samples, "pgbouncer_up", target="gone") == 0
        assert (
            pick(samples, "poolwatch_target_down_reason", target="gone", kind="pgbouncer", reason="connect")
            == 1
        )
        assert pick(samples, "poolwatch_target_up", target="db", kind="postgres") == 1
        status, body = await daemon.get("/readyz")
        assert status == 503
        failing = json.loads(body)["failing"]
        assert [f["target"] for f in failing if f["kind"] == "pgbouncer"] == ["gone"]
        assert failing[0]["reason"] == "connect"
        status, body = await daemon.get("/healthz")
        assert status == 200


async def test_one_failing_show_does_not_mark_target_down(pg: PostgresServer, pgb: PgBouncerServer) -> None:
    # a user that is not in stats_users cannot log in to the console at all: a setup mistake,
    # reported with what to change rather than the raw driver error
    wrong = pgbouncer_target(pgb, name="wronguser")
    wrong["user"] = "app"
    wrong["password_env"] = pgbouncer_target(pgb)["password_env"]
    os.environ[wrong["password_env"]] = pgb.app_password
    config = make_config(pgbouncers=[pgbouncer_target(pgb), wrong])
    async with running_daemon(config) as daemon:
        await daemon.metrics()
        _, body = await daemon.get("/readyz")
        failing = {f["target"]: f for f in json.loads(body)["failing"]}
        assert failing["wronguser"]["reason"] == "privilege"
        assert "stats_users" in failing["wronguser"]["detail"]


async def test_concurrent_scrapes_share_one_collection(pg: PostgresServer, pgb: PgBouncerServer) -> None:
    config = make_config(pgbouncers=[pgbouncer_target(pgb)], collection={"max_age": 0, "interval": 60})
    async with running_daemon(config) as daemon:
        await daemon.metrics()
        before = await daemon.value("poolwatch_collections_total", target="pgb", kind="pgbouncer")
        results = await asyncio.gather(*(daemon.get("/metrics") for _ in range(20)))
        assert all(status == 200 for status, _ in results)
        after = await daemon.value("poolwatch_collections_total", target="pgb", kind="pgbouncer")
        assert before is not None and after is not None
        # 20 concurrent scrapes plus the one above: far fewer collections than scrapes
        assert after - before <= 4


async def test_pgbouncer_restart_under_running_daemon(
    pg: PostgresServer, make_pgbouncer: MakePgBouncer
) -> None:
    pgb = make_pgbouncer()
    config = make_config(pgbouncers=[pgbouncer_target(pgb)])
    async with running_daemon(config) as daemon:
        assert await daemon.wait_for("pgbouncer_up", 1, target="pgb") == 1
        pgb.kill()
        assert await daemon.wait_for("pgbouncer_up", 0, target="pgb") == 0
        status, _ = await daemon.get("/readyz")
        assert status == 503
        pgb.start()  # same port
        assert await daemon.wait_for("pgbouncer_up", 1, target="pgb", timeout=20) == 1


def test_sigterm_exits_cleanly_within_5s(pg: PostgresServer, pgb: PgBouncerServer, tmp_path: Path) -> None:
    config = tmp_path / "poolwatch.yaml"
    config.write_text(
        "listen: 127.0.0.1:0\n"
        f"pgbouncers:\n  - name: pgb\n    host: 127.0.0.1\n    port: {pgb.port}\n    user: poolwatch\n"
        "    password_env: TEST_PGB_PW\n"
    )
    env = {**os.environ, "TEST_PGB_PW": pgb.stats_password}
    proc, _ = _start_subprocess_daemon(config, env)
    assert proc.stderr is not None
    time.sleep(1.0)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=5) == 0
    assert time.monotonic() - started < 5.0
    rest = proc.stderr.read()
    assert "Traceback" not in rest
    assert pgb.stats_password not in rest


@pytest.mark.parametrize("version", ["1.18", "1.24"])
async def test_both_pgbouncer_versions_export_pools(
    pg: PostgresServer, make_pgbouncer: MakePgBouncer, version: str
) -> None:
    pgb = make_pgbouncer(version=version)
    config = make_config(pgbouncers=[pgbouncer_target(pgb)])
    async with running_daemon(config) as daemon:
        samples = await daemon.metrics()
        assert pick(samples, "pgbouncer_up", target="pgb") == 1
        reserve = pick(samples, "pgbouncer_databases_reserve_pool", target="pgb", name="app")
        assert reserve is not None  # reserve_pool (1.18) and reserve_pool_size (1.24) both map here
        info = [k for k in samples if k[0] == "pgbouncer_version_info"]
        assert len(info) == 1 and dict(info[0][1])["version"].startswith(f"PgBouncer {version}")


def _start_subprocess_daemon(config: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "poolwatch.cli", "run", "--config", str(config), "--log-format", "json"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if '"listening"' in line:
            return proc, json.loads(line)["url"]
    raise AssertionError("daemon did not start")


def _scrape(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        return str(response.read().decode())


def test_sighup_reloads_and_keeps_old_config_when_new_one_is_bad(
    pg: PostgresServer, pgb: PgBouncerServer, tmp_path: Path
) -> None:
    config = tmp_path / "poolwatch.yaml"
    base = (
        "listen: 127.0.0.1:0\ncollection:\n  max_age: 0\n"
        f"pgbouncers:\n  - name: first\n    host: 127.0.0.1\n    port: {pgb.port}\n    user: poolwatch\n"
        "    password_env: TEST_PGB_PW\n"
    )
    config.write_text(base)
    env = {**os.environ, "TEST_PGB_PW": pgb.stats_password}
    proc, url = _start_subprocess_daemon(config, env)
    try:
        assert 'pgbouncer_up{target="first"} 1.0' in _scrape(url)
        config.write_text(base.replace("name: first", "name: second"))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        text = ""
        while time.monotonic() < deadline:
            text = _scrape(url)
            if 'target="second"' in text:
                break
            time.sleep(0.2)
        assert 'pgbouncer_up{target="second"} 1.0' in text and 'target="first"' not in text
        config.write_text("pgbouncers: [ {name: broken, port: 99999} ]\n")
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert 'pgbouncer_up{target="second"} 1.0' in _scrape(url)  # the old config keeps running
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    assert proc.stderr is not None
    log = proc.stderr.read()
    assert "reload rejected, keeping the running config" in log
    assert "pgbouncers[0].port" in log
    assert "Traceback" not in log


async def test_pgbouncer_124_shuts_down_within_5s_while_watched_and_comes_back(
    pg: PostgresServer, make_pgbouncer: MakePgBouncer
) -> None:
    """1.23+ waits on SIGTERM for every client, console connections included: poolwatch must let go."""
    pgb = make_pgbouncer(version="1.24")
    config = make_config(pgbouncers=[pgbouncer_target(pgb, probe={"databases": ["app"]})])
    async with running_daemon(config) as daemon:
        assert await daemon.wait_for("pgbouncer_up", 1, target="pgb") == 1
        await asyncio.sleep(1.5)  # the held console connection and a few probe rounds are in place
        pgb.sigterm()
        started = time.monotonic()
        exited = await asyncio.to_thread(pgb.wait_exit, 5.0)
        assert exited, "PgBouncer 1.24 was still running 5 s after SIGTERM"
        assert time.monotonic() - started < 5.0
        assert await daemon.wait_for("pgbouncer_up", 0, target="pgb") == 0
        pgb.start()  # same port
        assert await daemon.wait_for("pgbouncer_up", 1, target="pgb", timeout=20) == 1


async def test_pgbouncer_dsn_alone_probes_every_listed_database(pgb: PgBouncerServer) -> None:
    """The one-sidecar case: `--pgbouncer DSN` and nothing else watches PgBouncer and checks
    SELECT 1 through every database it lists (but its own console)."""
    from poolwatch.config import CommandLine, config_from_command_line

    os.environ["PGPASSWORD"] = pgb.stats_password  # libpq's own variable, as a sidecar would set it
    try:
        config = config_from_command_line(CommandLine(pgbouncer_dsn=pgb.stats_dsn, listen="127.0.0.1:0"))
        config = config.model_copy(update={"probes": config.probes.model_copy(update={"interval": 0.3})})
        async with running_daemon(config) as daemon:
            for database in ("app", "postgres"):
                probe = {"target": "pgbouncer", "kind": "pgbouncer", "database": database}
                assert await daemon.wait_for("poolwatch_probe_success", 1, **probe) == 1
            samples = await daemon.metrics()
            probed = {
                dict(labels)["database"] for name, labels in samples if name == "poolwatch_probe_success"
            }
            assert probed == {"app", "postgres"}
    finally:
        del os.environ["PGPASSWORD"]
