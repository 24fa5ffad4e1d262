"""Faults against real PostgreSQL and PgBouncer, with the whole daemon running.

Every fault test checks the same contract (``assert_fault_contract``):

* ``/metrics``, ``/healthz`` and ``/readyz`` answer within the collection timeout plus ``MARGIN``;
* the affected target shows ``poolwatch_target_up 0``, its ``pgbouncer_up``/``pg_up`` 0, exactly one
  ``poolwatch_target_down_reason`` at 1 (the expected reason) and a failing entry with a detail
  in ``/readyz``;
* the other targets stay up and are not named in ``/readyz``;
* once the fault is gone, the target is back by itself within two collection intervals
  (``FAST_BOUND``); where a collection or a probe in flight is cut off at the timeout (a hung
  target, a paused pool), that timeout is added (``HUNG_BOUND``).

Timings are measured from ``/readyz``, which reads the background collection's last result (it never
triggers a collection), so they are the daemon's own detection and recovery times, not a scrape's.

"Dead" and "hung" targets that must come back are put behind ``FaultProxy``, a loopback TCP proxy
the test switches between forwarding, never answering (accepts, reads, never writes) and refusing.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Literal

import aiohttp
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from poolwatch.collect import Engine
from poolwatch.localcluster import (
    PgBouncerServer,
    PostgresServer,
    free_port,
    scram_sha256_verifier,
)
from poolwatch.sources.pgbouncer import COLLECTORS, PgBouncerSource, classify_pgbouncer_error
from tests.conftest import MakePgBouncer
from tests.daemon import Daemon, make_config, pgbouncer_target, pick, postgres_target, running_daemon

TIMEOUT = 1.0  # collection.timeout and probes.timeout of every daemon here
INTERVAL = 0.5  # collection.interval and probes.interval
MARGIN = 0.5  # what an endpoint may take beyond the timeout
ANSWER_BOUND = TIMEOUT + MARGIN
#: two collection intervals, one of which may contain a collection cut off at the timeout
#: two collection intervals (plus scheduling slack): a collection against a refusing, dead or
#: misconfigured target fails in milliseconds
FAST_BOUND = 2 * INTERVAL + 0.25
#: two intervals and a collection (or probe) cut off at the timeout
HUNG_BOUND = 2 * INTERVAL + TIMEOUT

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
Kind = Literal["pgbouncer", "postgres"]


def fault_config(**kw: Any) -> Any:
    return make_config(
        collection={"timeout": TIMEOUT, "interval": INTERVAL, "max_age": 0},
        probes={"interval": INTERVAL, "timeout": TIMEOUT},
        **kw,
    )


def figure(name: str, value: float) -> None:
    """A measured figure, printed for the report (pytest -s shows it)."""
    print(f"FIGURE {name} = {value:.3f}")


# ------------------------------------------------------------------------------------------------
# A switchable TCP proxy
# ------------------------------------------------------------------------------------------------
ProxyMode = Literal["forward", "blackhole", "refuse"]


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.frozen = asyncio.Event()


async def _copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ConnectionError):
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()


class FaultProxy:
    """127.0.0.1:``port`` in front of 127.0.0.1:``upstream_port``.

    * ``forward``: relays bytes both ways.
    * ``blackhole``: accepts and never answers; open relays freeze (the upstream side is closed,
      the client side stays open and unanswered) — a server that hangs.
    * ``refuse``: nothing listens (connection refused) and every open connection is reset — a
      server that died.

    ``open_connections`` is the number of client connections the proxy holds now: what poolwatch
    has not closed.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.mode: ProxyMode = "forward"
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
        return self

    async def set_mode(self, mode: ProxyMode) -> None:
        previous, self.mode = self.mode, mode
        if mode == "refuse":
            await self._stop_listening()
            self._reset_all()
        elif mode == "blackhole":
            for conn in self._conns:
                conn.frozen.set()
        elif previous != "forward":
            self._reset_all()  # frozen relays cannot be resumed half-way through a protocol
        if mode != "refuse" and self._server is None:
            await self.start()

    async def close(self) -> None:
        await self._stop_listening()
        self._reset_all()
        await asyncio.sleep(0)

    async def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)

    def _reset_all(self) -> None:
        for conn in list(self._conns):
            conn.writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(reader, writer)
        self._conns.add(conn)
        self.accepted += 1
        try:
            if self.mode == "forward":
                try:
                    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
                except OSError:
                    writer.transport.abort()
                    return
                relays = {
                    asyncio.create_task(_copy(reader, up_writer)),
                    asyncio.create_task(_copy(up_reader, writer)),
                }
                frozen = asyncio.create_task(conn.frozen.wait())
                await asyncio.wait({*relays, frozen}, return_when=asyncio.FIRST_COMPLETED)
                for task in (*relays, frozen):
                    task.cancel()
                await asyncio.gather(*relays, frozen, return_exceptions=True)
                up_writer.transport.abort()
                if not conn.frozen.is_set():
                    return
            # never answer: read and discard until the client goes away or we are reset
            with contextlib.suppress(OSError, ConnectionError):
                while await reader.read(65536):
                    pass
        finally:
            self._conns.discard(conn)
            writer.transport.abort()


@contextlib.asynccontextmanager
async def fault_proxy(upstream_port: int) -> AsyncIterator[FaultProxy]:
    proxy = await FaultProxy(upstream_port).start()
    try:
        yield proxy
    finally:
        await proxy.close()


# ------------------------------------------------------------------------------------------------
# Reading the daemon
# ------------------------------------------------------------------------------------------------
async def timed_get(daemon: Daemon, path: str) -> tuple[int, str, float]:
    started = time.monotonic()
    status, body = await daemon.get(path)
    return status, body, time.monotonic() - started


async def readiness(daemon: Daemon) -> dict[str, Any]:
    _, body = await daemon.get("/readyz")
    parsed: dict[str, Any] = json.loads(body)
    return parsed


def failing_entry(ready: dict[str, Any], target: str, kind: str) -> dict[str, Any] | None:
    found = [f for f in ready["failing"] if f["target"] == target and f["kind"] == kind]
    return found[0] if found else None


async def wait_ready_state(
    daemon: Daemon, target: str, kind: str, *, down: bool, within: float, reason: str | None = None
) -> float:
    """Poll /readyz until ``target`` is failing (``down``) or not; seconds it took."""
    started = time.monotonic()
    last: dict[str, Any] | None = None
    while True:
        last = failing_entry(await readiness(daemon), target, kind)
        if (last is not None and (reason is None or last["reason"] == reason)) if down else last is None:
            return time.monotonic() - started
        if time.monotonic() - started > within:
            state = "down" if down else "up"
            raise AssertionError(f"{target}/{kind} not {state} ({reason}) within {within:g}s; last: {last}")
        await asyncio.sleep(0.05)


def parse_samples(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples


def up_metric(kind: str) -> str:
    return "pgbouncer_up" if kind == "pgbouncer" else "pg_up"


async def assert_fault_contract(
    daemon: Daemon,
    target: str,
    kind: Kind,
    reason: str,
    healthy: list[tuple[str, str]],
    *,
    detail_contains: str = "",
) -> Samples:
    """The endpoints answer in time, the target is down with ``reason``, the others are up."""
    # /metrics runs a collection (max_age 0): it is what the timeout bounds
    status, text, seconds = await timed_get(daemon, "/metrics")
    assert status == 200, text
    assert seconds < ANSWER_BOUND, f"/metrics took {seconds:.2f}s"
    for path in ("/healthz", "/readyz"):
        status, _, seconds = await timed_get(daemon, path)
        assert seconds < ANSWER_BOUND, f"{path} took {seconds:.2f}s"
    samples = parse_samples(text)
    assert pick(samples, "poolwatch_target_up", target=target, kind=kind) == 0
    assert pick(samples, up_metric(kind), target=target) == 0
    reasons = {
        dict(labels)["reason"]: value
        for (name, labels), value in samples.items()
        if name == "poolwatch_target_down_reason" and dict(labels)["target"] == target
    }
    assert reasons[reason] == 1 and sum(reasons.values()) == 1, reasons
    assert (pick(samples, "poolwatch_errors_total", target=target, kind=kind, reason=reason) or 0) >= 1
    ready = await readiness(daemon)
    assert ready["ready"] is False
    entry = failing_entry(ready, target, kind)
    assert entry is not None and entry["reason"] == reason, ready
    assert entry["detail"] and detail_contains in entry["detail"], entry
    for name, other_kind in healthy:
        assert pick(samples, "poolwatch_target_up", target=name, kind=other_kind) == 1, name
        assert pick(samples, up_metric(other_kind), target=name) == 1, name
        assert not [f for f in ready["failing"] if f["target"] == name], ready["failing"]
    return samples


async def assert_recovered(daemon: Daemon, target: str, kind: Kind) -> None:
    samples = await daemon.metrics()
    assert pick(samples, "poolwatch_target_up", target=target, kind=kind) == 1
    assert pick(samples, up_metric(kind), target=target) == 1
    reasons = [
        v
        for (name, labels), v in samples.items()
        if name == "poolwatch_target_down_reason" and dict(labels)["target"] == target
    ]
    assert reasons and not any(reasons)


HEALTHY = [("pgb", "pgbouncer"), ("db", "postgres")]


def healthy_targets(pgb: PgBouncerServer, pg: PostgresServer) -> dict[str, list[dict[str, Any]]]:
    """The session's PgBouncer and PostgreSQL: the targets a fault must not touch."""
    return {"pgbouncers": [pgbouncer_target(pgb)], "postgres": [postgres_target(pg)]}


# ------------------------------------------------------------------------------------------------
# Servers of our own (tests that stop PostgreSQL must not stop the session's)
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def private_dir(prefix: str) -> Iterator[Path]:
    """Not tmp_path: pytest resets its base directory to 0700 root whenever a pytest session
    starts (another one on the same machine too), and the postgres OS user must enter ours."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def own_pg() -> Iterator[PostgresServer]:
    with private_dir("pw-faults-pg-") as base:
        server = PostgresServer(base)
        try:
            server.start()
            yield server
        finally:
            server.stop("immediate")


@pytest.fixture
def own_pg_running(own_pg: PostgresServer) -> PostgresServer:
    own_pg.start()  # a no-op unless an earlier test left it stopped
    return own_pg


@pytest.fixture
def pgbouncer_in_front(
    own_pg_running: PostgresServer, pgbouncer_118_binary: str
) -> Iterator[PgBouncerServer]:
    """A PgBouncer in front of ``own_pg`` that retries failed server logins after 1 s."""
    with private_dir("pw-faults-pgb-") as base:
        server = PgBouncerServer(base, own_pg_running, pgbouncer_118_binary, server_login_retry=1)
        try:
            server.start()
            yield server
        finally:
            server.stop()


def poolwatch_backends(pg: PostgresServer) -> int:
    return int(pg.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'poolwatch'")[0][0])


def poolwatch_console_clients(pgb: PgBouncerServer) -> int:
    return sum(
        1
        for row in pgb.show("CLIENTS", admin=True)
        if row.get("application_name") == "poolwatch" and row.get("database") == "pgbouncer"
    )


# ------------------------------------------------------------------------------------------------
# PgBouncer faults
# ------------------------------------------------------------------------------------------------
def _run_queries(pgb: PgBouncerServer, n: int) -> None:
    with psycopg.connect(
        pgb.app_dsn(), password=pgb.app_password, autocommit=True, prepare_threshold=None
    ) as c:
        for _ in range(n):
            c.execute("SELECT 1")


async def test_pgbouncer_killed_then_restarted_on_the_same_port(
    pg: PostgresServer, pgb: PgBouncerServer, make_pgbouncer: MakePgBouncer
) -> None:
    flaky = make_pgbouncer()
    config = fault_config(
        pgbouncers=[
            *healthy_targets(pgb, pg)["pgbouncers"],
            pgbouncer_target(flaky, "flaky", probe={"databases": []}),
        ],
        postgres=healthy_targets(pgb, pg)["postgres"],
    )
    queries = {"target": "flaky", "database": "app"}
    async with running_daemon(config) as daemon:
        await asyncio.to_thread(_run_queries, flaky, 20)
        assert await daemon.wait_for("pgbouncer_stats_queries_pooled_total", 20, **queries) == 20
        before = await daemon.metrics()
        collections_before = pick(before, "poolwatch_collections_total", target="flaky", kind="pgbouncer")

        flaky.kill()
        detect = await wait_ready_state(daemon, "flaky", "pgbouncer", down=True, within=FAST_BOUND)
        figure("pgbouncer_kill_detect_seconds", detect)
        down = await assert_fault_contract(
            daemon, "flaky", "pgbouncer", "connect", HEALTHY, detail_contains="nothing listens"
        )
        # no stale PgBouncer series while it is down: only up and poolwatch's own
        assert pick(down, "pgbouncer_stats_queries_pooled_total", **queries) is None

        await asyncio.to_thread(flaky.start)
        recover = await wait_ready_state(daemon, "flaky", "pgbouncer", down=False, within=FAST_BOUND)
        figure("pgbouncer_restart_recover_seconds", recover)
        await assert_recovered(daemon, "flaky", "pgbouncer")

        # PgBouncer's counters restarted from zero and are exported as they are: a lower value,
        # no adjustment (Prometheus' rate()/increase() treat a decrease as a counter reset)
        await asyncio.to_thread(_run_queries, flaky, 3)
        assert await daemon.wait_for("pgbouncer_stats_queries_pooled_total", 3, **queries) == 3
        after = await daemon.metrics()
        # poolwatch's own counters live in the daemon and never go backwards
        collections_after = pick(after, "poolwatch_collections_total", target="flaky", kind="pgbouncer")
        assert collections_before is not None and collections_after is not None
        assert collections_after > collections_before
        assert (
            pick(after, "poolwatch_errors_total", target="flaky", kind="pgbouncer", reason="connect") or 0
        ) >= 1
        assert pick(after, "poolwatch_start_time_seconds") == pick(before, "poolwatch_start_time_seconds")


async def test_pgbouncer_reload_keeps_the_target_up(
    pg: PostgresServer, pgb: PgBouncerServer, make_pgbouncer: MakePgBouncer
) -> None:
    target = make_pgbouncer()
    config = fault_config(pgbouncers=[pgbouncer_target(target, "reloaded")])
    async with running_daemon(config) as daemon:
        assert await daemon.wait_for("pgbouncer_config_default_pool_size", 5, target="reloaded") == 5
        target.settings["default_pool_size"] = 7
        target._write_files()
        assert target.admin_command("RELOAD") == []
        for _ in range(int(HUNG_BOUND / 0.1)):  # the reload and two collections after it
            ready = await readiness(daemon)
            assert failing_entry(ready, "reloaded", "pgbouncer") is None, ready
            await asyncio.sleep(0.1)
        samples = await daemon.metrics()
        assert pick(samples, "pgbouncer_config_default_pool_size", target="reloaded") == 7
        assert pick(samples, "pgbouncer_up", target="reloaded") == 1
        assert all(
            v == 0
            for (n, labels), v in samples.items()
            if n == "poolwatch_errors_total" and ("target", "reloaded") in labels
        )


@pytest.mark.parametrize("scope", ["app", "all"])
async def test_pgbouncer_pause_and_resume(
    pg: PostgresServer, pgb: PgBouncerServer, make_pgbouncer: MakePgBouncer, scope: str
) -> None:
    paused = make_pgbouncer()
    config = fault_config(
        pgbouncers=[pgbouncer_target(paused, "paused", probe={"databases": ["app"]}), pgbouncer_target(pgb)],
        postgres=[postgres_target(pg)],
    )
    probe = {"target": "paused", "kind": "pgbouncer", "database": "app"}
    pause, resume = ("PAUSE app", "RESUME app") if scope == "app" else ("PAUSE", "RESUME")
    async with running_daemon(config) as daemon:
        assert await daemon.wait_for("poolwatch_probe_success", 1, **probe) == 1
        paused.admin_command(pause)
        # a client's SELECT 1 now waits: the probe fails with a timeout, bounded by its timeout
        detect = await wait_ready_state(
            daemon, "paused", "pgbouncer-probe", down=True, within=FAST_BOUND + TIMEOUT
        )
        figure(f"pgbouncer_pause_{scope}_probe_detect_seconds", detect)
        for path in ("/metrics", "/healthz", "/readyz"):
            _, _, seconds = await timed_get(daemon, path)
            assert seconds < ANSWER_BOUND, (path, seconds)
        samples = await daemon.metrics()
        # the console still answers: the target itself stays up
        assert pick(samples, "pgbouncer_up", target="paused") == 1
        # PAUSE <db> shows in SHOW DATABASES; a global PAUSE does not (1.24's SHOW STATE has it, which
        # poolwatch does not read): then the failing probe is the only signal
        expected_flag = 1 if scope == "app" else 0
        assert pick(samples, "pgbouncer_databases_paused", target="paused", name="app") == expected_flag
        assert pick(samples, "poolwatch_probe_success", **probe) == 0
        assert (pick(samples, "poolwatch_probe_failures_total", reason="timeout", **probe) or 0) >= 1
        duration = pick(samples, "poolwatch_probe_last_duration_seconds", **probe)
        assert duration is not None and duration < TIMEOUT + 0.2, duration
        ready = await readiness(daemon)
        assert failing_entry(ready, "paused", "pgbouncer") is None
        probe_entry = failing_entry(ready, "paused", "pgbouncer-probe")
        assert probe_entry is not None and probe_entry["reason"] == "timeout"
        assert pick(samples, "pgbouncer_up", target="pgb") == 1 and pick(samples, "pg_up", target="db") == 1
        assert not [f for f in ready["failing"] if f["target"] in ("pgb", "db")]

        paused.admin_command(resume)
        recover = await wait_ready_state(
            daemon, "paused", "pgbouncer-probe", down=False, within=FAST_BOUND + TIMEOUT
        )
        figure(f"pgbouncer_resume_{scope}_probe_recover_seconds", recover)
        samples = await daemon.metrics()
        assert pick(samples, "pgbouncer_databases_paused", target="paused", name="app") == 0
        assert pick(samples, "poolwatch_probe_success", **probe) == 1


@pytest.mark.parametrize("version", ["1.18", "1.24"])
async def test_pgbouncer_admin_shutdown(
    pg: PostgresServer, pgb: PgBouncerServer, make_pgbouncer: MakePgBouncer, version: str
) -> None:
    victim = make_pgbouncer(version=version)
    config = fault_config(
        pgbouncers=[*healthy_targets(pgb, pg)["pgbouncers"], pgbouncer_target(victim, "victim")],
        postgres=healthy_targets(pgb, pg)["postgres"],
    )
    async with running_daemon(config) as daemon:
        assert await daemon.wait_for("pgbouncer_up", 1, target="victim") == 1
        with contextlib.suppress(psycopg.OperationalError):  # the console goes away under the command
            victim.admin_command("SHUTDOWN")
        assert await asyncio.to_thread(victim.wait_exit, 5.0), "SHUTDOWN did not end PgBouncer"
        detect = await wait_ready_state(daemon, "victim", "pgbouncer", down=True, within=FAST_BOUND)
        figure(f"pgbouncer_{version}_shutdown_detect_seconds", detect)
        await assert_fault_contract(daemon, "victim", "pgbouncer", "connect", HEALTHY)
        await asyncio.to_thread(victim.start)
        recover = await wait_ready_state(daemon, "victim", "pgbouncer", down=False, within=FAST_BOUND)
        figure(f"pgbouncer_{version}_shutdown_recover_seconds", recover)
        await assert_recovered(daemon, "victim", "pgbouncer")


def test_stats_user_cannot_run_admin_commands(make_pgbouncer: MakePgBouncer) -> None:
    """poolwatch only ever sends SHOW; were an admin command sent as a stats_users user, the
    refusal is classified as a privilege problem that names admin_users, not as a dead target."""
    target = make_pgbouncer()
    source_user = target.stats_user
    for command in ("PAUSE", "RELOAD", "SHUTDOWN", "KILL app", "SET default_pool_size = 3"):
        with pytest.raises(psycopg.Error) as info:
            target.admin_command(command, admin=False)
        reason, detail = classify_pgbouncer_error(info.value, target.stats_password, source_user)
        assert reason == "privilege", (command, reason, detail)
        assert "admin_users" in detail and target.stats_password not in detail
    # and nothing happened: PgBouncer runs, unpaused, with its setting unchanged
    assert target.is_running()
    assert [row["paused"] for row in target.show("DATABASES") if row["name"] == "app"] == [0]
    assert {row["key"]: row["value"] for row in target.show("CONFIG")}["default_pool_size"] == "5"
    # the same user's SHOW commands, all poolwatch sends, still work
    assert {command.split()[1].lower() for _, command in COLLECTORS} <= {
        "version",
        "pools",
        "stats",
        "databases",
        "lists",
        "config",
        "clients",
        "servers",
    }
    for _, command in COLLECTORS:
        target.admin_command(command, admin=False)


# ------------------------------------------------------------------------------------------------
# PostgreSQL faults
# ------------------------------------------------------------------------------------------------
async def test_postgres_stopped_while_pgbouncer_stays_up(
    pg: PostgresServer, own_pg_running: PostgresServer, pgbouncer_in_front: PgBouncerServer
) -> None:
    behind = pgbouncer_in_front
    config = fault_config(
        pgbouncers=[pgbouncer_target(behind, "front", probe={"databases": ["app"]})],
        postgres=[postgres_target(own_pg_running, "stopped"), postgres_target(pg)],
    )
    probe = {"target": "front", "kind": "pgbouncer", "database": "app"}
    async with running_daemon(config) as daemon:
        assert await daemon.wait_for("poolwatch_probe_success", 1, **probe) == 1
        await asyncio.to_thread(own_pg_running.stop, "fast")
        detect = await wait_ready_state(daemon, "stopped", "postgres", down=True, within=FAST_BOUND)
        figure("postgres_stop_detect_seconds", detect)
        await assert_fault_contract(
            daemon, "stopped", "postgres", "connect", [("front", "pgbouncer"), ("db", "postgres")]
        )
        # checks through PgBouncer fail with a reason that says PgBouncer cannot reach PostgreSQL...
        deadline = time.monotonic() + HUNG_BOUND + 2 * TIMEOUT
        entry: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            entry = failing_entry(await readiness(daemon), "front", "pgbouncer-probe")
            if entry is not None and entry["reason"] == "connect":
                break
            await asyncio.sleep(0.1)
        assert entry is not None and entry["reason"] == "connect", entry
        assert "PgBouncer" in entry["detail"] and "PostgreSQL" in entry["detail"], entry
        # ...while PgBouncer's own metrics keep flowing
        first = await daemon.value("poolwatch_collections_total", target="front", kind="pgbouncer")
        await asyncio.sleep(2 * INTERVAL + 0.2)
        samples = await daemon.metrics()
        assert (pick(samples, "poolwatch_collections_total", target="front", kind="pgbouncer") or 0) > (
            first or 0
        )
        assert pick(samples, "pgbouncer_up", target="front") == 1
        # the probe's pool (database app, the console user) is still listed by PgBouncer
        pool = {"target": "front", "database": "app", "user": behind.stats_user}
        assert pick(samples, "pgbouncer_pools_client_active_connections", **pool) is not None
        assert pick(samples, "poolwatch_probe_success", **probe) == 0

        await asyncio.to_thread(own_pg_running.start)
        recover = await wait_ready_state(daemon, "stopped", "postgres", down=False, within=FAST_BOUND)
        figure("postgres_start_recover_seconds", recover)
        await assert_recovered(daemon, "stopped", "postgres")
        # PgBouncer retries its server login after server_login_retry (1 s here, 15 s by default)
        recover = await wait_ready_state(
            daemon,
            "front",
            "pgbouncer-probe",
            down=False,
            within=FAST_BOUND + 1.0 + TIMEOUT,  # + server_login_retry
        )
        figure("probe_through_pgbouncer_recover_seconds", recover)


async def test_postgres_restarted(
    pg: PostgresServer, own_pg_running: PostgresServer, pgbouncer_in_front: PgBouncerServer
) -> None:
    config = fault_config(
        pgbouncers=[pgbouncer_target(pgbouncer_in_front, "front", probe={"databases": ["app"]})],
        postgres=[postgres_target(own_pg_running, "restarted"), postgres_target(pg)],
    )
    async with running_daemon(config) as daemon:
        assert await daemon.wait_for("pg_up", 1, target="restarted") == 1
        assert await daemon.wait_for("poolwatch_probe_success", 1, target="restarted", kind="postgres") == 1
        started = time.monotonic()
        await asyncio.to_thread(own_pg_running.restart, "fast")
        restart_took = time.monotonic() - started
        recover = await wait_ready_state(daemon, "restarted", "postgres", down=False, within=FAST_BOUND)
        recover = await wait_ready_state(daemon, "restarted", "postgres-probe", down=False, within=FAST_BOUND)
        figure("postgres_restart_seconds", restart_took)
        figure("postgres_restart_recover_seconds", recover)
        await assert_recovered(daemon, "restarted", "postgres")
        await asyncio.sleep(2 * INTERVAL)
        samples = await daemon.metrics()
        assert (
            pick(samples, "poolwatch_probe_success", target="restarted", kind="postgres", database="postgres")
            == 1
        )
        assert pick(samples, "pgbouncer_up", target="front") == 1
        assert poolwatch_backends(own_pg_running) <= 2  # pool_max_size


# ------------------------------------------------------------------------------------------------
# Network faults: hung, refusing, unresolvable (both kinds of target)
# ------------------------------------------------------------------------------------------------
def proxied_target(kind: Kind, proxy: FaultProxy, pg: PostgresServer, pgb: PgBouncerServer) -> dict[str, Any]:
    if kind == "pgbouncer":
        return pgbouncer_target(pgb, "faulty", port=proxy.port, connect_timeout=1)
    return postgres_target(pg, "faulty", port=proxy.port, connect_timeout=1)


def config_with(kind: Kind, faulty: dict[str, Any], pg: PostgresServer, pgb: PgBouncerServer) -> Any:
    targets = healthy_targets(pgb, pg)
    targets["pgbouncers" if kind == "pgbouncer" else "postgres"].append(faulty)
    return fault_config(**targets)


#: The reason each source gives for a server that accepts TCP and never answers the login. The
#: PostgreSQL source files a connect that times out under "connect" (its own tests pin that).
HUNG_REASON = {"pgbouncer": "timeout", "postgres": "connect"}


@pytest.mark.parametrize("kind", ["pgbouncer", "postgres"])
async def test_target_that_accepts_and_never_answers(
    pg: PostgresServer, pgb: PgBouncerServer, kind: Kind
) -> None:
    upstream = pgb.port if kind == "pgbouncer" else pg.port
    reason = HUNG_REASON[kind]
    async with (
        fault_proxy(upstream) as proxy,
        running_daemon(config_with(kind, proxied_target(kind, proxy, pg, pgb), pg, pgb)) as daemon,
    ):
        await wait_ready_state(daemon, "faulty", kind, down=False, within=5)
        await proxy.set_mode("blackhole")
        detect = await wait_ready_state(daemon, "faulty", kind, down=True, within=HUNG_BOUND)
        figure(f"{kind}_hung_detect_seconds", detect)
        # a held connection that stops answering is reported as a timeout of the query; from the
        # next collection on, the login itself does not complete
        await wait_ready_state(daemon, "faulty", kind, down=True, within=HUNG_BOUND + TIMEOUT, reason=reason)
        for _ in range(2):  # several collections, each cut off at the timeout
            await assert_fault_contract(daemon, "faulty", kind, reason, HEALTHY, detail_contains="connect")
        # every connection poolwatch opened to the hung server was closed again
        assert proxy.open_connections <= 3, proxy.open_connections
        await proxy.set_mode("forward")
        recover = await wait_ready_state(daemon, "faulty", kind, down=False, within=HUNG_BOUND)
        figure(f"{kind}_hung_recover_seconds", recover)
        await assert_recovered(daemon, "faulty", kind)


@pytest.mark.parametrize("kind", ["pgbouncer", "postgres"])
async def test_target_that_refuses(pg: PostgresServer, pgb: PgBouncerServer, kind: Kind) -> None:
    upstream = pgb.port if kind == "pgbouncer" else pg.port
    async with (
        fault_proxy(upstream) as proxy,
        running_daemon(config_with(kind, proxied_target(kind, proxy, pg, pgb), pg, pgb)) as daemon,
    ):
        await wait_ready_state(daemon, "faulty", kind, down=False, within=5)
        await proxy.set_mode("refuse")
        detect = await wait_ready_state(daemon, "faulty", kind, down=True, within=FAST_BOUND)
        figure(f"{kind}_refused_detect_seconds", detect)
        await assert_fault_contract(daemon, "faulty", kind, "connect", HEALTHY)
        await proxy.set_mode("forward")
        recover = await wait_ready_state(daemon, "faulty", kind, down=False, within=FAST_BOUND)
        figure(f"{kind}_refused_recover_seconds", recover)
        await assert_recovered(daemon, "faulty", kind)


@pytest.mark.parametrize("kind", ["pgbouncer", "postgres"])
async def test_host_name_that_does_not_resolve(pg: PostgresServer, pgb: PgBouncerServer, kind: Kind) -> None:
    faulty = {
        "name": "faulty",
        "host": "poolwatch-no-such-host.invalid",
        "user": "poolwatch",
        "connect_timeout": 1,
    }
    async with running_daemon(config_with(kind, faulty, pg, pgb)) as daemon:
        await wait_ready_state(daemon, "faulty", kind, down=True, within=FAST_BOUND)
        await assert_fault_contract(
            daemon, "faulty", kind, "connect", HEALTHY, detail_contains="does not resolve"
        )
        _, body = await daemon.get("/readyz")
        assert "poolwatch-no-such-host.invalid" in body  # which name, so the fix is obvious


async def test_wrong_password_for_pgbouncer(
    pg: PostgresServer, pgb: PgBouncerServer, make_pgbouncer: MakePgBouncer
) -> None:
    old, new = "Old-Rotated-Pw-1", "New-Rotated-Pw-2"
    target = make_pgbouncer(stats_users="poolwatch,rotator", users={"rotator": old})
    faulty = pgbouncer_target(target, "faulty", user="rotator", probe={"databases": []})
    os.environ[faulty["password_env"]] = new
    async with running_daemon(
        fault_config(**{**healthy_targets(pgb, pg), "pgbouncers": [pgbouncer_target(pgb), faulty]})
    ) as daemon:
        await wait_ready_state(daemon, "faulty", "pgbouncer", down=True, within=FAST_BOUND)
        await assert_fault_contract(
            daemon, "faulty", "pgbouncer", "auth", HEALTHY, detail_contains="password"
        )
        _, body = await daemon.get("/readyz")
        assert new not in body and old not in body
        # the password is rotated on the server side to the one poolwatch has: back by itself
        await asyncio.to_thread(target.reload_config, users={"rotator": new})
        target.admin_command("RELOAD")
        recover = await wait_ready_state(daemon, "faulty", "pgbouncer", down=False, within=FAST_BOUND)
        figure("pgbouncer_password_fixed_recover_seconds", recover)
        await assert_recovered(daemon, "faulty", "pgbouncer")


async def test_wrong_password_for_postgres(
    pg: PostgresServer, pgb: PgBouncerServer, own_pg_running: PostgresServer
) -> None:
    old, new = "Old-Rotated-Pw-3", "New-Rotated-Pw-4"
    role = sql.Identifier("rotator")
    own_pg_running.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(role))
    own_pg_running.execute(
        sql.SQL("CREATE ROLE {} LOGIN IN ROLE pg_monitor PASSWORD {}").format(
            role, sql.Literal(scram_sha256_verifier(old))
        )
    )
    faulty = postgres_target(own_pg_running, "faulty", user="rotator")
    os.environ[faulty["password_env"]] = new
    try:
        async with running_daemon(config_with("postgres", faulty, pg, pgb)) as daemon:
            await wait_ready_state(daemon, "faulty", "postgres", down=True, within=FAST_BOUND)
            await assert_fault_contract(
                daemon, "faulty", "postgres", "auth", HEALTHY, detail_contains="password"
            )
            _, body = await daemon.get("/readyz")
            assert new not in body and old not in body
            own_pg_running.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(role, sql.Literal(scram_sha256_verifier(new)))
            )
            recover = await wait_ready_state(daemon, "faulty", "postgres", down=False, within=FAST_BOUND)
            figure("postgres_password_fixed_recover_seconds", recover)
            await assert_recovered(daemon, "faulty", "postgres")
    finally:
        own_pg_running.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'rotator'"
        )
        with contextlib.suppress(psycopg.Error):
            own_pg_running.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(role))


# ------------------------------------------------------------------------------------------------
# No leaks over hundreds of fault cycles
# ------------------------------------------------------------------------------------------------
TERMINATE_POOLWATCH = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'poolwatch'"
)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_no_leaks_over_200_fault_cycles(
    own_pg_running: PostgresServer, make_pgbouncer: MakePgBouncer
) -> None:
    """200 collections alternating a live and a dead PgBouncer (refused, killed, hung), probes
    running all along, poolwatch's PostgreSQL sessions terminated now and then: connections,
    descriptors and memory stay bounded."""
    pool_max = 2
    target = make_pgbouncer()
    async with fault_proxy(target.port) as proxy:
        config = make_config(
            collection={"timeout": 0.3, "interval": 60, "max_age": 0},
            probes={"interval": 0.05, "timeout": 0.3},
            pgbouncers=[pgbouncer_target(target, "cycled", port=proxy.port, connect_timeout=1)],
            postgres=[postgres_target(own_pg_running, "db", pool_max_size=pool_max)],
        )
        engine = Engine(config)
        await engine.start()
        fds: list[int] = []
        rss: list[int] = []
        worst_console, worst_backends = 0, 0
        try:
            for i in range(200):
                live = i % 2 == 0
                if live:
                    if not target.is_running():
                        await asyncio.to_thread(target.start)
                    await proxy.set_mode("forward")
                elif i % 20 == 1:
                    await asyncio.to_thread(target.kill)  # a real crash behind the proxy
                elif i % 20 == 11:
                    await proxy.set_mode("blackhole")
                else:
                    await proxy.set_mode("refuse")
                if i % 25 == 0:
                    own_pg_running.execute(TERMINATE_POOLWATCH)
                snap = await engine.current(max_age=0)
                up = snap.results["cycled/pgbouncer"].up
                assert up == live, (
                    i,
                    snap.results["cycled/pgbouncer"].reason,
                    snap.results["cycled/pgbouncer"].detail,
                )
                if live and i % 10 == 0:
                    worst_console = max(
                        worst_console, await asyncio.to_thread(poolwatch_console_clients, target)
                    )
                worst_backends = max(
                    worst_backends, await asyncio.to_thread(poolwatch_backends, own_pg_running)
                )
                if i in (20, 199):
                    gc.collect()
                    await asyncio.sleep(0.3)  # let cut-off probes and closing sockets settle
                    fds.append(_open_fds())
                    rss.append(_rss_bytes())
            assert worst_console <= 1, worst_console
            assert worst_backends <= pool_max, worst_backends
            assert proxy.open_connections <= 3, proxy.open_connections
            figure("leak_fds_after_20", fds[0])
            figure("leak_fds_after_200", fds[1])
            figure("leak_rss_mb_after_20", rss[0] / 2**20)
            figure("leak_rss_mb_after_200", rss[1] / 2**20)
            assert fds[1] - fds[0] <= 4, fds
            assert rss[1] - rss[0] < 16 * 2**20, rss
        finally:
            await engine.stop()
        # stopped: nothing left open anywhere
        assert await asyncio.to_thread(poolwatch_console_clients, target) == 0
        for _ in range(50):
            if await asyncio.to_thread(poolwatch_backends, own_pg_running) == 0:
                break
            await asyncio.sleep(0.05)
        assert await asyncio.to_thread(poolwatch_backends, own_pg_running) == 0


# ------------------------------------------------------------------------------------------------
# Load: many concurrent scrapes, one collection at a time
# ------------------------------------------------------------------------------------------------
LOAD_SECONDS = float(os.environ.get("POOLWATCH_LOAD_SECONDS", "10"))
LOAD_CLIENTS = 50


async def test_many_concurrent_scrapers_share_collections(
    pg: PostgresServer, make_pgbouncer: MakePgBouncer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import poolwatch.collect as collect

    target = make_pgbouncer()
    sources: list[PgBouncerSource] = []
    real = collect._pgbouncer_source

    def recording(t: Any) -> PgBouncerSource:
        source = real(t)
        sources.append(source)
        return source

    monkeypatch.setattr(collect, "_pgbouncer_source", recording)
    max_age = 1.0  # the default: a scrape within 1 s of a collection is served its bytes
    config = make_config(
        collection={"timeout": 2, "interval": 5, "max_age": max_age},
        pgbouncers=[pgbouncer_target(target, "loaded", probe={"databases": []})],
        postgres=[postgres_target(pg)],
    )

    async with running_daemon(config) as daemon:
        await daemon.metrics()
        (source,) = sources
        sent_before = source.queries_sent
        latencies: list[float] = []
        errors: list[str] = []
        stop_at = time.monotonic() + LOAD_SECONDS

        async def scraper(session: aiohttp.ClientSession) -> None:
            while time.monotonic() < stop_at:
                started = time.monotonic()
                try:
                    async with session.get(daemon.url + "/metrics") as response:
                        body = await response.read()
                        if response.status != 200 or b'pgbouncer_up{target="loaded"} 1.0' not in body:
                            errors.append(f"{response.status}: {body[:200]!r}")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    errors.append(repr(exc))
                latencies.append(time.monotonic() - started)

        connector = aiohttp.TCPConnector(limit=LOAD_CLIENTS)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=10)
        ) as session:
            await asyncio.gather(*(scraper(session) for _ in range(LOAD_CLIENTS)))
        sent = source.queries_sent - sent_before

    assert not errors, errors[:5]
    scrapes = len(latencies)
    latencies.sort()
    p99 = latencies[int(0.99 * (scrapes - 1))]
    figure("load_scrapes", scrapes)
    figure("load_scrapes_per_second", scrapes / LOAD_SECONDS)
    figure("load_p99_latency_seconds", p99)
    figure("load_max_latency_seconds", latencies[-1])
    figure("load_show_commands", sent)
    assert scrapes > 20 * LOAD_SECONDS  # the load was real
    assert latencies[-1] < 2 + MARGIN
    # at most one collection per max_age (plus background ones every interval), whatever the scrape rate
    collections_allowed = LOAD_SECONDS / max_age + LOAD_SECONDS / 5 + 2
    assert sent <= len(COLLECTORS) * collections_allowed, (sent, scrapes)
    assert sent < scrapes / 100  # far from one round of SHOWs per scrape
