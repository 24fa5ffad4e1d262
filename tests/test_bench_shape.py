"""The benchmark's promises, as shape (never timing): what bench/run.py measures must stay true.

* Round trips to PgBouncer per collection do not grow with the number of pools (10 vs 150).
* The exposition poolwatch serves for many pools parses with prometheus-client's text and
  OpenMetrics parsers and passes ``promtool check metrics``, with no duplicate series.
* Concurrent scrapes share one collection; a scrape within ``max_age`` is served the same bytes.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from bench import wire
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from poolwatch.collect import Snapshot
from poolwatch.localcluster import PgBouncerServer
from poolwatch.metrics import exposition
from poolwatch.sources.pgbouncer import COLLECTORS, PgBouncerSource
from tests.daemon import make_config, pgbouncer_target, running_daemon

MakePgBouncer = Callable[..., PgBouncerServer]

pytestmark = pytest.mark.slow


async def _with_pools(pgb: PgBouncerServer, names: list[str]) -> None:
    """Log one client in to each database (that creates its pool), then out again: PgBouncer keeps
    the pool. Paced, so the server connections PgBouncer opens to learn each pool's parameters
    (closed again after server_idle_timeout) never crowd the shared PostgreSQL."""
    for first in range(0, len(names), 40):
        conns = [
            await wire.connect("app", name, host=pgb.host, port=pgb.port)
            for name in names[first : first + 40]
        ]
        for conn in conns:
            conn.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            lists = {r["list"]: r["items"] for r in await asyncio.to_thread(pgb.show, "LISTS")}
            if int(lists.get("used_servers", 0)) < 10:
                break
            await asyncio.sleep(0.3)


def _pgbouncer_with(make_pgbouncer: MakePgBouncer, n: int) -> PgBouncerServer:
    databases = {f"p{i:04d}": {"dbname": "app", "pool_size": 1} for i in range(n)}
    return make_pgbouncer(
        databases=databases,
        auth_type="trust",  # bare startup packets (bench.wire); the server side still uses SCRAM
        server_idle_timeout=1,
        max_client_conn=n + 100,
    )


async def _collect(pgb: PgBouncerServer) -> tuple[int, bytes, int]:
    """(SHOW round trips of one collection, the rendered text exposition, pools seen)."""
    source = PgBouncerSource(
        "pgb", pgb.stats_dsn, pgb.stats_password, connect_timeout=5, hold_connection="always"
    )
    try:
        await source.collect(10)  # the first one logs in
        before = source.queries_sent
        result = await source.collect(10)
        sent = source.queries_sent - before
    finally:
        await source.close()
    assert result.up and all(o.ok for o in result.outcomes), result.outcomes
    body = Snapshot(result.families, {}, time.time(), time.monotonic()).render()
    assert result.observation is not None
    return sent, body, len(result.observation.pools)  # type: ignore[attr-defined]


def _check_exposition(body: bytes) -> int:
    text = body.decode()
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in seen, f"duplicate series {key}"
            seen.add(key)
    return len(seen)


async def test_round_trips_do_not_grow_with_pools(make_pgbouncer: MakePgBouncer) -> None:
    small = _pgbouncer_with(make_pgbouncer, 10)
    await _with_pools(small, [f"p{i:04d}" for i in range(10)])
    large = _pgbouncer_with(make_pgbouncer, 150)
    await _with_pools(large, [f"p{i:04d}" for i in range(150)])
    small_sent, small_body, small_pools = await _collect(small)
    large_sent, large_body, large_pools = await _collect(large)
    assert small_pools >= 10 and large_pools >= 150
    assert small_sent == large_sent == len(COLLECTORS)
    assert _check_exposition(large_body) > _check_exposition(small_body) + 140 * 12  # 12 series per pool


async def test_many_pools_exposition_passes_promtool(make_pgbouncer: MakePgBouncer) -> None:
    pgb = _pgbouncer_with(make_pgbouncer, 60)
    await _with_pools(pgb, [f"p{i:04d}" for i in range(60)])
    source = PgBouncerSource(
        "pgb", pgb.stats_dsn, pgb.stats_password, connect_timeout=5, hold_connection="never"
    )
    try:
        result = await source.collect(10)
    finally:
        await source.close()
    assert result.up
    text = exposition(result.families).join()
    assert _check_exposition(text) > 60 * 12
    om = exposition(result.families, openmetrics=True).join().decode()
    assert om.endswith("# EOF\n")
    assert {f.name for f in parse_openmetrics(om)} >= {
        "pgbouncer_pools_client_active_connections",
        "pgbouncer_up",
    }  # type: ignore[no-untyped-call]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    done = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        timeout=60,
        check=False,
    )
    # promtool exits 3 for lint warnings only (e.g. a counter without _total); 1 is a parse error
    assert done.returncode in (0, 3), done.stdout.decode() + done.stderr.decode()
    assert b"error" not in done.stderr.lower(), done.stderr.decode()


def _collections(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    return sum(
        value
        for (name, labels), value in samples.items()
        if name == "poolwatch_collections_total" and ("kind", "pgbouncer") in labels
    )


async def test_concurrent_scrapes_share_one_collection(make_pgbouncer: MakePgBouncer) -> None:
    pgb = make_pgbouncer()
    config = make_config(
        pgbouncers=[pgbouncer_target(pgb, probe={"databases": []}, hold_connection="always")],
        collection={"interval": 3600, "max_age": 0},
    )
    async with running_daemon(config) as daemon:
        before = _collections(await daemon.metrics())
        bodies = await asyncio.gather(*(daemon.get("/metrics") for _ in range(8)))
        assert all(status == 200 for status, _ in bodies)
        after = _collections(await daemon.metrics())
        # the read above is one collection, 8 concurrent scrapes share (nearly always) one more
        assert after - before <= 4, (before, after)


async def test_fresh_collection_is_served_as_the_same_bytes(make_pgbouncer: MakePgBouncer) -> None:
    pgb = make_pgbouncer()
    config = make_config(
        pgbouncers=[pgbouncer_target(pgb, probe={"databases": []})],
        collection={"interval": 3600, "max_age": 3600},
    )
    async with running_daemon(config) as daemon:
        first = await daemon.get("/metrics")
        again = await asyncio.gather(*(daemon.get("/metrics") for _ in range(4)))
    assert first[0] == 200 and all(body == first[1] for _, body in again)


async def test_memory_floor_reads_chunks_as_whole_results(make_pgbouncer: MakePgBouncer) -> None:
    """``bench.memory_floor`` (the planning experiment) runs against a real PgBouncer: rows read
    seven at a time in libpq's chunked-rows mode make the same series as whole results."""
    from bench.memory_floor import PASSWORD_ENV

    pgb = _pgbouncer_with(make_pgbouncer, 30)
    await _with_pools(pgb, [f"p{i:04d}" for i in range(30)])
    env = {**os.environ, PASSWORD_ENV: pgb.stats_password}
    series = []
    for chunk_rows in ("7", "0"):
        argv = [sys.executable, "-m", "bench.memory_floor", "--measure", pgb.host, str(pgb.port)]
        argv += [pgb.stats_user, "--collections", "2", "--chunk-rows", chunk_rows]
        done = await asyncio.to_thread(
            subprocess.run, argv, env=env, capture_output=True, check=True, timeout=120
        )
        rows = [json.loads(line) for line in done.stdout.splitlines()]
        assert [r.get("collection") for r in rows] == [None, 1, 2]
        assert rows[1]["series"] == rows[2]["series"]
        assert rows[2]["VmHWM"] >= rows[2]["VmRSS"] > 0
        series.append(rows[1]["series"])
    # 31 pools (30 and the console's own): SHOW POOLS alone has several families of 31 series
    assert series[0] == series[1] > 31 * 5


async def test_busy_fleet_moves_the_counters_of_the_pools_it_says(tmp_path: Path) -> None:
    """The bench's busy fleet (``--busy``): warming runs one query in every quiet pool, each churn
    the next pools in turn, wrapping around; the pools ``_make_busy`` holds blocked are left alone."""
    from bench.scenario import Scenario, pool_names

    scenario = Scenario(tmp_path / "bench", max_connections=60)
    try:
        await asyncio.to_thread(scenario.start_postgres)
        await scenario.start_pgbouncer(12, busy_pools=2)
        pgb = scenario.pgbouncer
        assert pgb is not None

        async def queries() -> dict[str, int]:
            rows = await asyncio.to_thread(pgb.show, "STATS")
            return {r["database"]: int(r["total_query_count"]) for r in rows if r["database"][:1] == "p"}

        before = await queries()
        await scenario.warm_pools()
        warmed = await queries()
        for _ in range(4):  # 16 queries over the 10 quiet pools: once round, then 6 more
            await scenario.churn(4)
        after = await queries()
    finally:
        await scenario.close()
    held, quiet = pool_names(0, 2), pool_names(2, 12)
    assert {name: warmed[name] - before[name] for name in quiet} == dict.fromkeys(quiet, 1)
    assert {name: after[name] - warmed[name] for name in quiet} == {
        **dict.fromkeys(quiet[:6], 2),
        **dict.fromkeys(quiet[6:], 1),
    }
    assert [after[name] - before[name] for name in held] == [0, 0]
