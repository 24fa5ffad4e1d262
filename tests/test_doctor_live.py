"""The pool doctor against real PostgreSQL and PgBouncer: every check that can be flipped live is.

One PostgreSQL of this module's own (``doctor_pg``; the session ``pg`` fixture is never
reconfigured) with ``max_connections = 150`` so 110 direct clients fit, and one PgBouncer 1.18 in
front of it. Each test flips settings or load, asserts the verdict and its evidence, and puts the
settings back. Rates are measured over short doctor samples (``run_doctor_once``); the exit codes
come from ``poolwatch doctor`` run as a subprocess with its passwords in the environment.

What cannot be flipped live here is tested on facts in tests/test_doctor_checks.py: PostgreSQL
before 14 (no session counters), PgBouncer 1.25's ``<empty>`` (the 1.25.2 capture), counters reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from poolwatch.cli import run_doctor_once
from poolwatch.collect import Engine
from poolwatch.config import config_from_mapping
from poolwatch.doctor.model import Finding, Status
from poolwatch.localcluster import PgBouncerServer, PostgresServer
from tests.daemon import pgbouncer_target as pgb_target
from tests.daemon import postgres_target as pg_target
from tests.daemon import secret_env

REPO = Path(__file__).resolve().parents[1]
SAMPLE = 0.4  # seconds between the doctor's two collections: enough for rates on an idle server

Verdicts = dict[tuple[str, str], Finding]


# -- servers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def doctor_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A PostgreSQL whose settings these tests change (and restore): the production-ready baseline."""
    with PostgresServer(
        tmp_path_factory.mktemp("doctor-pg"),
        max_connections=150,
        settings={"statement_timeout": "45s", "idle_in_transaction_session_timeout": "60s"},
    ) as server:
        yield server


@pytest.fixture(scope="module")
def doctor_pgb(
    tmp_path_factory: pytest.TempPathFactory, doctor_pg: PostgresServer, pgbouncer_118_binary: str
) -> Iterator[PgBouncerServer]:
    with PgBouncerServer(tmp_path_factory.mktemp("doctor-pgb"), doctor_pg, pgbouncer_118_binary) as server:
        yield server


# -- building configs and running the doctor ------------------------------------------------------
def config_data(
    pgbouncers: list[dict[str, Any]] | None = None,
    postgres: list[dict[str, Any]] | None = None,
    defaults: dict[str, Any] | None = None,
    targets: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "log": {"level": "error", "format": "json"},
        "collection": {"timeout": 3},
        "probes": {"timeout": 2},
        "pgbouncers": pgbouncers or [],
        "postgres": postgres or [],
        # the test machine's cores are not the point: a fixed count keeps sizing deterministic
        "doctor": {"defaults": {"cores": 4, **(defaults or {})}, "targets": targets or {}},
    }


async def doctor(data: dict[str, Any], sample: float = SAMPLE) -> Verdicts:
    findings = await run_doctor_once(config_from_mapping(data, "test"), sample)
    return {(f.target, f.check): f for f in findings}


def doctor_cli(data: dict[str, Any], tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``poolwatch doctor`` as a user runs it: a config file, passwords in the environment."""
    path = tmp_path / f"doctor-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(data))
    return subprocess.run(
        [sys.executable, "-m", "poolwatch.cli", "doctor", "--config", str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NO_COLOR": "1"},
        check=False,
    )


def doctor_cli_tty(data: dict[str, Any], tmp_path: Path, *args: str) -> str:
    """``poolwatch doctor`` with its output on a pseudo-terminal; what it printed."""
    path = tmp_path / f"doctor-tty-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(data))
    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "poolwatch.cli", "doctor", "--config", str(path), *args],
            stdout=follower,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        proc.wait(60)
    finally:
        os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def status(verdicts: Verdicts, target: str, check: str) -> Status:
    return verdicts[(target, check)].status


@contextlib.contextmanager
def pgbouncer_settings(pgb: PgBouncerServer, **changes: Any) -> Iterator[None]:
    """Reload PgBouncer with ``changes``; put the previous values back afterwards."""
    before = {key: pgb.settings.get(key) for key in changes}
    assert pgb.reload_config(**changes), f"PgBouncer did not apply {changes}"
    try:
        yield
    finally:
        assert pgb.reload_config(**before), f"PgBouncer did not restore {before}"


def reload_postgres(pg: PostgresServer, *statements: str, expect: dict[str, str]) -> None:
    """Run ALTER SYSTEM/ROLE statements, pg_reload_conf(), and wait until new sessions see ``expect``."""
    for statement in statements:
        pg.execute(statement)
    pg.execute("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 5
    while True:
        with psycopg.connect(pg.app_dsn(), password=pg.app_password, connect_timeout=5) as conn:
            seen = {name: conn.execute(f"SHOW {name}").fetchone()[0] for name in expect}  # type: ignore[index]
        if seen == expect or time.monotonic() > deadline:
            assert seen == expect
            return
        time.sleep(0.05)


@contextlib.asynccontextmanager
async def direct_clients(
    dsn: str, password: str, n: int, application_name: str, *, transaction: bool = False
) -> AsyncIterator[list[psycopg.AsyncConnection[Any]]]:
    """``n`` open client connections (20 logins at a time); with ``transaction`` each stays in BEGIN."""
    gate = asyncio.Semaphore(20)

    async def one() -> psycopg.AsyncConnection[Any]:
        async with gate:
            conn = await psycopg.AsyncConnection.connect(
                dsn, password=password, application_name=application_name, autocommit=not transaction
            )
            await conn.execute("SELECT 1")
            return conn

    conns = list(await asyncio.gather(*(one() for _ in range(n))))
    try:
        yield conns
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)


class Background:
    """A thread doing ``action`` in a loop until the block ends; counts what it did."""

    def __init__(self, action: Any) -> None:
        self.action, self.done, self.stop = action, 0, threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.action()
            self.done += 1

    def __enter__(self) -> Background:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


# -- the checks, flipped ----------------------------------------------------------------------------
async def test_cli_exit_codes_baseline_and_failure(
    doctor_pg: PostgresServer, doctor_pgb: PgBouncerServer, tmp_path: Path
) -> None:
    data = config_data(
        [pgb_target(doctor_pgb)], [pg_target(doctor_pg)], defaults={"expect_prepared_statements": False}
    )
    # the production-ready baseline: nothing fails, exit 0
    done = doctor_cli(data, tmp_path, "--format", "json", "--sample-seconds", "0.5")
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert doc["schema_version"] == 1 and doc["counts"]["fail"] == 0, done.stdout
    verdicts = {(g["target"], f["check"]): f for g in doc["targets"] for f in g["findings"]}
    for check in ("stale_connection_detection", "recycling", "bounded_overflow", "timeouts", "sizing"):
        assert verdicts[("pgb", check)]["status"] == "ok", verdicts[("pgb", check)]
    for check in ("timeouts", "direct_connections", "long_transactions", "health_checks"):
        assert verdicts[("db", check)]["status"] == "ok", verdicts[("db", check)]
    assert verdicts[("db", "timeouts")]["evidence"]["statement_timeout"] == 45.0
    # server_lifetime 24 h: recycling fails, exit 1, in words on a non-terminal (no colour codes)
    with pgbouncer_settings(doctor_pgb, server_lifetime=86400):
        text = doctor_cli(data, tmp_path, "--sample-seconds", "0.2")
    assert text.returncode == 1, text.stdout + text.stderr
    assert "FAIL    #2   Connection recycling" in text.stdout and "\x1b[" not in text.stdout
    assert "server connections live too long ((global): 24 h)" in text.stdout
    assert "seen: server_lifetime = 86400" in text.stdout
    # on a terminal: the same report in colour (NO_COLOR unset)
    with pgbouncer_settings(doctor_pgb, server_lifetime=86400):
        coloured = doctor_cli_tty(data, tmp_path, "--sample-seconds", "0.2")
    assert "\x1b[31m" in coloured and "Connection recycling" in coloured
    # bad input: exit 2 with a one-line reason, no traceback
    data["doctor"]["defaults"]["recycle_maxx"] = 1
    bad = doctor_cli(data, tmp_path)
    assert bad.returncode == 2
    assert "doctor.defaults.recycle_maxx: unknown key" in bad.stderr and "Traceback" not in bad.stderr


async def test_pgbouncer_settings_flip(doctor_pg: PostgresServer, doctor_pgb: PgBouncerServer) -> None:
    data = config_data(
        [pgb_target(doctor_pgb)], [pg_target(doctor_pg)], defaults={"expect_extra_float_digits": True}
    )
    with pgbouncer_settings(
        doctor_pgb,
        server_check_query="",
        reserve_pool_size=4,
        query_wait_timeout=0,
        server_lifetime=86400,
        ignore_startup_parameters="",
    ):
        bad = await doctor(data)
    stale = bad[("pgb", "stale_connection_detection")]
    assert stale.status is Status.FAIL and stale.evidence["server_check_query"] == ""
    overflow = bad[("pgb", "bounded_overflow")]
    assert overflow.status is Status.FAIL and overflow.value == pytest.approx(0.8)
    assert overflow.evidence["reserve_pool_size"] == 4 and overflow.evidence["default_pool_size"] == 5
    timeouts = bad[("pgb", "timeouts")]
    assert timeouts.status is Status.WARN and timeouts.evidence["query_wait_timeout"] == 0
    recycling = bad[("pgb", "recycling")]
    assert recycling.status is Status.FAIL and recycling.value == 86400
    startup = bad[("pgb", "startup_parameters")]
    assert startup.status is Status.FAIL and startup.evidence["ignore_startup_parameters"] == []

    # the other way to break each: a slow check, one-use connections, pools bigger than PostgreSQL
    with pgbouncer_settings(doctor_pgb, server_check_delay=300, server_lifetime=0, default_pool_size=100):
        worse = await doctor(data)
    assert status(worse, "pgb", "stale_connection_detection") is Status.WARN
    assert worse[("pgb", "stale_connection_detection")].value == 300
    assert status(worse, "pgb", "recycling") is Status.FAIL
    assert "closed after one use" in worse[("pgb", "recycling")].summary
    too_big = worse[("pgb", "bounded_overflow")]
    assert too_big.status is Status.FAIL
    assert too_big.evidence["max_server_connections"] > too_big.evidence["postgres_usable_connections"] == 147
    sizing = worse[("pgb", "sizing")]
    assert sizing.status is Status.WARN and sizing.evidence["per_database_ceiling"] == 24  # 4 cores

    good = await doctor(data)
    for check in (
        "stale_connection_detection",
        "recycling",
        "bounded_overflow",
        "timeouts",
        "startup_parameters",
        "sizing",
    ):
        assert status(good, "pgb", check) is Status.OK, good[("pgb", check)]
    assert good[("pgb", "bounded_overflow")].evidence["postgres_usable_connections"] == 147


async def test_statement_timeout_flips(doctor_pg: PostgresServer) -> None:
    data = config_data(postgres=[pg_target(doctor_pg)])
    try:
        reload_postgres(
            doctor_pg, "ALTER SYSTEM SET statement_timeout = 0", expect={"statement_timeout": "0"}
        )
        unset = (await doctor(data))[("db", "timeouts")]
        assert unset.status is Status.FAIL and unset.evidence["statement_timeout"] == 0
        # the application role gets its own, inside the band: ok (the server default no longer matters)
        reload_postgres(
            doctor_pg, "ALTER ROLE app SET statement_timeout = '30s'", expect={"statement_timeout": "30s"}
        )
        role = (await doctor(data))[("db", "timeouts")]
        assert role.status is Status.OK, role.summary
        assert role.evidence["statement_timeout_overrides"] == {"app@*": 30.0}
        # 10 minutes for the app role: outside 30–60 s
        reload_postgres(
            doctor_pg, "ALTER ROLE app SET statement_timeout = '10min'", expect={"statement_timeout": "10min"}
        )
        long = (await doctor(data))[("db", "timeouts")]
        assert long.status is Status.WARN and "app@* 10 min" in long.summary
        # and no idle_in_transaction_session_timeout anywhere
        reload_postgres(
            doctor_pg,
            "ALTER SYSTEM SET idle_in_transaction_session_timeout = 0",
            "ALTER ROLE app RESET statement_timeout",
            "ALTER SYSTEM RESET statement_timeout",
            expect={"statement_timeout": "45s", "idle_in_transaction_session_timeout": "0"},
        )
        idle = (await doctor(data))[("db", "timeouts")]
        assert idle.status is Status.WARN and "no idle_in_transaction_session_timeout" in idle.summary
    finally:
        reload_postgres(
            doctor_pg,
            "ALTER SYSTEM RESET ALL",
            "ALTER ROLE app RESET ALL",
            expect={"statement_timeout": "45s", "idle_in_transaction_session_timeout": "1min"},
        )
    assert status(await doctor(data), "db", "timeouts") is Status.OK


async def test_direct_connections_flip(
    doctor_pg: PostgresServer, tmp_path_factory: pytest.TempPathFactory, pgbouncer_118_binary: str
) -> None:
    # a PgBouncer that can give 110 clients a server connection each (session pooling)
    with PgBouncerServer(
        tmp_path_factory.mktemp("doctor-pgb-wide"),
        doctor_pg,
        pgbouncer_118_binary,
        pool_mode="session",
        default_pool_size=115,
    ) as wide:
        data = config_data([pgb_target(wide, probe={"databases": []})], [pg_target(doctor_pg)])
        async with direct_clients(doctor_pg.app_dsn(), doctor_pg.app_password, 110, "batch"):
            bypass = (await doctor(data))[("db", "direct_connections")]
        assert bypass.status is Status.FAIL, bypass.summary
        assert bypass.value == 110 and bypass.evidence["direct_client_connections"] == 110
        assert bypass.evidence["top_direct_sources"] == {"127.0.0.1 batch": 110}
        async with direct_clients(wide.app_dsn(), wide.app_password, 110, "batch"):
            pooled = (await doctor(data))[("db", "direct_connections")]
        assert pooled.status is Status.OK, pooled.summary
        assert (
            pooled.evidence["through_pgbouncer"] >= 110 and pooled.evidence["direct_client_connections"] == 0
        )


async def sessions_settled(pg: PostgresServer, timeout: float = 15.0) -> None:
    """Wait until the client backends and the abandoned-session counter stop moving: a PgBouncer
    stopped by an earlier test drops its server connections without a Terminate message, and on
    a loaded machine their backends are counted as abandoned seconds later."""
    query = (
        "SELECT (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        " AND pid <> pg_backend_pid()), (SELECT sum(sessions_abandoned) FROM pg_stat_database)"
    )
    deadline = time.monotonic() + timeout
    seen: list[tuple[Any, ...]] = []
    while time.monotonic() < deadline:
        seen.append((await asyncio.to_thread(pg.execute, query))[0])
        if len(seen) >= 3 and seen[-1] == seen[-2] == seen[-3]:
            return
        await asyncio.sleep(0.5)


async def test_long_transactions_age_churn_and_abandoned_sessions(doctor_pg: PostgresServer) -> None:
    short = {
        "idle_in_transaction_warn": 0.5,
        "idle_in_transaction_fail": 1.5,
        "recycle_min": 1,
        "recycle_max": 1.5,
    }
    data = config_data(postgres=[pg_target(doctor_pg)], targets={"db": short})
    await sessions_settled(doctor_pg)  # the tests before this one leave backends still exiting
    calm = await doctor(data, sample=0.6)
    for check in ("long_transactions", "connection_churn", "graceful_shutdown"):
        assert status(calm, "db", check) is Status.OK, calm[("db", check)]

    # one session idle in transaction for 2 s: past the (per-target) fail threshold and recycle window
    async with direct_clients(doctor_pg.app_dsn(), doctor_pg.app_password, 1, "idler", transaction=True):
        await asyncio.sleep(2.0)
        held = await doctor(data)
    long = held[("db", "long_transactions")]
    assert long.status is Status.FAIL, long.summary
    assert long.evidence["idle_in_transaction_by"] == "app@app, idler"
    assert long.evidence["idle_in_transaction_sessions"] == 1
    assert long.evidence["longest_idle_in_transaction_seconds"] >= 1.5
    age = held[("db", "connection_age")]
    assert age.status is Status.WARN and "idler" in age.summary
    assert age.evidence["oldest_connection_seconds_by_application"]["idler"] >= 2

    # sessions opened and closed as fast as they go, and sessions whose client vanishes
    def churn() -> None:
        psycopg.connect(
            doctor_pg.app_dsn(), password=doctor_pg.app_password, application_name="churn"
        ).close()

    def vanish() -> None:
        conn = psycopg.connect(doctor_pg.app_dsn(), password=doctor_pg.app_password, application_name="gone")
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)  # no Terminate message: PostgreSQL counts it abandoned
        conn.close()

    with Background(churn) as churned, Background(vanish) as vanished:
        stormy = await doctor(data, sample=1.0)
    assert churned.done > 5 and vanished.done > 5
    churn_finding = stormy[("db", "connection_churn")]
    assert churn_finding.status is Status.WARN, churn_finding.summary
    assert churn_finding.evidence["new_sessions_per_second"] >= 5
    shutdown = stormy[("db", "graceful_shutdown")]
    assert shutdown.status is Status.WARN, shutdown.summary
    assert shutdown.evidence["sessions_abandoned_per_minute"] > 60


async def test_connection_growth_per_application(doctor_pg: PostgresServer) -> None:
    config = config_from_mapping(config_data(postgres=[pg_target(doctor_pg)]), "test")
    engine = Engine(config)
    conns: list[psycopg.AsyncConnection[Any]] = []
    try:
        for _ in range(5):  # one more "leaky" connection before each collection
            conns.append(
                await psycopg.AsyncConnection.connect(
                    doctor_pg.app_dsn(), password=doctor_pg.app_password, application_name="leaky"
                )
            )
            await engine.current(max_age=0.0)
        assert engine.doctor is not None
        growth = next(f for f in engine.doctor.findings if f.check == "connection_growth")
        assert growth.status is Status.WARN, growth.summary
        assert growth.evidence["growing_applications"] == {"leaky": [1, 2, 3, 4, 5]}
        # steady: the next collection (same count) ends the strictly rising run
        await engine.current(max_age=0.0)
        steady = next(f for f in engine.doctor.findings if f.check == "connection_growth")
        assert steady.status is Status.OK, steady.summary
    finally:
        await engine.stop()
        await asyncio.gather(*(c.close() for c in conns))


async def test_without_pg_monitor_the_activity_checks_are_unknown(doctor_pg: PostgresServer) -> None:
    password = "nomon-" + os.urandom(6).hex()
    doctor_pg.execute("DROP ROLE IF EXISTS nomon")
    doctor_pg.execute(f"CREATE ROLE nomon LOGIN PASSWORD '{password}'")
    try:
        data = config_data(
            postgres=[{**pg_target(doctor_pg), "user": "nomon", "password_env": secret_env(password)}]
        )
        async with direct_clients(doctor_pg.app_dsn(), doctor_pg.app_password, 1, "hidden", transaction=True):
            verdicts = await doctor(data)
        for check in ("connection_age", "direct_connections", "connection_growth", "long_transactions"):
            finding = verdicts[("db", check)]
            assert finding.status is Status.UNKNOWN, finding
            assert (
                "not in pg_monitor" in finding.summary
                and finding.recommendation == "GRANT pg_monitor TO nomon"
            )
        # what needs no privilege is still judged
        assert status(verdicts, "db", "timeouts") is Status.OK
        assert status(verdicts, "db", "health_checks") is Status.OK
    finally:
        doctor_pg.execute("DROP ROLE nomon")


async def test_down_targets_and_failing_health_checks(
    doctor_pg: PostgresServer, doctor_pgb: PgBouncerServer
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    data = config_data(
        [
            pgb_target(doctor_pgb, probe={"databases": ["app", "nosuchdb"]}),
            {**pgb_target(doctor_pgb, name="gone"), "port": closed, "postgres": "db"},
        ],
        [pg_target(doctor_pg, probe=False)],
    )
    data["pgbouncers"][0]["postgres"] = "db"
    verdicts = await doctor(data)
    exported = verdicts[("poolwatch", "metrics_exported")]
    assert exported.status is Status.FAIL
    assert list(exported.evidence["down"]) == ["gone (pgbouncer)"]
    assert "gone (pgbouncer)" in exported.summary
    health = verdicts[("pgb", "health_checks")]
    assert health.status is Status.FAIL and list(health.evidence["failing"]) == ["nosuchdb"]
    assert health.evidence["checked"] == ["app", "nosuchdb"]
    assert status(verdicts, "db", "health_checks") is Status.WARN  # probe: false
    # the down PgBouncer is unknown everywhere, never ok
    gone = [f for (target, _), f in verdicts.items() if target == "gone" and f.check != "health_checks"]
    assert gone and all(f.status is Status.UNKNOWN for f in gone)


# -- PgBouncer 1.24: traps of the newer releases ------------------------------------------------------
async def test_reuseport_without_peering_124(
    doctor_pg: PostgresServer, tmp_path_factory: pytest.TempPathFactory, pgbouncer_124_binary: str
) -> None:
    first = PgBouncerServer(
        tmp_path_factory.mktemp("pgb-reuse-1"), doctor_pg, pgbouncer_124_binary, so_reuseport=1
    )
    second = PgBouncerServer(
        tmp_path_factory.mktemp("pgb-reuse-2"),
        doctor_pg,
        pgbouncer_124_binary,
        port=first.port,
        so_reuseport=1,
    )
    with first:
        alone = (await doctor(config_data([pgb_target(first, "p1")], [pg_target(doctor_pg)])))[
            ("p1", "reuseport_peers")
        ]
        assert alone.status is Status.WARN, alone.summary
        assert alone.evidence["so_reuseport"] == "1" and alone.evidence["peer_id"] == 0
        assert alone.evidence["peers"] == 0
        with second:  # two processes on one port, as one PgBouncer per core is deployed
            pair = await doctor(
                config_data([pgb_target(first, "p1"), pgb_target(second, "p2")], [pg_target(doctor_pg)])
            )
        for name, other in (("p1", "p2"), ("p2", "p1")):
            finding = pair[(name, "reuseport_peers")]
            assert finding.status is Status.FAIL, finding.summary
            assert finding.evidence["same_address_targets"] == [other]


async def test_prepared_statements_in_transaction_pooling_124(
    doctor_pg: PostgresServer, tmp_path_factory: pytest.TempPathFactory, pgbouncer_124_binary: str
) -> None:
    pgb = PgBouncerServer(
        tmp_path_factory.mktemp("pgb-prepare"), doctor_pg, pgbouncer_124_binary, max_prepared_statements=0
    )
    counter = iter(range(1_000_000))
    errors: list[str] = []

    def prepare() -> None:
        # psycopg prepare=True through PgBouncer: a named Parse per new statement
        with psycopg.connect(pgb.app_dsn(), password=pgb.app_password, autocommit=True) as conn:
            for _ in range(5):
                try:
                    conn.execute(f"SELECT {next(counter)}::int + %s", (1,), prepare=True)
                except psycopg.Error as exc:
                    errors.append(type(exc).__name__)

    with pgb:
        data = config_data([pgb_target(pgb)], [pg_target(doctor_pg)])
        with Background(prepare) as preparing:
            unknown = (await doctor(data))[("pgb", "prepared_statements")]
        assert preparing.done > 0
        # measured: with max_prepared_statements = 0 PgBouncer 1.24 counts no parses, prepares or not
        assert unknown.status is Status.WARN, unknown.summary
        assert (
            unknown.evidence["client_parse_count"] == 0 and unknown.evidence["clients_prepare"] == "unknown"
        )
        # the operator says the clients prepare: the trap is a failure, and `poolwatch doctor` exits 1
        data["doctor"]["defaults"]["expect_prepared_statements"] = True
        with Background(prepare):
            failing = (await doctor(data))[("pgb", "prepared_statements")]
        assert failing.status is Status.FAIL and failing.evidence["max_prepared_statements"] == 0
        # with tracking on, the prepares show up in SHOW STATS and the check passes
        with pgbouncer_settings(pgb, max_prepared_statements=200), Background(prepare):
            tracked = (await doctor(data))[("pgb", "prepared_statements")]
        assert tracked.status is Status.OK, tracked.summary
        assert tracked.evidence["client_parses_rising"] is True and tracked.evidence["client_parse_count"] > 0
