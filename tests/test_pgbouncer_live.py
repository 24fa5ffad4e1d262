"""PgBouncerSource against real PgBouncer processes (fixtures from conftest.py / localcluster)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterable, Sequence

import pytest
from bench import wire
from prometheus_client.metrics_core import Metric

from poolwatch.localcluster import PgBouncerServer, PostgresServer, hold_transactions
from poolwatch.metrics import exposition
from poolwatch.sources import pgbouncer
from poolwatch.sources.pgbouncer import (
    _READ_COLUMNS,
    COLLECTORS,
    Connections,
    PgBouncerObservation,
    PgBouncerSource,
    aggregate_connection_columns,
    families_from_observation,
    select_pools,
)

MakePgBouncer = Callable[..., PgBouncerServer]
SHOWS_PER_COLLECTION = len(COLLECTORS)


def _source(pgb: PgBouncerServer, **kw: object) -> PgBouncerSource:
    return PgBouncerSource("pgb", pgb.stats_dsn, pgb.stats_password, connect_timeout=5, **kw)  # type: ignore[arg-type]


def _masked(rows: Iterable[Sequence[object]], columns: Iterable[int]) -> list[list[object]]:
    """``rows`` with ``columns`` blanked out."""
    masked = [list(row) for row in rows]
    for row in masked:
        for i in columns:
            row[i] = None
    return masked


def _without_waits(aggregates: tuple[Connections, set[tuple[str, int]]]) -> object:
    """The aggregates but the waits, which tick between two reads."""
    connections, local_ends = aggregates
    return {
        key: (g.states, g.oldest_connect_time, g.close_needed) for key, g in connections.items()
    }, local_ends


def _value(families: Iterable[Metric], name: str, **labels: str) -> float | None:
    wanted = {"target": "pgb", **labels}
    for family in families:
        for s in family.samples:
            if s.name == name and s.labels == wanted:
                return s.value
    return None


def _poolwatch_clients(pgb: PgBouncerServer) -> int:
    return sum(1 for row in pgb.show("CLIENTS", admin=True) if row.get("user") == pgb.stats_user)


async def test_five_clients_on_a_pool_of_two(make_pgbouncer: MakePgBouncer) -> None:
    pgb = make_pgbouncer(default_pool_size=2)
    source = _source(pgb)
    try:
        async with hold_transactions(pgb.app_dsn(), pgb.app_password, 5, wait_holding=2):
            await asyncio.to_thread(pgb.wait_for_pool, "app", cl_waiting=3, cl_active=2)
            result = await source.collect(5)
    finally:
        await source.close()
    assert result.up and all(o.ok for o in result.outcomes), result.outcomes
    pool = {"database": "app", "user": pgb.app_user}
    assert _value(result.families, "pgbouncer_pools_client_waiting_connections", **pool) == 3
    assert _value(result.families, "pgbouncer_pools_client_active_connections", **pool) == 2
    assert _value(result.families, "pgbouncer_pools_server_active_connections", **pool) == 2
    assert _value(result.families, "pgbouncer_clients", state="waiting", **pool) == 3
    maxwait = _value(result.families, "pgbouncer_pools_client_maxwait_seconds", **pool)
    assert maxwait is not None and 0 <= maxwait < 60
    assert isinstance(result.observation, PgBouncerObservation)
    assert result.observation.servers[("app", pgb.app_user)].states == {"active": 2}


async def test_show_results_load_as_columns_slice_by_slice(
    make_pgbouncer: MakePgBouncer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each SHOW's result is loaded into columns a few rows at a time (no list of row tuples for the
    whole result). With 1 row per slice, its columns equal the rows psycopg's own cursor fetches.
    SHOW CLIENTS / SERVERS load only the columns their aggregation reads (the others are left
    empty), with the same aggregates as every column loaded, and text values are one object per
    distinct value."""
    monkeypatch.setattr(pgbouncer, "SLICE_ROWS", 1)
    pgb = make_pgbouncer(default_pool_size=2)
    source = _source(pgb)
    async with hold_transactions(pgb.app_dsn(), pgb.app_password, 5, wait_holding=2):
        await asyncio.to_thread(pgb.wait_for_pool, "app", cl_waiting=3, cl_active=2)
        conn = await source._connect()
        try:
            for show in ("POOLS", "STATS", "DATABASES", "CONFIG", "CLIENTS", "SERVERS"):
                cur = conn.cursor()
                await cur.execute(f"SHOW {show}", prepare=False)
                assert cur.description is not None
                names, rows = [d.name for d in cur.description], await cur.fetchall()
                result = pgbouncer._load(await source._execute(conn, f"SHOW {show}"), None, {})
                assert result.names == names and result.length == len(rows) >= 2
                ticking = [i for i, name in enumerate(names) if "wait" in name]  # the waiters' clocks
                assert _masked(result.rows(), ticking) == _masked(rows, ticking)
            for show, name in (("CLIENTS", "clients"), ("SERVERS", "servers")):
                answer = await source._execute(conn, f"SHOW {show}")
                every = pgbouncer._load(answer, None, {})
                assert answer.result is not None and answer.result.ntuples == 0  # freed once loaded
                answer = await source._execute(conn, f"SHOW {show}")
                strings: dict[object, object] = {}
                some = pgbouncer._load(answer, _READ_COLUMNS[name], strings)
                ends = name == "servers"  # the doctor's listener check reads the servers' local ends
                aggregates = aggregate_connection_columns(some, endpoints=ends)
                everything = aggregate_connection_columns(every, endpoints=ends)
                assert _without_waits(aggregates) == _without_waits(everything)
                skipped = [i for i, column in enumerate(some.names) if column not in _READ_COLUMNS[name]]
                assert "addr" in some.names and skipped
                assert all(some.values[i] == () for i in skipped)
                users = [u for u in some.values[some.names.index("user")] if u == pgb.app_user]
                assert len(users) >= 2 and all(user is strings[pgb.app_user] for user in users)
                connections, local_ends = aggregates
                group = connections[("app", pgb.app_user)]
                if name == "clients":
                    assert group.states == {"active": 2, "waiting": 3}
                    assert group.max_wait_seconds is not None and group.max_wait_seconds >= 0
                else:
                    assert group.states == {"active": 2}
                    assert len(local_ends) >= 2  # the two server connections' own addresses
                assert group.oldest_connect_time is not None
        finally:
            await conn.close()


async def test_a_name_that_is_not_utf8_costs_only_its_own_characters(make_pgbouncer: MakePgBouncer) -> None:
    """PgBouncer passes database names through as bytes. A name that is not UTF-8 (café in
    Latin-1) makes psycopg's C text loader refuse the whole result: each SHOW is loaded again
    with the forgiving loaders (U+FFFD for the byte), SHOW CLIENTS still with only the columns it
    reads, and the target stays up with every collector ok."""
    latin1 = "caf\udce9"  # b"caf\xe9" in the client's startup packet
    # the ini file cannot hold such a name; the fallback entry makes a database of any name asked
    pgb = make_pgbouncer(databases={"*": {"dbname": "app"}}, auth_type="trust")
    clients = [await wire.connect("app", name, host=pgb.host, port=pgb.port) for name in ("plain", latin1)]
    source = _source(pgb)
    try:
        result = await source.collect(5)
    finally:
        await source.close()
        for client in clients:
            client.close()
    assert result.up and all(o.ok for o in result.outcomes), result.outcomes
    for database in ("plain", "caf\ufffd"):
        pool = {"database": database, "user": "app"}
        assert _value(result.families, "pgbouncer_clients", state="active", **pool) == 1
        assert _value(result.families, "pgbouncer_pools_client_active_connections", **pool) == 1
    assert isinstance(result.observation, PgBouncerObservation)
    assert result.observation.clients[("caf\ufffd", "app")].states == {"active": 1}


async def test_pipelined_collection_renders_what_the_pure_function_does(
    make_pgbouncer: MakePgBouncer,
) -> None:
    """The collection sends each SHOW while it builds (and pre-renders) the previous one's families,
    and reuses the label text and the families of the previous collection made from the same
    values. The bytes must be those of ``families_from_observation`` over the same observation,
    rendered afresh: on the first collection, on a repeat (reused families, pre-rendered in the
    other format) and after the pools changed (a waiting client: new state labels, new values)."""
    pgb = make_pgbouncer(default_pool_size=1)
    source = _source(pgb, hold_connection="always")

    async def compare(openmetrics: bool = False) -> tuple[PgBouncerObservation, list[Metric]]:
        source.render_openmetrics = openmetrics  # the format families are pre-rendered in
        result = await source.collect(5)
        assert result.up and all(o.ok for o in result.outcomes), result.outcomes
        obs = result.observation
        assert isinstance(obs, PgBouncerObservation)
        fresh = families_from_observation(obs, "pgb", select_pools(obs, source.pool_filter))
        collected = [f for f in result.families if f.name not in ("pgbouncer_up", "poolwatch_pools_dropped")]
        assert [f.name for f in collected] == [f.name for f in fresh]
        for form in (False, True):
            assert (
                exposition(collected, openmetrics=form).join() == exposition(fresh, openmetrics=form).join()
            )
        return obs, collected

    try:
        _, first = await compare()
        # nothing changed but the counters: most families are last collection's objects, and
        # they are rendered again for the other format
        _, second = await compare(openmetrics=True)
        reused = [f for f in second if any(f is g for g in first)]
        assert len(reused) >= 5, [f.name for f in reused]
        assert {f.name for f in reused} >= {
            "pgbouncer_databases_pool_size",
            "pgbouncer_pools_client_waiting_connections",
        }
        async with hold_transactions(pgb.app_dsn(), pgb.app_password, 2, wait_holding=1):
            await asyncio.to_thread(pgb.wait_for_pool, "app", cl_waiting=1, cl_active=1)
            obs, third = await compare()
        waiting = [f for f in third if f.name == "pgbouncer_pools_client_waiting_connections"]
        assert waiting and not any(waiting[0] is g for g in second)  # a changed column: a new family
        assert obs.clients[("app", pgb.app_user)].states == {"active": 1, "waiting": 1}
        await compare()
    finally:
        await source.close()


async def test_25_collections_on_one_connection(pgb: PgBouncerServer) -> None:
    source = _source(pgb, hold_connection="always")
    try:
        for _ in range(25):
            result = await source.collect(5)
            assert result.up and all(o.ok for o in result.outcomes), result.outcomes
        assert source.connections_opened == 1
        assert source.queries_sent == 25 * SHOWS_PER_COLLECTION
        assert source.holding and _poolwatch_clients(pgb) == 1
    finally:
        await source.close()
    assert not source.holding


async def test_concurrent_collections_share_one(pgb: PgBouncerServer) -> None:
    source = _source(pgb, hold_connection="always")
    try:
        results = await asyncio.gather(*[source.collect(5) for _ in range(5)])
        assert all(r is results[0] for r in results)
        assert source.queries_sent == SHOWS_PER_COLLECTION and source.connections_opened == 1
    finally:
        await source.close()


async def test_never_mode_leaves_no_connection(pgb: PgBouncerServer) -> None:
    source = _source(pgb, hold_connection="never")
    for _ in range(3):
        assert (await source.collect(5)).up
    assert not source.holding and source.connections_opened == 3
    await source.close()


async def test_auto_holds_when_the_listener_is_local(pgb: PgBouncerServer) -> None:
    source = _source(pgb)
    try:
        assert (await source.collect(5)).up
        assert source.holding  # 127.0.0.1: the listener is visible in /proc/net/tcp
        assert (await source.collect(5)).up
        assert source.connections_opened == 1
    finally:
        await source.close()
    conninfo = f"host={pgb.socket_dir} port={pgb.port} dbname=pgbouncer user={pgb.stats_user}"
    unix = PgBouncerSource("pgb", conninfo, pgb.stats_password, connect_timeout=5)
    try:
        assert (await unix.collect(5)).up and unix.holding  # the socket file exists
    finally:
        await unix.close()


async def test_auto_connection_never_delays_sigterm_on_124(
    make_pgbouncer: MakePgBouncer, pgbouncer_124_binary: str
) -> None:
    pgb = make_pgbouncer(version="1.24")
    source = _source(pgb)
    try:
        assert (await source.collect(5)).up and source.holding
        pgb.sigterm()
        started = time.monotonic()
        exited = await asyncio.to_thread(pgb.wait_exit, 5.0)  # the loop keeps running: the watcher acts
        assert exited, "PgBouncer 1.24 still running 5 s after SIGTERM: the console connection held it"
        assert time.monotonic() - started < 5.0
        assert not source.holding
    finally:
        await source.close()


@pytest.mark.slow
async def test_always_mode_does_delay_sigterm_on_124(
    make_pgbouncer: MakePgBouncer, pgbouncer_124_binary: str
) -> None:
    """The trap the watcher exists for: a held console connection keeps 1.23+ alive after SIGTERM."""
    pgb = make_pgbouncer(version="1.24")
    source = _source(pgb, hold_connection="always")
    try:
        assert (await source.collect(5)).up and source.holding
        pgb.sigterm()
        assert not await asyncio.to_thread(pgb.wait_exit, 2.0)
        await source.close()
        assert await asyncio.to_thread(pgb.wait_exit, 5.0)
    finally:
        await source.close()


async def test_a_hung_pgbouncer_costs_at_most_the_timeout(make_pgbouncer: MakePgBouncer) -> None:
    pgb = make_pgbouncer()
    source = _source(pgb, hold_connection="always")
    try:
        assert (await source.collect(5)).up
        pgb.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            result = await source.collect(1.0)
            elapsed = time.monotonic() - started
        finally:
            pgb.send_signal(signal.SIGCONT)
        assert elapsed < 1.2, elapsed
        assert not result.up and result.reason == "timeout"
        assert not source.holding  # the broken connection is gone; the next collection reconnects
        result = await source.collect(5)
        assert result.up and source.connections_opened == 2
        await asyncio.sleep(0.3)
        assert _poolwatch_clients(pgb) == 1
    finally:
        await source.close()


async def test_setup_mistakes_are_explained(pgb: PgBouncerServer, pg: PostgresServer) -> None:
    cases = [
        # the application user is not in stats_users
        (
            PgBouncerSource(
                "pgb",
                pgb.stats_dsn.replace(f"user={pgb.stats_user}", f"user={pgb.app_user}"),
                pgb.app_password,
                connect_timeout=5,
            ),
            "privilege",
            "stats_users",
        ),
        (PgBouncerSource("pgb", pgb.stats_dsn, "wrong-password-123", connect_timeout=5), "auth", "password"),
        # an application database through PgBouncer, and PostgreSQL itself
        (
            PgBouncerSource("pgb", pgb.app_dsn("app"), pgb.app_password, connect_timeout=5),
            "config",
            "dbname=pgbouncer",
        ),
        (
            PgBouncerSource("pgb", pg.monitor_dsn(), pg.monitor_password, connect_timeout=5),
            "config",
            "dbname=pgbouncer",
        ),
    ]
    for source, reason, hint in cases:
        try:
            result = await source.collect(5)
        finally:
            await source.close()
        assert not result.up and result.reason == reason, (result.reason, result.detail)
        assert result.detail is not None and hint in result.detail
        assert "wrong-password-123" not in result.detail and pgb.app_password not in result.detail
        assert not source.holding


async def test_one_failing_show_does_not_make_the_target_down(pgb: PgBouncerServer) -> None:
    source = _source(pgb, hold_connection="always")
    real_show = source._execute

    async def older_pgbouncer(conn: object, command: str) -> object:
        # what a release or fork without the command answers: an error on a healthy connection
        renamed = {"SHOW CLIENTS": "SHOW NO_SUCH_LIST", "SHOW POOLS": "SHOW POOLS"}.get(command, command)
        return await real_show(conn, renamed)  # type: ignore[arg-type]

    source._execute = older_pgbouncer  # type: ignore[assignment,method-assign]
    try:
        result = await source.collect(5)
        outcomes = {o.collector: o for o in result.outcomes}
        assert result.up and result.reason is None
        assert not outcomes["clients"].ok and outcomes["clients"].reason == "query"
        assert all(o.ok for name, o in outcomes.items() if name != "clients")
        names = {s.name for f in result.families for s in f.samples}
        assert "pgbouncer_servers" in names and "pgbouncer_clients" not in names
        assert source.holding and source.connections_opened == 1
    finally:
        await source.close()


async def test_without_show_pools_the_target_is_down(pgb: PgBouncerServer) -> None:
    source = _source(pgb, hold_connection="always")
    real_show = source._execute

    async def no_pools(conn: object, command: str) -> object:
        return await real_show(conn, "SHOW NO_SUCH_LIST" if command == "SHOW POOLS" else command)  # type: ignore[arg-type]

    source._execute = no_pools  # type: ignore[assignment,method-assign]
    try:
        result = await source.collect(5)
        assert not result.up and result.reason == "query" and result.detail
        assert not source.holding  # a console without SHOW POOLS is not worth holding
    finally:
        await source.close()


async def test_a_held_connection_that_died_is_replaced_without_a_down(make_pgbouncer: MakePgBouncer) -> None:
    pgb = make_pgbouncer()  # 1.18: exits on SIGTERM even with our connection open
    source = _source(pgb, hold_connection="always")
    try:
        assert (await source.collect(5)).up and source.holding
        await asyncio.to_thread(pgb.restart)  # same port; the held connection is now dead
        result = await source.collect(5)
        assert result.up and all(o.ok for o in result.outcomes), result.outcomes
        assert source.connections_opened == 2 and source.holding
        # the first SHOW went to the dead connection and was retried on the new one
        assert source.queries_sent == 2 * SHOWS_PER_COLLECTION + 1
    finally:
        await source.close()
