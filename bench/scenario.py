"""The benchmark's throwaway servers: PgBouncer with N pools, PostgreSQL with M client backends.

Built on :mod:`poolwatch.localcluster` (so the servers run as the ``postgres`` OS user and are
always stopped), with two bench-only changes that make tens of thousands of connections cheap:

* PostgreSQL trusts local (unix socket) logins, so PgBouncer's server connections and the bench's
  own backends skip SCRAM; the exporters still log in over TCP with SCRAM as the monitor role.
* PgBouncer uses ``auth_type = trust``: every bench client logs in with a bare startup packet
  (:mod:`bench.wire`), no libpq, no password hashing.

**PgBouncer with N pools.** ``[databases]`` gets N generated entries ``p00000 … pNNNNN``, each
``dbname=app pool_size=1``; one client per entry logs in, which creates the (database, user) pool.
PgBouncer opens one server connection per new pool to learn the server's parameters (the
welcome message), so logins are paced and ``server_idle_timeout`` is short: those connections
close again within seconds and PostgreSQL is never exhausted. Then a few pools are made busy:
clients holding a transaction, clients queued behind them, so SHOW POOLS / CLIENTS / SERVERS have
mixed states. Up to ``keep_clients`` (default 10,000) clients stay connected; beyond that
(the 100,000-pool point) clients log out again after logging in: PgBouncer keeps a pool after
its last client leaves, so SHOW POOLS still has N rows.

**PostgreSQL with M backends** in mixed states (idle, active, idle in transaction, aborted
transactions) over several databases, roles and application names.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench import wire
from poolwatch.localcluster import DEFAULT_PGBOUNCER, PgBouncerServer, PostgresServer, SettingValue

BENCH_ROLES = ("app", "reporting", "billing", "batch")
BENCH_DATABASES = ("app", "reporting", "billing")
APPLICATIONS = tuple(f"svc-{i:02d}" for i in range(24))


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (inherited by the servers this process starts)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class BenchPostgres(PostgresServer):
    """PostgresServer that also trusts unix-socket logins of every role (bench only)."""

    def _write_config(self) -> None:
        super()._write_config()
        hba = (
            "# poolwatch bench: unix-socket logins are trusted, TCP needs SCRAM\n"
            "local   all   all   trust\n"
            f"host    all   all   {self.host}/32   scram-sha-256\n"
        )
        self._run_as.write(self.data_dir / "pg_hba.conf", hba)

    def create_bench_objects(self) -> None:
        with self.connect() as conn:
            for role in BENCH_ROLES:
                if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                    conn.execute(f'CREATE ROLE "{role}" LOGIN')
            for db in BENCH_DATABASES:
                if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone():
                    conn.execute(f'CREATE DATABASE "{db}" OWNER app')
            for db in BENCH_DATABASES:
                for role in BENCH_ROLES:
                    conn.execute(f'GRANT CONNECT ON DATABASE "{db}" TO "{role}"')


def pool_names(first: int, stop: int) -> list[str]:
    """The generated databases' names (one pool each), ``p00000`` on, from ``first`` to ``stop``."""
    return [f"p{i:05d}" for i in range(first, stop)]


def pool_databases(n: int, pg: PostgresServer) -> dict[str, Mapping[str, SettingValue]]:
    # over the unix socket: trusted, and no TCP port per server connection
    return {
        name: {"host": str(pg.socket_dir), "port": pg.port, "dbname": "app", "pool_size": 1}
        for name in pool_names(0, n)
    }


class Scenario:
    """Owns every server and client connection of one bench run; ``close()`` stops them all."""

    def __init__(self, base_dir: Path | None = None, *, max_connections: int = 1300) -> None:
        self._made = base_dir is None
        self.base_dir = base_dir or Path(tempfile.mkdtemp(prefix="pwbench-", dir="/tmp"))
        self.pg = BenchPostgres(
            self.base_dir / "pg",
            max_connections=max_connections,
            settings={"superuser_reserved_connections": 3, "log_connections": False},
        )
        self.pgbouncer: PgBouncerServer | None = None
        self.pools = 0
        self._pool_clients: list[wire.WireConn] = []
        self._busy_pools = 0  # the first generated pools, held blocked by _make_busy
        self._churned = 0  # where churn() goes on
        self._backends: list[wire.WireConn] = []

    # -- PostgreSQL ----------------------------------------------------------------------------
    def start_postgres(self) -> None:
        self.pg.start()
        self.pg.create_bench_objects()

    async def open_backends(self, m: int, *, concurrency: int = 32) -> dict[str, int]:
        """M client backends in mixed states; returns the count per intended state."""
        await self.close_backends()
        plan: list[tuple[str, str, str, str]] = []  # (state, role, db, app)
        for i in range(m):
            bucket = i % 20
            state = (
                "active"
                if bucket < 2
                else "idle in transaction"
                if bucket < 6
                else "idle in transaction (aborted)"
                if bucket == 6
                else "idle"
            )
            plan.append(
                (
                    state,
                    BENCH_ROLES[i % len(BENCH_ROLES)],
                    BENCH_DATABASES[(i // 7) % len(BENCH_DATABASES)],
                    APPLICATIONS[(i * 7) % len(APPLICATIONS)],
                )
            )
        sem = asyncio.Semaphore(concurrency)

        async def one(state: str, role: str, db: str, app: str) -> wire.WireConn:
            async with sem:
                conn = await wire.connect(
                    role, db, port=self.pg.port, unix_dir=str(self.pg.socket_dir), application_name=app
                )
                if state == "idle in transaction":
                    await conn.query("BEGIN; SELECT 1")
                elif state == "idle in transaction (aborted)":
                    await conn.query("BEGIN")
                    with contextlib.suppress(wire.WireError):
                        await conn.query("SELECT 1/0")
                elif state == "active":
                    conn.send("SELECT pg_sleep(3600)")
                return conn

        self._backends = list(await asyncio.gather(*(one(*p) for p in plan)))
        counts: dict[str, int] = {}
        for state, *_ in plan:
            counts[state] = counts.get(state, 0) + 1
        return counts

    async def close_backends(self) -> None:
        backends, self._backends = self._backends, []
        for conn in backends:
            conn.close()
        if backends:
            # active ones run pg_sleep: make sure they are gone before the next phase counts
            with self.pg.connect() as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE backend_type = 'client backend' AND usename = ANY(%s) AND pid <> pg_backend_pid()",
                    (list(BENCH_ROLES),),
                )

    # -- PgBouncer -----------------------------------------------------------------------------
    async def start_pgbouncer(
        self,
        n: int,
        *,
        keep_clients: int = 10_000,
        busy_pools: int = 10,
        concurrency: int = 64,
        binary: str = DEFAULT_PGBOUNCER,
        progress: Any = None,
    ) -> None:
        """PgBouncer with ``n`` pools (plus the console and the app/postgres entries).

        Up to ``keep_clients`` pools: ``n`` generated ``[databases]`` entries. Above (the 100,000-pool
        point): one ``* =`` fallback entry, and PgBouncer creates each database (auto-database) when a
        client first asks for it: PgBouncer 1.18 spends minutes at 100 % CPU loading 100,000
        generated entries before it accepts a login, the fallback starts at once.
        """
        await self.stop_pgbouncer()
        keep = n <= keep_clients
        fallback: dict[str, Mapping[str, SettingValue]] = {
            "*": {"host": str(self.pg.socket_dir), "port": self.pg.port, "dbname": "app", "pool_size": 1}
        }
        extra: dict[str, Any] = {} if keep else {"autodb_idle_timeout": 86400}
        pgb = PgBouncerServer(
            self.base_dir / f"pgb-{n}",
            self.pg,
            binary,
            databases=pool_databases(n, self.pg) if keep else fallback,
            auth_type="trust",
            max_client_conn=max(1000, n + 1000),
            default_pool_size=1,
            min_pool_size=0,
            server_idle_timeout=2,
            server_lifetime=3600,
            log_connections=0,
            log_disconnections=0,
            log_pooler_errors=0,
            stats_period=60,
            start_timeout=120,
            **extra,
        )
        pgb.start()
        self.pgbouncer = pgb
        sem = asyncio.Semaphore(concurrency)
        done = 0
        started = time.monotonic()

        async def login(name: str) -> wire.WireConn | None:
            nonlocal done
            async with sem:
                conn = await wire.connect("app", name, host=pgb.host, port=pgb.port, timeout=120)
            done += 1
            if progress is not None and done % 5000 == 0:
                progress(f"  {done}/{n} pools ({time.monotonic() - started:.0f}s)")
            if keep:
                return conn
            conn.close()
            return None

        names = pool_names(0, n)  # the generated entries' names, or auto-databases
        batch = 2000
        for first in range(0, n, batch):
            got = await asyncio.gather(*(login(name) for name in names[first : first + batch]))
            self._pool_clients += [c for c in got if c is not None]
            await self._wait_servers_below(pgb, 400)
        self.pools = n
        self._busy_pools = min(busy_pools, n)
        await self._make_busy(pgb, self._busy_pools)

    async def _wait_servers_below(self, pgb: PgBouncerServer, limit: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lists = {r["list"]: r["items"] for r in await asyncio.to_thread(pgb.show, "LISTS")}
            if int(lists.get("used_servers", 0)) < limit:
                return
            await asyncio.sleep(0.5)

    async def _make_busy(self, pgb: PgBouncerServer, pools: int) -> None:
        """In ``pools`` pools: one client holds a transaction, one more waits behind it."""
        for name in pool_names(0, pools):
            holder = await wire.connect("app", name, host=pgb.host, port=pgb.port)
            await holder.query("BEGIN; SELECT 1")
            waiter = await wire.connect("app", name, host=pgb.host, port=pgb.port)
            waiter.send("SELECT 1")  # queued: pool_size 1 is taken by the holder
            self._pool_clients += [holder, waiter]

    def _quiet_pool_names(self) -> list[str]:
        """The generated pools that ``_make_busy`` left alone (its pools stay blocked)."""
        return pool_names(self._busy_pools, self.pools)

    async def _query_pools(self, names: list[str], *, concurrency: int = 48, batch: int = 300) -> None:
        """One ``SELECT 1`` in each pool, through a client of its own that logs out again.

        Each query needs a server connection (the previous one closed after ``server_idle_timeout``),
        so batches wait for PgBouncer's server count to fall: PostgreSQL is never exhausted.
        """
        pgb = self.pgbouncer
        assert pgb is not None
        sem = asyncio.Semaphore(concurrency)

        async def one(name: str) -> None:
            async with sem:
                conn = await wire.connect("app", name, host=pgb.host, port=pgb.port, timeout=120)
                try:
                    await asyncio.wait_for(conn.query("SELECT 1"), 60)
                finally:
                    conn.close()

        for first in range(0, len(names), batch):
            await asyncio.gather(*(one(name) for name in names[first : first + batch]))
            await self._wait_servers_below(pgb, 400)

    async def warm_pools(self) -> float:
        """Every quiet pool serves a query: afterwards SHOW STATS has non-zero, mostly distinct
        counters (query and transaction times) in every row, as on a fleet in use. Seconds taken."""
        started = time.monotonic()
        await self._query_pools(self._quiet_pool_names())
        self._churned = 0
        return time.monotonic() - started

    async def churn(self, k: int) -> None:
        """The next ``k`` quiet pools (in turn, wrapping around) serve one more query each."""
        names = self._quiet_pool_names()
        if not names or k <= 0:
            return
        picked = [names[(self._churned + i) % len(names)] for i in range(min(k, len(names)))]
        self._churned = (self._churned + len(picked)) % len(names)
        await self._query_pools(picked)

    async def stop_pgbouncer(self) -> None:
        clients, self._pool_clients = self._pool_clients, []
        for conn in clients:
            conn.close()
        if self.pgbouncer is not None:
            pgb, self.pgbouncer = self.pgbouncer, None
            await asyncio.to_thread(pgb.stop)
            shutil.rmtree(pgb.base_dir, ignore_errors=True)
        self.pools = 0

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.close_backends()
        try:
            await self.stop_pgbouncer()
        finally:
            self.pg.stop()
            if self._made:
                shutil.rmtree(self.base_dir, ignore_errors=True)
