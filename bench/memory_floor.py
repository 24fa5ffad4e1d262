"""How low can peak RSS go on this stack? An experiment for planning, not a poolwatch code path.

    .venv/bin/python -m bench.memory_floor --pools 10000              # build, measure, stop
    .venv/bin/python -m bench.memory_floor --pools 10000 --whole-results

Builds the bench's PgBouncer scenario (``bench.scenario``), then runs, in a fresh process that
first imports everything the daemon imports, the leanest collection this stack allows:

* each SHOW's rows arrive in chunks (libpq's chunked-rows mode on the simple query protocol, the
  only one the admin console speaks), so no whole result and no whole list of row tuples exists;
* columns are kept compact while the chunks arrive: integers in ``array('q')``, text with one
  ``str`` object per distinct value;
* each SHOW is written family by family straight into one gzip stream and then dropped: nothing
  survives a collection but the compressed body (no previous collection, no label text, no
  families kept, no pool doctor).

It prints, per collection, the CPU and wall time, the series and compressed size, and the
process's RSS and peak RSS (``VmHWM``). The rendering is plain f-strings: the CPU column is an
upper bound for this shape, not what poolwatch's renderer would take. ``--whole-results`` reads
each SHOW as one result (as poolwatch does today), to separate what chunking saves.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from typing import Any

from bench.measure import memory_kb

#: SHOW → the columns that label its rows (the rest that hold integers become families)
LABELS = {"POOLS": ("database", "user"), "STATS": ("database",), "DATABASES": ("name",)}
CHUNK_ROWS = 2000
PASSWORD_ENV = "POOLWATCH_FLOOR_PASSWORD"


def memory() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in MB."""
    return {key: kb // 1024 for key, kb in memory_kb(os.getpid()).items()}


class Columns:
    """One SHOW's columns, appended chunk by chunk."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.strings: dict[str, str] = {}

    def add(self, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        chunk = list(zip(*rows, strict=True))
        if not self.values:
            self.values = [array.array("q") if all(type(v) is int for v in c) else [] for c in chunk]
        for i, column in enumerate(chunk):
            kept = self.values[i]
            if isinstance(kept, array.array):
                try:
                    kept.extend(column)
                    continue
                except TypeError:  # a NULL or text after all: keep this column as objects
                    kept = self.values[i] = list(kept)
            intern = self.strings.setdefault
            kept.extend(intern(v, v) if type(v) is str else v for v in column)


async def read_show(conn: Any, command: str, chunk_rows: int) -> tuple[list[str], Columns]:
    from psycopg import generators, pq
    from psycopg.adapt import Transformer

    pgconn = conn.pgconn
    pgconn.send_query(command.encode())
    if chunk_rows:
        pgconn.set_chunked_rows_mode(chunk_rows)
    names: list[str] = []
    columns = Columns()
    ok = (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.TUPLES_CHUNK)
    while (result := await conn.wait(generators.fetch(pgconn))) is not None:
        if result.status not in ok:
            raise RuntimeError(f"{command}: {pq.ExecStatus(result.status).name}")
        if not names:
            names = [(result.fname(i) or b"").decode() for i in range(result.nfields)]
        if result.ntuples:
            loader = Transformer(conn)
            loader.set_pgresult(result)
            columns.add(loader.load_rows(0, result.ntuples, tuple))
        result.clear()
    return names, columns


async def collect(conn: Any, chunk_rows: int) -> tuple[int, bytes]:
    from isal import isal_zlib

    from poolwatch.metrics import escape_label_values

    gzip = isal_zlib.compressobj(1, isal_zlib.DEFLATED, 31)
    packed: list[bytes] = []
    series = 0
    for show in ("POOLS", "STATS", "DATABASES", "CLIENTS"):
        names, columns = await read_show(conn, f"SHOW {show}", chunk_rows)
        at = {name: i for i, name in enumerate(names)}
        if show == "CLIENTS":  # aggregated: clients per (database, user, state)
            counts = Counter(
                zip(*(columns.values[at[c]] for c in ("database", "user", "state")), strict=True)
            )
            text = "".join(
                f'pgbouncer_clients{{database="{d}",user="{u}",state="{s}"}} {n}\n'
                for (d, u, s), n in counts.items()
            )
            packed.append(gzip.compress(text.encode()))
            series += len(counts)
            continue
        label_names = LABELS[show]
        label_values = [escape_label_values(columns.values[at[name]]) for name in label_names]
        labels = [
            '{target="pgb",' + ",".join(f'{k}="{v}"' for k, v in zip(label_names, row, strict=True)) + "}"
            for row in zip(*label_values, strict=True)
        ]
        for name, column in zip(names, columns.values, strict=True):
            if name in label_names or not isinstance(column, array.array):
                continue
            metric = f"pgbouncer_{show.lower()}_{name}"
            text = f"# TYPE {metric} gauge\n" + "".join(
                f"{metric}{label} {value}\n" for label, value in zip(labels, column, strict=True)
            )
            packed.append(gzip.compress(text.encode()))
            series += len(column)
    packed.append(gzip.flush())
    return series, b"".join(packed)


async def measure(host: str, port: int, user: str, collections: int, chunk_rows: int) -> None:
    # what the daemon imports, first: the floor includes the libraries
    import psycopg
    from psycopg.types.numeric import IntLoader

    import poolwatch.collect
    import poolwatch.server
    from poolwatch.cli import _tune_gc, _tune_malloc

    del poolwatch.collect, poolwatch.server
    _tune_gc()
    _tune_malloc()
    conn = await psycopg.AsyncConnection.connect(
        host=host,
        port=port,
        user=user,
        password=os.environ[PASSWORD_ENV],
        dbname="pgbouncer",
        autocommit=True,
    )
    conn.adapters.register_loader("numeric", IntLoader)
    print(json.dumps({"before_first_collection": memory()}), flush=True)
    body = b""
    for i in range(1, collections + 1):
        cpu, wall = time.process_time(), time.perf_counter()
        series, body = await collect(conn, chunk_rows)
        row = {
            "collection": i,
            "cpu_ms": round((time.process_time() - cpu) * 1000),
            "wall_ms": round((time.perf_counter() - wall) * 1000),
            "series": series,
            "gzip_mb": round(len(body) / 1e6, 2),
            **memory(),
        }
        print(json.dumps(row), flush=True)
    await conn.close()


async def run(pools: int, collections: int, chunk_rows: int) -> None:
    from bench.scenario import Scenario, raise_fd_limit

    raise_fd_limit()
    scenario = Scenario()
    try:
        await asyncio.to_thread(scenario.start_postgres)
        await scenario.start_pgbouncer(pools, progress=print)
        pgb = scenario.pgbouncer
        assert pgb is not None
        argv = [
            sys.executable,
            "-m",
            "bench.memory_floor",
            "--measure",
            pgb.host,
            str(pgb.port),
            pgb.stats_user,
        ]
        argv += ["--collections", str(collections), "--chunk-rows", str(chunk_rows)]
        env = {**os.environ, PASSWORD_ENV: pgb.stats_password}
        await asyncio.to_thread(subprocess.run, argv, env=env, check=True)
    finally:
        await scenario.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_floor", description=__doc__.split("\n")[0])
    parser.add_argument("--pools", type=int, default=10_000)
    parser.add_argument("--collections", type=int, default=10)
    parser.add_argument("--whole-results", action="store_true", help="one result per SHOW, not chunks")
    parser.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=3, metavar=("HOST", "PORT", "USER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    chunk_rows = 0 if args.whole_results else args.chunk_rows
    if args.measure:
        host, port, user = args.measure
        asyncio.run(measure(host, int(port), user, args.collections, chunk_rows))
    else:
        asyncio.run(run(args.pools, args.collections, chunk_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
