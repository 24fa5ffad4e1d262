"""Bounded soak: the real daemon against a real PostgreSQL + PgBouncer, under load and recurring faults.

    .venv/bin/python -m bench.soak --duration 180          # ~3 minutes; not part of CI

What runs, all on loopback, all stopped at the end (also on Ctrl-C or an error):

* a throwaway PostgreSQL and PgBouncer (``poolwatch.localcluster``), PgBouncer retrying failed
  server logins after 1 s;
* ``poolwatch run`` as a subprocess (passwords in its environment), collecting every
  ``--interval`` seconds, probing every second;
* client load: transactions through PgBouncer and a trickle of queries directly to PostgreSQL;
* ``--scrapers`` concurrent scrapers on /metrics, and /readyz and /checklist now and then;
* a fault every ``--fault-every`` seconds, in turn: PgBouncer killed and restarted on its port,
  ``PAUSE``/``RESUME``, ``RELOAD``, PgBouncer hung (SIGSTOP) for 3 s, PostgreSQL restarted,
  poolwatch's PostgreSQL sessions terminated, PgBouncer ``SHUTDOWN`` and restart.

Every ``--sample-every`` seconds it records the daemon's RSS, open descriptors and threads, the
admin-console connections it holds (``SHOW CLIENTS`` as the admin user, application_name
'poolwatch'), its PostgreSQL sessions (``pg_stat_activity``), its collection and error counters and
the scrapes' outcome and latency. The samples, a summary and the verdict go to
``bench/results/soak-<time>.json`` and ``.md`` (and stdout). Exit code 1 if a bound was broken:
more than one console connection, more PostgreSQL sessions than ``pool_max_size``, descriptors or
RSS growing after the warm-up, or failed scrapes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from poolwatch.localcluster import DEFAULT_PGBOUNCER, Load, PgBouncerServer, PostgresServer

REPO = Path(__file__).resolve().parents[1]
POOL_MAX = 2
WARMUP_SECONDS = 30.0
FD_GROWTH_MAX = 5
RSS_GROWTH_MAX_MB = 20.0


@dataclass
class Sample:
    t: float
    rss_mb: float
    fds: int
    threads: int
    console_connections: int | None  # None: PgBouncer was down at that moment
    postgres_sessions: int | None
    collections: float
    errors: float
    scrapes: int
    scrape_failures: int
    scrape_p99_ms: float | None
    pgbouncer_up: float | None
    pg_up: float | None


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    faults: list[tuple[float, str]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # since the last sample
    scrapes: int = 0
    scrape_failures: int = 0
    failure_examples: list[str] = field(default_factory=list)


def _proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _console_connections(pgb: PgBouncerServer) -> int | None:
    try:
        rows = pgb.show("CLIENTS", admin=True)
    except psycopg.Error:
        return None
    return sum(
        1 for r in rows if r.get("application_name") == "poolwatch" and r.get("database") == "pgbouncer"
    )


def _postgres_sessions(pg: PostgresServer) -> int | None:
    try:
        rows = pg.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'poolwatch'")
    except psycopg.Error:
        return None
    return int(rows[0][0])


def _metric_sum(text: str, name: str, **labels: str) -> float | None:
    total, found = 0.0, False
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total, found = total + s.value, True
    return total if found else None


# -- faults (blocking; run in a thread) -------------------------------------------------------------
def _faults(pg: PostgresServer, pgb: PgBouncerServer) -> list[tuple[str, Callable[[], None]]]:
    def kill_restart() -> None:
        pgb.kill()
        time.sleep(1.0)
        pgb.start()

    def pause_resume() -> None:
        pgb.admin_command("PAUSE app")
        time.sleep(2.0)
        pgb.admin_command("RESUME app")

    def reload() -> None:
        pgb.admin_command("RELOAD")

    def hang() -> None:
        pgb.send_signal(signal.SIGSTOP)
        try:
            time.sleep(3.0)
        finally:
            pgb.send_signal(signal.SIGCONT)

    def restart_postgres() -> None:
        pg.restart("fast")

    def terminate_sessions() -> None:
        pg.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'poolwatch'"
        )

    def shutdown_restart() -> None:
        with contextlib.suppress(psycopg.Error):
            pgb.admin_command("SHUTDOWN")
        pgb.wait_exit(5.0)
        time.sleep(0.5)
        pgb.start()

    return [
        ("pgbouncer kill + restart", kill_restart),
        ("pgbouncer PAUSE app / RESUME app", pause_resume),
        ("pgbouncer RELOAD", reload),
        ("pgbouncer hung 3 s (SIGSTOP)", hang),
        ("postgres restart", restart_postgres),
        ("poolwatch sessions terminated", terminate_sessions),
        ("pgbouncer SHUTDOWN + restart", shutdown_restart),
    ]


# -- the run -------------------------------------------------------------------------------------------
async def _scraper(
    session: aiohttp.ClientSession, url: str, every: float, run: Run, stop: asyncio.Event
) -> None:
    paths = ["/metrics"] * 18 + ["/readyz", "/checklist?format=json"]
    i = 0
    while not stop.is_set():
        path = paths[i % len(paths)]
        i += 1
        started = time.monotonic()
        try:
            async with session.get(url + path) as response:
                await response.read()
                ok = response.status == 200 or (path == "/readyz" and response.status == 503)
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok = False
            if len(run.failure_examples) < 5:
                run.failure_examples.append(f"{path}: {exc!r}")
        run.scrapes += 1
        if ok:
            run.latencies.append(time.monotonic() - started)
        else:
            run.scrape_failures += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


async def _fault_loop(
    pg: PostgresServer, pgb: PgBouncerServer, every: float, run: Run, started: float, stop: asyncio.Event
) -> None:
    faults = _faults(pg, pgb)
    i = 0
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
        if stop.is_set():
            return
        name, fault = faults[i % len(faults)]
        i += 1
        run.faults.append((round(time.monotonic() - started, 1), name))
        print(f"[{time.monotonic() - started:6.1f}s] fault: {name}", flush=True)
        await asyncio.to_thread(fault)


async def _sample(
    pid: int,
    url: str,
    session: aiohttp.ClientSession,
    pg: PostgresServer,
    pgb: PgBouncerServer,
    run: Run,
    t: float,
) -> Sample:
    status = _proc_status(pid)
    async with session.get(url + "/metrics") as response:
        text = await response.text()
    latencies, run.latencies = sorted(run.latencies), []
    p99 = latencies[int(0.99 * (len(latencies) - 1))] * 1000 if latencies else None
    return Sample(
        t=round(t, 1),
        rss_mb=round(int(status["VmRSS"].split()[0]) / 1024, 2),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(status["Threads"]),
        console_connections=await asyncio.to_thread(_console_connections, pgb),
        postgres_sessions=await asyncio.to_thread(_postgres_sessions, pg),
        collections=_metric_sum(text, "poolwatch_collections_total") or 0.0,
        errors=_metric_sum(text, "poolwatch_errors_total") or 0.0,
        scrapes=run.scrapes,
        scrape_failures=run.scrape_failures,
        scrape_p99_ms=None if p99 is None else round(p99, 2),
        pgbouncer_up=_metric_sum(text, "pgbouncer_up"),
        pg_up=_metric_sum(text, "pg_up"),
    )


def _config(base: Path, pg: PostgresServer, pgb: PgBouncerServer, interval: float) -> Path:
    path = base / "poolwatch.yaml"
    path.write_text(
        f"""listen: 127.0.0.1:0
log: {{level: info, format: json}}
collection: {{timeout: 2, interval: {interval}}}
probes: {{interval: 1, timeout: 2}}
pgbouncers:
  - name: soak-pgbouncer
    host: {pgb.host}
    port: {pgb.port}
    user: {pgb.stats_user}
    password_env: SOAK_PGBOUNCER_PASSWORD
postgres:
  - name: soak-postgres
    host: {pg.host}
    port: {pg.port}
    user: {pg.monitor_user}
    dbname: postgres
    password_env: SOAK_POSTGRES_PASSWORD
    pool_max_size: {POOL_MAX}
"""
    )
    return path


def _start_daemon(config: Path, log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "poolwatch.cli", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
        )


def _wait_listening(log: Path, proc: subprocess.Popen[bytes], within: float = 30.0) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"poolwatch exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        for line in log.read_text().splitlines():
            if '"listening"' in line:
                return str(json.loads(line)["url"])
        time.sleep(0.1)
    raise RuntimeError(f"poolwatch did not listen within {within}s:\n{log.read_text()[-2000:]}")


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="pw-soak-"))
    pg = PostgresServer(base / "pg")
    pgb = PgBouncerServer(base / "pgb", pg, args.pgbouncer, server_login_retry=1, default_pool_size=4)
    proc: subprocess.Popen[bytes] | None = None
    run = Run()
    stop = asyncio.Event()
    try:
        await asyncio.to_thread(pg.start)
        await asyncio.to_thread(pgb.start)
        config = _config(base, pg, pgb, args.interval)
        log = base / "poolwatch.log"
        env = {
            **os.environ,
            "SOAK_PGBOUNCER_PASSWORD": pgb.stats_password,
            "SOAK_POSTGRES_PASSWORD": pg.monitor_password,
        }
        proc = _start_daemon(config, log, env, base)
        url = await asyncio.to_thread(_wait_listening, log, proc)
        print(f"poolwatch pid {proc.pid} at {url}; soak for {args.duration:g}s", flush=True)
        started = time.monotonic()
        async with (
            Load(connect_timeout=3) as load,
            aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=10),
                connector=aiohttp.TCPConnector(limit=args.scrapers + 2),
            ) as session,
        ):
            load.churn(
                pgb.app_dsn(), pgb.app_password, workers=4, tx_seconds=(0.02, 0.3), pause_seconds=(0.0, 0.2)
            )
            load.trickle(pg.app_dsn(), pg.app_password, interval=0.2)
            tasks = [
                asyncio.create_task(_scraper(session, url, args.scrape_every, run, stop))
                for _ in range(args.scrapers)
            ]
            tasks.append(asyncio.create_task(_fault_loop(pg, pgb, args.fault_every, run, started, stop)))
            print(
                f"{'t':>6} {'rss MB':>7} {'fds':>4} {'thr':>4} {'console':>7} {'pg sess':>7} "
                f"{'colls':>6} {'errors':>6} {'scrapes':>7} {'fail':>4} {'p99 ms':>7}",
                flush=True,
            )
            while (elapsed := time.monotonic() - started) < args.duration:
                sample = await _sample(proc.pid, url, session, pg, pgb, run, elapsed)
                run.samples.append(sample)
                print(
                    f"{sample.t:6.1f} {sample.rss_mb:7.2f} {sample.fds:4d} {sample.threads:4d} "
                    f"{_show(sample.console_connections):>7} {_show(sample.postgres_sessions):>7} "
                    f"{sample.collections:6.0f} {sample.errors:6.0f} {sample.scrapes:7d} "
                    f"{sample.scrape_failures:4d} {_show(sample.scrape_p99_ms):>7}",
                    flush=True,
                )
                await asyncio.sleep(max(0.0, args.sample_every - (time.monotonic() - started - elapsed)))
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            # after the faults: everything back?
            await asyncio.sleep(args.interval * 2 + 2)
            run.samples.append(
                await _sample(proc.pid, url, session, pg, pgb, run, time.monotonic() - started)
            )
        proc.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(proc.wait, 10)
        return _summary(args, run, exit_code, log)
    finally:
        stop.set()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(pgb.stop)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(pg.stop)
        shutil.rmtree(base, ignore_errors=True)


def _show(value: object) -> str:
    return "-" if value is None else str(value)


def _summary(args: argparse.Namespace, run: Run, exit_code: int, log: Path) -> dict[str, Any]:
    samples = run.samples
    warm = [s for s in samples if s.t >= min(WARMUP_SECONDS, args.duration / 3)] or samples
    first, last = warm[0], samples[-1]
    console = [s.console_connections for s in samples if s.console_connections is not None]
    sessions = [s.postgres_sessions for s in samples if s.postgres_sessions is not None]
    log_text = log.read_text(errors="replace")
    summary: dict[str, Any] = {
        "duration_seconds": args.duration,
        "collection_interval_seconds": args.interval,
        "scrapers": args.scrapers,
        "faults_injected": len(run.faults),
        "scrapes": run.scrapes,
        "scrape_failures": run.scrape_failures,
        "scrape_failure_examples": run.failure_examples,
        "scrape_p99_ms_max": max((s.scrape_p99_ms or 0.0) for s in samples),
        "rss_mb": {
            "after_warmup": first.rss_mb,
            "end": last.rss_mb,
            "max": max(s.rss_mb for s in samples),
            "growth_after_warmup": round(last.rss_mb - first.rss_mb, 2),
        },
        "fds": {
            "after_warmup": first.fds,
            "end": last.fds,
            "min": min(s.fds for s in samples),
            "max": max(s.fds for s in samples),
        },
        "threads_max": max(s.threads for s in samples),
        "console_connections_max": max(console) if console else None,
        "postgres_sessions_max": max(sessions) if sessions else None,
        "collections": last.collections,
        "errors_total": last.errors,
        "recovered_at_end": last.pgbouncer_up == 1 and last.pg_up == 1,
        "sigterm_exit_code": exit_code,
        "tracebacks_in_log": log_text.count("Traceback"),
    }
    problems = []
    if summary["console_connections_max"] is not None and summary["console_connections_max"] > 1:
        problems.append("more than one admin console connection")
    if summary["postgres_sessions_max"] is not None and summary["postgres_sessions_max"] > POOL_MAX:
        problems.append(f"more than {POOL_MAX} PostgreSQL sessions")
    if last.fds - first.fds > FD_GROWTH_MAX:
        problems.append(f"descriptors grew by {last.fds - first.fds}")
    if summary["rss_mb"]["growth_after_warmup"] > RSS_GROWTH_MAX_MB:
        problems.append(f"RSS grew by {summary['rss_mb']['growth_after_warmup']} MB")
    if run.scrape_failures:
        problems.append(f"{run.scrape_failures} failed scrapes")
    if not summary["recovered_at_end"]:
        problems.append("targets not up again after the last fault")
    if exit_code != 0 or summary["tracebacks_in_log"]:
        problems.append("unclean exit or a traceback in the log")
    summary["problems"] = problems
    summary["verdict"] = "bounded" if not problems else "FAILED: " + "; ".join(problems)
    return {"summary": summary, "faults": run.faults, "samples": [asdict(s) for s in samples]}


def _markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        f"# poolwatch soak, {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
        f"{s['duration_seconds']:g} s, collection every {s['collection_interval_seconds']:g} s, "
        f"{s['scrapers']} scrapers, {s['faults_injected']} faults: **{s['verdict']}**",
        "",
        "| t s | RSS MB | fds | threads | console conns | pg sessions | collections | errors | scrapes "
        "| failed | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in result["samples"]:
        lines.append(
            f"| {x['t']} | {x['rss_mb']} | {x['fds']} | {x['threads']} | {_show(x['console_connections'])} "
            f"| {_show(x['postgres_sessions'])} | {x['collections']:.0f} | {x['errors']:.0f} "
            f"| {x['scrapes']} | {x['scrape_failures']} | {_show(x['scrape_p99_ms'])} |"
        )
    lines += [
        "",
        "Faults: " + "; ".join(f"{t}s {name}" for t, name in result["faults"]),
        "",
        "```json",
        json.dumps(s, indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of soak (default 180)")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--fault-every", type=float, default=10.0, help="seconds between faults")
    parser.add_argument("--interval", type=float, default=1.0, help="poolwatch collection interval")
    parser.add_argument("--scrapers", type=int, default=10, help="concurrent /metrics scrapers")
    parser.add_argument(
        "--scrape-every", type=float, default=0.2, help="seconds between one scraper's scrapes"
    )
    parser.add_argument("--pgbouncer", default=DEFAULT_PGBOUNCER, help="PgBouncer binary")
    parser.add_argument("--output-dir", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    result = asyncio.run(soak(args))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stem = args.output_dir / time.strftime("soak-%Y%m%d-%H%M%S")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(_markdown(result))
    print(json.dumps(result["summary"], indent=2))
    print(f"written: {stem}.json, {stem}.md")
    return 0 if not result["summary"]["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
