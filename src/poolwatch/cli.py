"""Command line: argument parsing, exit codes, signal handling. No business logic lives here.

Exit codes: 0 success, 1 a check failed (``doctor``), 2 bad input (config, arguments).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from poolwatch import __version__
from poolwatch.config import (
    CommandLine,
    Config,
    ConfigError,
    PgBouncerTarget,
    PostgresTarget,
    config_from_command_line,
    load_config,
)
from poolwatch.webconfig import WebConfig, WebConfigError, load_web_config
from poolwatch.webconfig import apply as apply_web_config

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2
SHUTDOWN_GRACE = 4.0  # seconds; SIGTERM must end the process within 5 s


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _target_options(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        default=env("POOLWATCH_CONFIG"),
        help="YAML config file (env POOLWATCH_CONFIG)",
    )
    parser.add_argument(
        "--pgbouncer",
        metavar="DSN",
        default=env("POOLWATCH_PGBOUNCER_DSN"),
        help="PgBouncer admin console DSN, e.g. 'host=127.0.0.1 port=6432 dbname=pgbouncer user=poolwatch' "
        "(env POOLWATCH_PGBOUNCER_DSN; put the password in PGPASSWORD or a passfile, not here)",
    )
    parser.add_argument(
        "--postgres",
        metavar="DSN",
        default=env("POOLWATCH_POSTGRES_DSN"),
        help="PostgreSQL DSN (env POOLWATCH_POSTGRES_DSN)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="poolwatch", description="PgBouncer and PostgreSQL pool health for Prometheus.")
    parser.add_argument("--version", action="version", version=f"poolwatch {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    run = sub.add_parser("run", help="run the daemon (the default)")
    _target_options(run)
    run.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default=os.environ.get("POOLWATCH_LISTEN"),
        help="where to serve /metrics (env POOLWATCH_LISTEN; default 0.0.0.0:9127)",
    )
    run.add_argument(
        "--web-config",
        "--web.config.file",
        dest="web_config",
        metavar="FILE",
        default=os.environ.get("POOLWATCH_WEB_CONFIG"),
        help="TLS and basic auth, exporter-toolkit format (env POOLWATCH_WEB_CONFIG)",
    )
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=None)
    run.add_argument("--log-format", choices=("auto", "json", "console"), default=None)

    check = sub.add_parser("check-config", help="validate a config file without connecting")
    check.add_argument("file", metavar="FILE")
    check.add_argument("--web-config", metavar="FILE", help="also validate this web config file")

    doctor = sub.add_parser("doctor", help="judge the live system against the production checklist, once")
    _target_options(doctor)
    doctor.add_argument("--format", choices=("text", "json"), default="text")
    doctor.add_argument(
        "--sample-seconds",
        type=float,
        default=3.0,
        metavar="S",
        help="time between the two collections that rates are measured over (default 3)",
    )

    demo = sub.add_parser("demo", help="run poolwatch on a throwaway PostgreSQL + PgBouncer with load")
    demo.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default="127.0.0.1:0",
        help="where to serve /metrics (default: a free loopback port)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (args_list[0].startswith("-") and args_list[0] not in ("-h", "--help", "--version")):
        args_list.insert(0, "run")
    if args_list[:1] == ["demo"]:  # the demo owns its flags (argparse REMAINDER cannot pass --options)
        from poolwatch import demo

        return demo.main(args_list[1:], start_daemon=start_daemon_for_demo)
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        if args.command == "check-config":
            return _check_config(Path(args.file), args.web_config)
        if args.command == "doctor":
            return _doctor(args)
        return _run(args)
    except (ConfigError, WebConfigError) as exc:
        for line in exc.lines:
            print(f"poolwatch: {line}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK


def _check_config(path: Path, web_config: str | None) -> int:
    config = load_config(path)
    web_path = Path(web_config) if web_config else config.web_config
    if web_path is not None:
        load_web_config(web_path)
    print(f"{path}: ok ({len(config.pgbouncers)} PgBouncer and {len(config.postgres)} PostgreSQL targets)")
    return EXIT_OK


def _doctor(args: argparse.Namespace) -> int:
    from poolwatch import logs
    from poolwatch.doctor import report
    from poolwatch.doctor.model import Status

    if not math.isfinite(args.sample_seconds) or args.sample_seconds < 0:  # nan/inf: never or at once
        raise ConfigError(
            [f"--sample-seconds: must be a number of seconds, 0 or more (got {args.sample_seconds:g})"]
        )
    config = resolve_config(args)
    config = config.model_copy(update={"doctor": config.doctor.model_copy(update={"enabled": True})})
    # the report is the output; log lines would only interleave with it
    logs.configure("error", "console" if sys.stderr.isatty() else "json")
    findings = asyncio.run(run_doctor_once(config, args.sample_seconds))
    if args.format == "json":
        print(report.to_json(findings))
    else:
        print(
            report.to_terminal(findings, colour=sys.stdout.isatty() and "NO_COLOR" not in os.environ), end=""
        )
    return EXIT_CHECK_FAILED if any(f.status is Status.FAIL for f in findings) else EXIT_OK


async def run_doctor_once(config: Config, sample_seconds: float) -> list[Any]:
    """Two collections ``sample_seconds`` apart (rates need two points) with probes between them."""
    from poolwatch.collect import Engine

    engine = Engine(config)
    try:
        await engine.current(max_age=0.0)
        await engine.run_probes()
        await asyncio.sleep(sample_seconds)
        await engine.current(max_age=0.0)
        assert engine.doctor is not None
        return list(engine.doctor.findings)
    finally:
        await engine.stop()


def resolve_config(args: argparse.Namespace) -> Config:
    """File (if any), then the DSN/listen options on top; raises ``ConfigError``."""
    base = load_config(Path(args.config)) if args.config else None
    opts = CommandLine(
        pgbouncer_dsn=args.pgbouncer, postgres_dsn=args.postgres, listen=getattr(args, "listen", None)
    )
    if base is not None and not (opts.pgbouncer_dsn or opts.postgres_dsn or opts.listen):
        return base
    config = config_from_command_line(opts, base)
    if not config.pgbouncers and not config.postgres:
        raise ConfigError(
            [
                "nothing to watch: give --config FILE, --pgbouncer DSN or --postgres DSN "
                "(or POOLWATCH_CONFIG, POOLWATCH_PGBOUNCER_DSN, POOLWATCH_POSTGRES_DSN)"
            ]
        )
    return config


def _run(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    updates: dict[str, Any] = {}
    if args.log_level:
        updates["level"] = args.log_level
    if args.log_format:
        updates["format"] = args.log_format
    if updates:
        config = config.model_copy(update={"log": config.log.model_copy(update=updates)})
    if args.web_config:
        config = config.model_copy(update={"web_config": Path(args.web_config)})
    reload: Callable[[], Config] = lambda: resolve_config(args)  # noqa: E731
    return asyncio.run(serve(config, reload=reload))


@dataclass
class Running:
    """A started daemon, for the demo and the tests: where it listens and how to stop it."""

    url: str
    stop: Callable[[], None]


#: Young-generation threshold of the garbage collector while serving (CPython's default: 700).
#: Measured at 10,000 pools: 10,000 still cost ~20 % of a scrape against the collector switched
#: off; 100,000 is within noise of off, and cyclic garbage is still collected.
GC_YOUNG_THRESHOLD = 100_000


def _tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a daemon that allocates in bursts.

    A collection of a 10,000-pool PgBouncer allocates hundreds of thousands of short-lived row
    tuples, lists and strings. At the default thresholds that triggers hundreds of young
    collections and several full ones, each walking every object the modules, pydantic models and
    aiohttp created at import time (measured: 10-15 % of a collection's CPU at 10,000 pools).
    Everything alive now lives as long as the process: freeze it out of every future scan, and
    collect the young generation less often (memory for cycles is reclaimed all the same).
    """
    import gc

    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


#: glibc mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def _tune_malloc() -> None:
    """Keep the memory of one collection for the next instead of handing it back to the kernel.

    Each collection of a large PgBouncer writes tens of megabytes of fresh ``bytes`` (a rendered
    family is one allocation of about a megabyte at 10,000 pools). By default glibc serves those
    with mmap, or trims them off the heap when freed, so the next collection takes a page fault
    for every 4 KiB it writes: measured, writing the families cost four times what the copying
    alone does. With a fixed mmap threshold and a high trim threshold, freed blocks are reused.
    Resident memory stays at the process's high-water mark, which it reaches every collection
    anyway. One arena for all threads: the worker threads that build families would otherwise
    each keep a heap of their own (measured at 10,000 pools: peak RSS 210 -> 169 MB, same speed;
    the GIL already serialises the allocations). A no-op where the C library is not glibc.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter itself runs on
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's own ceiling for the dynamic threshold
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    mallopt(_M_ARENA_MAX, 1)  # before the first worker thread allocates


async def serve(
    config: Config,
    *,
    reload: Callable[[], Config] | None = None,
    on_listening: Callable[[Running], None] | None = None,
    install_signals: bool = True,
) -> int:
    """Run until SIGTERM/SIGINT (or ``Running.stop``); SIGHUP reloads via ``reload``."""
    from aiohttp import web

    from poolwatch import logs
    from poolwatch.collect import Engine
    from poolwatch.server import make_app

    logs.configure(config.log.level, config.log.format)
    log = logs.get_logger("poolwatch")
    _warn_inline_passwords(config, log)

    web_config = load_web_config(config.web_config) if config.web_config else WebConfig()
    if web_config.auth_enabled and not web_config.tls_enabled:
        log.warning("basic auth without TLS: passwords cross the network in clear text")
    engine = Engine(config)
    holder = {"engine": engine}
    app = make_app(lambda: holder["engine"])
    apply_web_config(app, web_config)
    ssl_context = web_config.ssl_context()
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(
        runner, config.listen.host, config.listen.port, ssl_context=ssl_context, reuse_address=True
    )
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            [f"listen: cannot listen on {config.listen.host}:{config.listen.port}: {exc.strerror or exc}"]
        ) from None
    _tune_gc()
    _tune_malloc()
    await engine.start()
    host, port = _bound_address(runner, config)
    url = f"{'https' if ssl_context else 'http'}://{host}:{port}"
    log.info(
        "listening",
        url=url,
        metrics=f"{url}/metrics",
        version=__version__,
        pgbouncers=[t.name for t in config.pgbouncers],
        postgres=[t.name for t in config.postgres],
    )

    loop = asyncio.get_running_loop()
    stop_event = asyncio.Event()
    reloading = asyncio.Lock()

    async def do_reload() -> None:
        if reload is None:
            return
        async with reloading:
            try:
                new_config = reload()
            except ConfigError as exc:
                log.error("reload rejected, keeping the running config", problems=exc.lines)
                return
            if new_config.listen != holder["engine"].config.listen:
                log.warning("listen address changes need a restart; keeping the current one")
            new_engine = Engine(new_config)
            await new_engine.start()
            old, holder["engine"] = holder["engine"], new_engine
            await old.stop()
            log.info(
                "config reloaded",
                pgbouncers=[t.name for t in new_config.pgbouncers],
                postgres=[t.name for t in new_config.postgres],
            )

    if install_signals:
        loop.add_signal_handler(signal.SIGTERM, stop_event.set)
        loop.add_signal_handler(signal.SIGINT, stop_event.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(do_reload()))
    if on_listening is not None:
        on_listening(Running(url=url, stop=lambda: _call_soon(loop, stop_event.set)))
    try:
        await stop_event.wait()
    finally:
        log.info("shutting down")
        try:
            async with asyncio.timeout(SHUTDOWN_GRACE):
                await runner.cleanup()
                await holder["engine"].stop()
        except TimeoutError:
            log.warning("shutdown did not finish in time; exiting anyway")
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
    return EXIT_OK


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    loop.call_soon_threadsafe(callback)


def _bound_address(runner: Any, config: Config) -> tuple[str, int]:
    for address in runner.addresses:
        if isinstance(address, tuple):
            host = config.listen.host
            if host in ("0.0.0.0", "::", ""):
                host = "127.0.0.1"
            return host, int(address[1])
    return config.listen.host, config.listen.port


def _warn_inline_passwords(config: Config, log: Any) -> None:
    targets: list[PgBouncerTarget | PostgresTarget] = [*config.pgbouncers, *config.postgres]
    for target in targets:
        if target.inline_password():
            log.warning(
                "a password is written in the DSN; use password_file or password_env instead "
                "(a DSN on the command line is visible in ps)",
                target=target.name,
            )


async def start_daemon_for_demo(
    pgbouncer_dsn: str,
    pgbouncer_password: str,
    postgres_dsn: str,
    postgres_password: str,
    listen_port: int,
    /,
) -> None:
    """The demo's entry into the daemon: the same ``serve`` as ``poolwatch run``; the demo cancels it.

    Passwords travel through this process's environment, as a sidecar's would, never argv.
    """
    from poolwatch.config import config_from_mapping

    os.environ["POOLWATCH_DEMO_PGBOUNCER_PASSWORD"] = pgbouncer_password
    os.environ["POOLWATCH_DEMO_POSTGRES_PASSWORD"] = postgres_password
    config = config_from_mapping(
        {
            "listen": f"127.0.0.1:{listen_port}",
            "log": {"level": "warning"},
            "pgbouncers": [
                {
                    "name": "demo-pgbouncer",
                    "dsn": pgbouncer_dsn,
                    "password_env": "POOLWATCH_DEMO_PGBOUNCER_PASSWORD",
                }
            ],
            "postgres": [
                {
                    "name": "demo-postgres",
                    "dsn": postgres_dsn,
                    "password_env": "POOLWATCH_DEMO_POSTGRES_PASSWORD",
                }
            ],
            "doctor": {"defaults": {"cores": os.cpu_count() or 1}},
        },
        "demo",
    )
    await serve(config, install_signals=False)


if __name__ == "__main__":
    sys.exit(main())
