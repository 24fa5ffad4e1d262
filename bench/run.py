"""The poolwatch benchmark: one command, throwaway servers, poolwatch and its peers side by side.

    bench/run.sh                                    # = the line below
    .venv/bin/python -m bench.run --pools 100,2000,10000 --backends 100,1000
    .venv/bin/python -m bench.run --pools 2000 --backends 1000 --huge 100000 --markdown docs/benchmarks.md

Runs as root (the servers run as the ``postgres`` OS user, as in the test suite). It builds, on
loopback only:

* PostgreSQL, and per ``--pools`` N a PgBouncer with N generated ``[databases]`` entries, one
  client logged in to each so the pool exists (see ``bench.scenario``);
* per ``--backends`` M, M client backends on PostgreSQL in mixed states.

and measures, each exporter as its own process scraped over HTTP the way a scraper sees it:

* PgBouncer: poolwatch (``collection.max_age: 0``: every scrape triggers a collection, nothing is
  cached) and ``prometheus-pgbouncer-exporter`` (PyPI, its own venv): scrape wall time (median,
  p99), CPU per scrape (= per collection), peak RSS, series exposed, and, through a counting
  proxy, round trips (simple-query messages) and logins per collection;
* poolwatch alone: scrapes served from a fresh collection (``max_age`` long), and N concurrent
  scrapes (how many collections they cost);
* both again on a busy fleet (``--busy``, up to 10,000 pools): every pool serves a query, then a
  share of them one more before each scrape (``Scenario.warm_pools`` / ``churn``);
* PostgreSQL: poolwatch (a postgres target only) and Debian's ``prometheus-postgres-exporter``.

One table is printed and written as JSON (``--out``); ``--markdown FILE`` also rewrites the table
section of that file (docs/benchmarks.md). Nothing here asserts a timing: see
tests/test_bench_shape.py for the CI guard of the shape.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import json
import os
import platform
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from bench import peers
from bench.measure import PROMETHEUS_HEADERS, SCRAPE_HEADERS, Exporter, Run, free_port, scrape
from bench.scenario import Scenario, raise_fd_limit
from bench.wire import CountingProxy

REPO = Path(__file__).resolve().parents[1]
POOLWATCH = Path(sys.executable).parent / "poolwatch"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def scrapes_for(n: int, base: int) -> int:
    """Fewer scrapes where each one is slow."""
    if n >= 50_000:
        return max(3, base // 8)
    if n >= 10_000:
        return max(5, base // 2)
    return base


# ------------------------------------------------------------------------------------------------
# Exporter configurations
# ------------------------------------------------------------------------------------------------
class Workdir:
    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="pwbench-run-", dir="/tmp"))
        self.secret_env: dict[str, str] = {}

    def file(self, name: str, text: str) -> Path:
        path = self.path / name
        path.write_text(text)
        return path

    def secret(self, value: str) -> str:
        name = f"PWBENCH_PW_{secrets.token_hex(4).upper()}"
        self.secret_env[name] = value
        return name


def poolwatch_exporter(
    work: Workdir,
    name: str,
    *,
    pgbouncer: tuple[str, int, str, str] | None = None,
    postgres: tuple[str, int, str, str] | None = None,
    max_age: float = 0.0,
    pgbouncer_extra: dict[str, Any] | None = None,
    doctor: bool = True,
    collection: dict[str, Any] | None = None,
) -> Exporter:
    """poolwatch as deployed, with background work that is not the scrape's turned off: no probes,
    the background collection loop once an hour. The pool doctor stays on (the default)."""
    port = free_port()
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "log": {"level": "warning", "format": "json"},
        "collection": {"timeout": 60, "interval": 3600, "max_age": max_age, **(collection or {})},
        "probes": {"interval": 3600},
    }
    if not doctor:
        config["doctor"] = {"enabled": False}
    if pgbouncer is not None:
        host, pgb_port, user, password = pgbouncer
        config["pgbouncers"] = [
            {
                "name": "pgb",
                "host": host,
                "port": pgb_port,
                "user": user,
                "password_env": work.secret(password),
                "probe": {"databases": []},
                "connect_timeout": 30,
                **(pgbouncer_extra or {}),
            }
        ]
    if postgres is not None:
        host, pg_port, user, password = postgres
        config["postgres"] = [
            {
                "name": "pg",
                "host": host,
                "port": pg_port,
                "user": user,
                "dbname": "postgres",
                "password_env": work.secret(password),
                "probe": False,
            }
        ]
    path = work.file(f"{name}.yaml", yaml.safe_dump(config))
    env = {**os.environ, **work.secret_env}
    return Exporter(
        name, [str(POOLWATCH), "run", "-c", str(path)], port, env=env, log=work.path / f"{name}.log"
    )


def pgbouncer_peer(work: Workdir, name: str, host: str, port: int, user: str, password: str) -> Exporter:
    listen = free_port()
    config = {
        "exporter_host": "127.0.0.1",
        "exporter_port": listen,
        "pgbouncers": [
            {
                "dsn": f"postgresql://{user}:{password}@{host}:{port}/pgbouncer?sslmode=disable",
                "connect_timeout": 30,
            }
        ],
    }
    path = work.file(f"{name}.yaml", yaml.safe_dump(config))
    argv = [str(peers.pgbouncer_exporter()), "--config", str(path), "--log-level", "WARNING"]
    return Exporter(name, argv, listen, log=work.path / f"{name}.log")


def postgres_peer(work: Workdir, name: str, host: str, port: int, user: str, password: str) -> Exporter:
    listen = free_port()
    env = {
        **os.environ,
        "DATA_SOURCE_NAME": f"postgresql://{user}:{password}@{host}:{port}/postgres?sslmode=disable",
    }
    argv = [str(peers.postgres_exporter()), f"--web.listen-address=127.0.0.1:{listen}", "--log.level=warn"]
    return Exporter(name, argv, listen, env=env, log=work.path / f"{name}.log")


# ------------------------------------------------------------------------------------------------
# Phases
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """The bench process holds thousands of client sockets: keep its own GC out of the timings."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


async def measure_variant(
    exporter: Exporter,
    label: str,
    scrapes: int,
    headers: Mapping[str, str] = SCRAPE_HEADERS,
    before_each: Callable[[], object] | None = None,
) -> Run:
    """``scrapes`` scrapes of a freshly started ``exporter``, labelled ``label``."""
    await in_thread(exporter.start)
    try:
        with quiet_gc():
            run: Run = await in_thread(
                functools.partial(exporter.measure, scrapes, headers=headers, before_each=before_each)
            )
    finally:
        await in_thread(exporter.stop)
    run.exporter = label
    return run


async def round_trips(
    exporter_factory: Callable[[str, int], Exporter], proxy: CountingProxy, scrapes: int = 3
) -> dict[str, float]:
    """Round trips and logins per collection, counted on the wire by ``proxy``."""
    exporter = exporter_factory("127.0.0.1", proxy.listen_port)
    await in_thread(exporter.start)
    try:
        await in_thread(scrape, exporter.port)  # warm: connect, learn the version
        queries, logins = proxy.queries, proxy.connections
        for _ in range(scrapes):
            await in_thread(scrape, exporter.port)
        result = {
            "round_trips_per_collection": (proxy.queries - queries) / scrapes,
            "logins_per_collection": (proxy.connections - logins) / scrapes,
        }
    finally:
        await in_thread(exporter.stop)
    return result


async def concurrent_scrapes(
    exporter: Exporter, proxy: CountingProxy, per_collection: float, n: int = 8
) -> int:
    """``n`` scrapes at once against a ``max_age: 0`` poolwatch: how many collections ran."""
    before = proxy.queries
    barrier = threading.Barrier(n, timeout=60)

    def one() -> None:
        barrier.wait()
        scrape(exporter.port)

    # own threads, not the default executor (it may have fewer workers than the barrier needs)
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        await asyncio.gather(*(asyncio.wrap_future(pool.submit(one)) for _ in range(n)))
    return round((proxy.queries - before) / per_collection) if per_collection else -1


async def pgbouncer_phase(
    scenario: Scenario, work: Workdir, n: int, args: argparse.Namespace
) -> dict[str, Any]:
    log(f"== PgBouncer with {n} pools: building")
    started = time.monotonic()
    await scenario.start_pgbouncer(n, progress=log)
    pgb = scenario.pgbouncer
    assert pgb is not None
    pools = len(await in_thread(pgb.show, "POOLS"))
    log(f"   {pools} pools in SHOW POOLS after {time.monotonic() - started:.0f}s")
    target = (pgb.host, pgb.port, pgb.stats_user, pgb.stats_password)
    count = scrapes_for(n, args.scrapes)
    result: dict[str, Any] = {"pools": n, "show_pools_rows": pools, "runs": []}
    everything = {"max_pools": 0}  # the cap off: every pool exported, as the peer does

    def poolwatch_factory(host: str, port: int) -> Exporter:
        return poolwatch_exporter(
            work, f"poolwatch-pgb-{n}", pgbouncer=(host, port, *target[2:]), pgbouncer_extra=everything
        )

    def peer_factory(host: str, port: int) -> Exporter:
        return pgbouncer_peer(work, f"pgbouncer-exporter-{n}", host, port, *target[2:])

    factories: list[tuple[str, Callable[[str, int], Exporter], int]] = [
        ("poolwatch", poolwatch_factory, count)
    ]
    if not args.skip_peers:
        factories.append(
            ("prometheus-pgbouncer-exporter", peer_factory, max(3, count // (4 if n >= 50_000 else 1)))
        )
    proxy = CountingProxy(pgb.host, pgb.port)
    await proxy.start()
    try:
        for label, factory, k in factories:
            exporter = factory(pgb.host, pgb.port)
            await in_thread(exporter.start)
            try:
                log(f"   {label}: {k} scrapes")
                with quiet_gc():
                    run: Run = await in_thread(exporter.measure, k)
                run.exporter = label
                if label == "poolwatch":
                    # on the wire: concurrent scrapes against this max_age 0 instance are counted below
                    pass
            finally:
                await in_thread(exporter.stop)
            run.extra.update(await round_trips(factory, proxy))
            if label == "poolwatch":
                concurrent = factory("127.0.0.1", proxy.listen_port)
                await in_thread(concurrent.start)
                try:
                    await in_thread(scrape, concurrent.port)
                    run.extra["collections_for_8_concurrent_scrapes"] = await concurrent_scrapes(
                        concurrent, proxy, run.extra["round_trips_per_collection"]
                    )
                finally:
                    await in_thread(concurrent.stop)
            result["runs"].append(run.as_dict())
            log(
                f"   {label}: median {run.median_ms:.1f} ms, p99 {run.p99_ms:.1f} ms, "
                f"cpu {run.cpu_ms:.1f} ms, "
                f"{run.series} series, peak RSS {run.peak_rss_kb / 1024:.0f} MB, {run.extra}"
            )
        # served from a fresh collection: max_age long, the first scrape collects
        for label, headers in (
            ("poolwatch (served from cache)", SCRAPE_HEADERS),
            ("poolwatch (served from cache, gzip as Prometheus asks)", PROMETHEUS_HEADERS),
        ):
            cached = await measure_variant(
                poolwatch_exporter(
                    work, f"poolwatch-cached-{n}", pgbouncer=target, max_age=3600, pgbouncer_extra=everything
                ),
                label,
                args.scrapes * 2,
                headers,
            )
            result["runs"].append(cached.as_dict())
            log(f"   {label}: median {cached.median_ms:.2f} ms, p99 {cached.p99_ms:.2f} ms")
        variants: list[tuple[str, dict[str, Any], Mapping[str, str]]] = [
            # what Prometheus gets: it always asks for gzip
            ("poolwatch (gzip as Prometheus asks)", {}, PROMETHEUS_HEADERS),
            # the body kept compressed family by family at any size (the default above 100,000
            # series), and kept as text at any size: what each costs in memory and time
            (
                "poolwatch (body kept compressed: cached_body_max_series: 1)",
                {"collection": {"cached_body_max_series": 1}},
                SCRAPE_HEADERS,
            ),
            (
                "poolwatch (body kept as text: cached_body_max_series: 0)",
                {"collection": {"cached_body_max_series": 0}},
                SCRAPE_HEADERS,
            ),
            # where the time goes: the pool doctor runs inside every collection
            ("poolwatch (doctor.enabled: false)", {"doctor": False}, SCRAPE_HEADERS),
        ]
        if n > 10_000:  # the cardinality guard's default: the first 10,000 pools by name
            variants.append(
                ("poolwatch (max_pools: 10000, the default)", {"pgbouncer_extra": {}}, SCRAPE_HEADERS)
            )
        for i, (label, options, variant_headers) in enumerate(variants):
            options = {"pgbouncer_extra": everything, **options}
            exporter = poolwatch_exporter(work, f"poolwatch-variant-{i}-{n}", pgbouncer=target, **options)
            run = await measure_variant(exporter, label, count, variant_headers)
            result["runs"].append(run.as_dict())
            log(
                f"   {label}: median {run.median_ms:.1f} ms, cpu {run.cpu_ms:.1f} ms, "
                f"{run.series} series, peak RSS {run.peak_rss_kb / 1024:.0f} MB"
            )
        if args.busy > 0 and n <= BUSY_MAX_POOLS:
            result["runs"] += [run.as_dict() for run in await busy_fleet(scenario, n, args.busy, factories)]
    finally:
        await proxy.stop()
        await scenario.stop_pgbouncer()
    return result


BUSY_MAX_POOLS = 10_000  # warming 100,000 pools one query each would take a quarter of an hour


def busy_label(exporter: str) -> str:
    return f"{exporter} (busy)"


async def busy_fleet(
    scenario: Scenario,
    n: int,
    share: float,
    factories: Sequence[tuple[str, Callable[[str, int], Exporter], int]],
) -> list[Run]:
    """The same exporters on a fleet in use, after the idle runs (warming cannot be undone).

    Every pool serves one query first, so SHOW STATS has non-zero counters in every row and its
    time columns differ from pool to pool; then, before each scrape, the next ``share`` of the
    pools serves one more, so every collection sees counters move in some pools and the
    families made from them change."""
    log(f"   busy fleet: every pool serves a query ({n} pools)")
    log(f"   warmed in {await scenario.warm_pools():.0f}s")
    loop = asyncio.get_running_loop()
    k = max(1, round(n * share))

    def churn() -> None:
        asyncio.run_coroutine_threadsafe(scenario.churn(k), loop).result()
        time.sleep(0.1)  # let the last queries' statistics land

    runs = []
    pgb = scenario.pgbouncer
    assert pgb is not None
    _, poolwatch_factory, poolwatch_scrapes = factories[0]  # poolwatch comes first
    gzip = (
        "poolwatch (busy, gzip as Prometheus asks)",
        poolwatch_factory,
        poolwatch_scrapes,
        PROMETHEUS_HEADERS,
    )
    plan = [(busy_label(label), factory, count, SCRAPE_HEADERS) for label, factory, count in factories]
    plan.insert(1, gzip)
    for label, factory, count, headers in plan:
        run = await measure_variant(factory(pgb.host, pgb.port), label, count, headers, before_each=churn)
        run.extra["pools_queried_before_each_scrape"] = k
        runs.append(run)
        log(
            f"   {run.exporter}: {k} pools queried before each scrape: median {run.median_ms:.1f} ms, "
            f"p99 {run.p99_ms:.1f} ms, cpu {run.cpu_ms:.1f} ms, peak RSS {run.peak_rss_kb / 1024:.0f} MB"
        )
    return runs


async def postgres_phase(
    scenario: Scenario, work: Workdir, m: int, args: argparse.Namespace
) -> dict[str, Any]:
    log(f"== PostgreSQL with {m} client backends")
    states = await scenario.open_backends(m)
    pg = scenario.pg
    target = (pg.host, pg.port, pg.monitor_user, pg.monitor_password)
    result: dict[str, Any] = {"backends": m, "states": states, "runs": []}
    try:
        exporters = [("poolwatch", poolwatch_exporter(work, f"poolwatch-pg-{m}", postgres=target))]
        if not args.skip_peers:
            exporters.append(
                ("prometheus-postgres-exporter", postgres_peer(work, f"postgres-exporter-{m}", *target))
            )
        for label, exporter in exporters:
            await in_thread(exporter.start)
            try:
                with quiet_gc():
                    run = await in_thread(exporter.measure, args.scrapes * 2)
            finally:
                await in_thread(exporter.stop)
            run.exporter = label
            result["runs"].append(run.as_dict())
            log(
                f"   {label}: median {run.median_ms:.1f} ms, p99 {run.p99_ms:.1f} ms, "
                f"cpu {run.cpu_ms:.1f} ms, "
                f"{run.series} series, peak RSS {run.peak_rss_kb / 1024:.0f} MB"
            )
    finally:
        await scenario.close_backends()
    return result


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = next(
        (
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        0,
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }


def _ratio(a: float, b: float) -> str:
    return f"{b / a:.1f}x" if a and b and a == a and b == b else "—"


def _megabytes(run: dict[str, Any]) -> str:
    sent = run.get("wire_bytes") or run.get("body_bytes") or 0  # older reports: no wire_bytes
    return f"{sent / 1e6:.2f} MB" if sent else "—"


def table(report: dict[str, Any]) -> str:
    lines = [
        "PgBouncer (scrape-triggered collection, text format, no compression unless the row says gzip)",
        "",
        "| pools | exporter | series | body sent | scrape median | p99 | CPU / collection | peak RSS "
        "| round trips / coll. "
        "| logins / coll. |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = []
    for phase in report["pgbouncer"]:
        by_name = {r["exporter"]: r for r in phase["runs"]}
        for r in phase["runs"]:
            lines.append(
                f"| {phase['pools']:,} | {r['exporter']} | {r['series']:,} | {_megabytes(r)} | "
                f"{r['median_ms']:.1f} ms | "
                f"{r['p99_ms']:.1f} ms | {r['cpu_ms_per_scrape']:.1f} ms | {r['peak_rss_mb']:.0f} MB | "
                f"{r.get('round_trips_per_collection', '—')} | {r.get('logins_per_collection', '—')} |"
            )
        for ours_name, peer_name, fleet in (
            ("poolwatch", "prometheus-pgbouncer-exporter", ""),
            (busy_label("poolwatch"), busy_label("prometheus-pgbouncer-exporter"), " busy"),
        ):
            ours, peer = by_name.get(ours_name), by_name.get(peer_name)
            if ours and peer:
                ratios.append(
                    f"| {phase['pools']:,}{fleet} | {_ratio(ours['median_ms'], peer['median_ms'])} | "
                    f"{_ratio(ours['cpu_ms_per_scrape'], peer['cpu_ms_per_scrape'])} | "
                    f"{_ratio(ours['peak_rss_mb'], peer['peak_rss_mb'])} | "
                    f"{ours['series'] / max(peer['series'], 1):.2f} |"
                )
    if ratios:
        lines += [
            "",
            "poolwatch vs prometheus-pgbouncer-exporter "
            "(how many times faster / lighter; series: ours ÷ theirs)",
            "",
            "| pools | scrape time | CPU | peak RSS | series |",
            "|---:|---:|---:|---:|---:|",
            *ratios,
        ]
    lines += [
        "",
        "PostgreSQL (whole scrape of one server)",
        "",
        "| client backends | exporter | series | scrape median | p99 | CPU / scrape | peak RSS |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    pg_ratios = []
    for phase in report["postgres"]:
        by_name = {r["exporter"]: r for r in phase["runs"]}
        for r in phase["runs"]:
            lines.append(
                f"| {phase['backends']:,} | {r['exporter']} | {r['series']:,} | {r['median_ms']:.1f} ms | "
                f"{r['p99_ms']:.1f} ms | {r['cpu_ms_per_scrape']:.1f} ms | {r['peak_rss_mb']:.0f} MB |"
            )
        ours, peer = by_name.get("poolwatch"), by_name.get("prometheus-postgres-exporter")
        if ours and peer:
            pg_ratios.append(
                f"| {phase['backends']:,} | {_ratio(ours['median_ms'], peer['median_ms'])} | "
                f"{_ratio(ours['cpu_ms_per_scrape'], peer['cpu_ms_per_scrape'])} | "
                f"{ours['series'] / max(peer['series'], 1):.2f} |"
            )
    if pg_ratios:
        lines += [
            "",
            "poolwatch vs prometheus-postgres-exporter (>1x: poolwatch faster)",
            "",
            "| client backends | scrape time | CPU | series |",
            "|---:|---:|---:|---:|",
            *pg_ratios,
        ]
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- BEGIN BENCH TABLE -->", "<!-- END BENCH TABLE -->"


def write_markdown(path: Path, report: dict[str, Any], text: str) -> None:
    m = report["machine"]
    header = (
        f"Run {report['finished']} with `{report['command']}` on {m['cores']} cores ({m['cpu']}), "
        f"{m['memory_gb']} GB, Linux {m['kernel']}, Python {m['python']}, {report['versions']['pgbouncer']}, "
        f"PostgreSQL {report['versions']['postgresql']}; peers: prometheus-pgbouncer-exporter "
        f"{report['versions']['prometheus-pgbouncer-exporter']}, {report['versions']['postgres_exporter']}. "
        f"Load average at start {m['loadavg_start'][0]:.2f}, at end {report['loadavg_end'][0]:.2f}.\n\n"
    )
    block = f"{BEGIN}\n{header}{text}{END}"
    doc = path.read_text() if path.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN in doc and END in doc:
        doc = doc[: doc.index(BEGIN)] + block + doc[doc.index(END) + len(END) :]
    else:
        doc += "\n" + block + "\n"
    path.write_text(doc)


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    if os.geteuid() != 0:
        log("note: not root; the servers run as the current user")
    nofile = raise_fd_limit()
    needed = max([*args.pools, 0]) + 2000
    if needed > nofile and max(args.pools) <= 10_000:
        raise SystemExit(
            f"ulimit -n is {nofile}; {needed} descriptors are needed for {max(args.pools)} pools"
        )
    if not args.skip_peers:
        peers.pgbouncer_exporter()
        peers.postgres_exporter()
    work = Workdir()
    scenario = Scenario(max_connections=max([1000, *args.backends]) + 300)
    report: dict[str, Any] = {
        "command": " ".join(
            ["bench/run.sh" if os.environ.get("POOLWATCH_BENCH_SH") else "python -m bench.run", *sys.argv[1:]]
        ),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "pgbouncer": [],
        "postgres": [],
    }
    try:
        await in_thread(scenario.start_postgres)
        pg_version = scenario.pg.execute("SHOW server_version")[0][0]
        for n in args.pools + ([args.huge] if args.huge else []):
            report["pgbouncer"].append(await pgbouncer_phase(scenario, work, n, args))
        for m in args.backends:
            report["postgres"].append(await postgres_phase(scenario, work, m, args))
    finally:
        await scenario.close()
        if not args.keep_logs:
            shutil.rmtree(work.path, ignore_errors=True)  # exporter configs hold throwaway passwords
    report["versions"] = {
        "poolwatch": _poolwatch_version(),
        "pgbouncer": _pgbouncer_version(),
        "postgresql": pg_version,
        "prometheus-pgbouncer-exporter": peers.pgbouncer_exporter_version() if not args.skip_peers else "—",
        "postgres_exporter": peers.postgres_exporter_version() if not args.skip_peers else "—",
    }
    report["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    report["loadavg_end"] = os.getloadavg()
    return report


def _pgbouncer_version() -> str:
    import subprocess

    from poolwatch.localcluster import DEFAULT_PGBOUNCER

    out = subprocess.run([DEFAULT_PGBOUNCER, "--version"], capture_output=True, text=True, check=False)
    return (out.stdout.splitlines() or ["PgBouncer ?"])[0]


def _poolwatch_version() -> str:
    from poolwatch import __version__

    return __version__


def share_of_pools(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share between 0 and 1 (0.02 = 2 % of the pools)")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pools", default="100,2000,10000", help="PgBouncer pool counts (comma-separated)")
    parser.add_argument("--backends", default="100,1000", help="PostgreSQL client backend counts")
    parser.add_argument(
        "--huge",
        type=int,
        default=0,
        metavar="N",
        help="one more PgBouncer point (e.g. 100000): clients log out again, pools stay",
    )
    parser.add_argument("--scrapes", type=int, default=40, help="timed scrapes per exporter (fewer at 10k+)")
    parser.add_argument(
        "--busy",
        type=share_of_pools,
        default=0.02,
        metavar="SHARE",
        help="after the idle runs, every pool serves a query and this share of the pools one more "
        "before each scrape (0: idle fleet only; pool counts up to 10,000)",
    )
    parser.add_argument("--skip-peers", action="store_true", help="poolwatch only")
    parser.add_argument("--keep-logs", action="store_true", help="keep the exporters' configs and logs")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "latest.json"), help="JSON report")
    parser.add_argument(
        "--markdown", metavar="FILE", help="rewrite the table section of FILE (docs/benchmarks.md)"
    )
    args = parser.parse_args(argv)
    args.pools = [int(x) for x in args.pools.split(",") if x.strip()]
    args.backends = [int(x) for x in args.backends.split(",") if x.strip()]
    report = asyncio.run(amain(args))
    text = table(report)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**report, "table": text}, indent=2, default=str))
    log(f"JSON: {out}")
    if args.markdown:
        write_markdown(Path(args.markdown), report, text)
        log(f"table written to {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
