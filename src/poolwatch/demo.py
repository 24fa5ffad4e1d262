"""``poolwatch demo``: throwaway PostgreSQL + PgBouncer with a realistic load, and the daemon on top.

What it starts (all on loopback, all stopped on exit, Ctrl-C or SIGTERM):

* PostgreSQL and PgBouncer from :mod:`poolwatch.localcluster`, PgBouncer with ``default_pool_size``
  2 so waiting clients are visible;
* ``--clients`` workers on pool ``app``/``app`` looping ``BEGIN; SELECT pg_sleep(1-4 s); COMMIT``:
  two are active, the others wait in PgBouncer's queue most of the time;
* one ``idle in transaction`` session directly on PostgreSQL;
* a trickle of ``SELECT 1`` every 0.5 s through the healthy pool ``postgres``/``app``;
* the daemon, through the ``start_daemon`` callback the CLI passes in (see :class:`StartDaemon`),
  with the least-privilege ``poolwatch`` identity on both servers.

Passwords are handed to the daemon and never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import threading
from collections.abc import Awaitable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TextIO

from poolwatch.localcluster import (
    DEFAULT_PGBOUNCER,
    Load,
    LocalCluster,
    ServerError,
    find_pgbouncer_124,
    free_port,
)

__all__ = ["StartDaemon", "main", "resolve_pgbouncer", "run_demo", "sleeping_daemon"]

TRICKLE_INTERVAL = 0.5


class StartDaemon(Protocol):
    """How the demo starts the daemon: an async callable that serves ``/metrics`` on
    ``127.0.0.1:listen_port`` until it is cancelled (the demo cancels it on shutdown).

    ``pgbouncer_dsn`` is the admin console as the ``stats_users`` user; ``postgres_dsn`` is the
    ``pg_monitor`` role over TCP. Both are libpq conninfo strings without the password.
    """

    def __call__(
        self,
        pgbouncer_dsn: str,
        pgbouncer_password: str,
        postgres_dsn: str,
        postgres_password: str,
        listen_port: int,
        /,
    ) -> Awaitable[None]: ...


async def sleeping_daemon(
    pgbouncer_dsn: str,
    pgbouncer_password: str,
    postgres_dsn: str,
    postgres_password: str,
    listen_port: int,
) -> None:
    """Stand-in for the real daemon: serves nothing and sleeps until cancelled."""
    await asyncio.Event().wait()


def resolve_pgbouncer(spec: str) -> str:
    """``"1.18"`` (the system's), ``"1.24"`` (``.cache/pgbouncer-1.24``) or a path to a binary."""
    if spec == "1.18":
        binary = DEFAULT_PGBOUNCER
    elif spec == "1.24":
        roots = [Path.cwd(), Path(__file__).resolve().parents[2]]
        found = next((b for b in (find_pgbouncer_124(root) for root in roots) if b), None)
        if found is None:
            raise ServerError("PgBouncer 1.24 is not installed: run scripts/pgbouncer-debian13.sh")
        binary = found
    else:
        binary = spec
    if not Path(binary).exists():
        raise ServerError(f"PgBouncer binary {binary} not found (apt-get install pgbouncer)")
    return binary


async def run_demo(
    cluster: LocalCluster,
    start_daemon: StartDaemon,
    *,
    listen_port: int,
    clients: int = 5,
    duration: float | None = None,
    out: TextIO | None = None,
) -> None:
    """Run the load and the daemon against a started ``cluster`` until cancelled, until
    ``duration`` seconds have passed, or until the daemon returns. Cleans up its own clients."""
    out = sys.stdout if out is None else out
    pg, pgb = cluster.postgres, cluster.pgbouncer
    pg_version = (await asyncio.to_thread(pg.execute, "SHOW server_version"))[0][0]
    pool_size = pgb.settings.get("default_pool_size")
    async with Load() as load:
        await load.idle_in_transaction(pg.app_dsn(pg.app_database), pg.app_password)
        load.churn(
            pgb.app_dsn(pg.app_database),
            pgb.app_password,
            workers=clients,
            tx_seconds=(1.0, 4.0),
            pause_seconds=(0.0, 1.0),
        )
        load.trickle(pgb.app_dsn("postgres"), pgb.app_password, interval=TRICKLE_INTERVAL)
        print(
            "poolwatch demo (throwaway servers on loopback; everything stops on Ctrl-C)\n"
            f"  PostgreSQL {pg_version} on {pg.host}:{pg.port}  monitor: {pg.monitor_dsn()}\n"
            f"  PgBouncer {pgb.version} on {pgb.host}:{pgb.port}  console: {pgb.stats_dsn}\n"
            f"  load: {clients} clients on pool {pg.app_database}/{pg.app_user} (pool size {pool_size}:"
            " some active, some waiting); 1 idle-in-transaction session on PostgreSQL;"
            f" SELECT 1 every {TRICKLE_INTERVAL} s on pool postgres/{pg.app_user}\n"
            f"  metrics: http://127.0.0.1:{listen_port}/metrics",
            file=out,
            flush=True,
        )
        daemon = asyncio.ensure_future(
            start_daemon(
                pgb.stats_dsn, pgb.stats_password, pg.monitor_dsn(), pg.monitor_password, listen_port
            )
        )
        try:
            done, _ = await asyncio.wait({daemon}, timeout=duration)
            if daemon in done:
                daemon.result()  # raises the daemon's error
                print("the daemon exited; stopping the demo", file=out, flush=True)
        finally:
            if not daemon.done():
                daemon.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await daemon


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poolwatch demo",
        description="Start throwaway PostgreSQL + PgBouncer with a realistic load and run poolwatch on them.",
    )
    parser.add_argument("--listen-port", type=int, default=0, help="port for /metrics (default: a free one)")
    parser.add_argument(
        "--pgbouncer",
        default="1.18",
        metavar="1.18|1.24|PATH",
        help="PgBouncer to run: the system's 1.18 (default), 1.24 from .cache/pgbouncer-1.24, or a binary",
    )
    parser.add_argument("--clients", type=int, default=5, help="looping clients on pool app (default 5)")
    parser.add_argument("--pool-size", type=int, default=2, help="PgBouncer default_pool_size (default 2)")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--keep-dir", action="store_true", help="keep the servers' directory (logs)")
    return parser


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """A second Ctrl-C or SIGTERM must not break the teardown."""
    if not _in_main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


async def _serve(
    cluster: LocalCluster, start_daemon: StartDaemon, args: argparse.Namespace, listen_port: int, out: TextIO
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    if _in_main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    demo = asyncio.ensure_future(
        run_demo(
            cluster,
            start_daemon,
            listen_port=listen_port,
            clients=args.clients,
            duration=args.duration,
            out=out,
        )
    )
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({demo, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set() and not demo.done():
            print("stopping ...", file=out, flush=True)
        demo.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await demo
    finally:
        stopper.cancel()
        for sig in installed:
            # Ignore rather than fall back to the default (death) until main() has cleaned up.
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)


def main(argv: Sequence[str] | None = None, *, start_daemon: StartDaemon | None = None) -> int:
    """Entry point of ``poolwatch demo``; ``argv`` excludes the ``demo`` word. Returns 0 when
    stopped by Ctrl-C/SIGTERM or ``--duration``, 2 when the servers cannot be started."""
    if argv is None:  # called as `poolwatch demo ...` without its own argv: drop the subcommand
        argv = sys.argv[1:]
        if argv[:1] == ["demo"]:
            argv = argv[1:]
    args = _parser().parse_args(argv)
    out = sys.stdout
    daemon = sleeping_daemon if start_daemon is None else start_daemon
    try:
        binary = resolve_pgbouncer(args.pgbouncer)
    except ServerError as exc:
        print(f"poolwatch demo: {exc}", file=sys.stderr)
        return 2
    listen_port = args.listen_port or free_port()
    saved: dict[signal.Signals, Any] = {}
    if _in_main_thread():
        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _interrupt)
    cluster = LocalCluster(
        pgbouncer_binary=binary,
        pgbouncer_settings={"default_pool_size": args.pool_size, "max_client_conn": 500},
        keep_dir=args.keep_dir,
    )
    try:
        print("starting PostgreSQL and PgBouncer ...", file=out, flush=True)
        cluster.start()
        asyncio.run(_serve(cluster, daemon, args, listen_port, out))
        return 0
    except KeyboardInterrupt:
        return 0
    except ServerError as exc:
        print(f"poolwatch demo: {exc}", file=sys.stderr)
        return 2
    finally:
        with _signals_ignored():
            cluster.stop()
            if args.keep_dir:
                print(f"servers stopped; their files are in {cluster.base_dir}", file=out, flush=True)
            else:
                print("servers stopped", file=out, flush=True)
        for sig, handler in saved.items():
            signal.signal(sig, handler)


if __name__ == "__main__":  # python -m poolwatch.demo: the demo with the stand-in daemon
    sys.exit(main())
