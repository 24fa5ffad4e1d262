"""``poolwatch demo`` plumbing: the load is visible to the daemon's identities, nothing leaks."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from poolwatch import demo


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


class RecordingDaemon:
    """Stands in for the CLI's daemon: checks what the demo hands it, then returns."""

    def __init__(self) -> None:
        self.args: tuple[Any, ...] = ()
        self.pool: dict[str, Any] = {}
        self.idle_in_transaction = 0
        self.server_pids: list[int] = []

    async def __call__(
        self,
        pgbouncer_dsn: str,
        pgbouncer_password: str,
        postgres_dsn: str,
        postgres_password: str,
        listen_port: int,
    ) -> None:
        self.args = (pgbouncer_dsn, pgbouncer_password, postgres_dsn, postgres_password, listen_port)
        async with await psycopg.AsyncConnection.connect(
            pgbouncer_dsn,
            password=pgbouncer_password,
            autocommit=True,
            prepare_threshold=None,
            row_factory=dict_row,
        ) as console:
            for _ in range(200):  # until the load shows: 2 active and someone waiting
                rows = await (await console.execute("SHOW POOLS")).fetchall()
                pool = next((r for r in rows if (r["database"], r["user"]) == ("app", "app")), None)
                if pool is not None and pool["cl_active"] >= 2 and pool["cl_waiting"] >= 1:
                    self.pool = pool
                    break
                await asyncio.sleep(0.05)
        async with await psycopg.AsyncConnection.connect(postgres_dsn, password=postgres_password) as conn:
            row = await (
                await conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'"
                )
            ).fetchone()
            assert row is not None
            self.idle_in_transaction = row[0]
        self.server_pids = _children(os.getpid())


def test_demo_hands_the_daemon_working_least_privilege_dsns(capsys: pytest.CaptureFixture[str]) -> None:
    daemon = RecordingDaemon()
    before = set(_children(os.getpid()))  # session fixtures' servers, if any
    assert demo.main(["--listen-port", "0"], start_daemon=daemon) == 0
    out = capsys.readouterr().out
    pgbouncer_dsn, pgbouncer_password, postgres_dsn, postgres_password, listen_port = daemon.args
    assert "user=poolwatch" in pgbouncer_dsn and "dbname=pgbouncer" in pgbouncer_dsn
    assert "user=poolwatch" in postgres_dsn and "host=127.0.0.1" in postgres_dsn
    assert f"http://127.0.0.1:{listen_port}/metrics" in out
    assert pgbouncer_password not in out and postgres_password not in out
    assert "password" not in pgbouncer_dsn + postgres_dsn
    # The load is real: pool size 2 saturated with clients queued; one idle-in-transaction session.
    assert daemon.pool["cl_active"] == 2 and daemon.pool["cl_waiting"] >= 1
    assert daemon.idle_in_transaction >= 1
    # Everything it started has stopped again.
    started = set(daemon.server_pids) - before
    assert len(started) == 2  # postgres and pgbouncer
    assert [pid for pid in started if _alive(pid)] == []


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_stops_everything_on_signal(sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "poolwatch.demo", "--listen-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "metrics: http://127.0.0.1:" in line:
                break
        else:
            pytest.fail("demo ended early:\n" + "".join(lines))
        time.sleep(1)  # let the load run
        servers = _children(proc.pid)
        assert len(servers) == 2, servers  # postgres and pgbouncer
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines) + rest
    assert "servers stopped" in rest
    assert [pid for pid in servers if _alive(pid)] == []
