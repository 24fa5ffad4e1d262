"""Throwaway PostgreSQL and PgBouncer servers on loopback, for the test suite and ``poolwatch demo``.

Everything here runs real servers from the machine's packages: ``initdb``/``postgres`` (found on
``PATH`` or under ``/usr/lib/postgresql/*/bin``) and a PgBouncer binary (the system's 1.18 or the
1.24 that ``scripts/pgbouncer-debian13.sh`` installs under ``.cache/pgbouncer-1.24``).

Roles, exactly as the README documents them for a real deployment:

* ``poolwatch``: ``LOGIN``, member of ``pg_monitor``, nothing else. It is also PgBouncer's
  ``stats_users`` entry, so one least-privilege identity reads both servers.
* ``app``: ``LOGIN``, owner of database ``app``; the application that clients run as.
* ``pgb_admin``: exists only in PgBouncer (``admin_users``) for tests that PAUSE/RELOAD/SHUTDOWN.

Passwords are random per server object, exposed as attributes and never part of a DSN, a log line
or a ``repr``. PostgreSQL receives only SCRAM verifiers computed here, so its log never holds a
plain password.

Servers never run as root: when the current user is root they run as the ``postgres`` OS user
(``Popen(user=...)``, the same as ``runuser -u postgres``) and their directories are chowned to
it. Every process is started in its own session (terminal Ctrl-C does not reach it), tracked, and
stopped by ``stop()``, by context-manager exit, or at interpreter exit as a last resort.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import hashlib
import hmac
import os
import pwd
import random
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow, dict_row

__all__ = [
    "DEFAULT_PGBOUNCER",
    "PGBOUNCER_124_DIR",
    "ClientGroup",
    "Load",
    "LoadError",
    "LocalCluster",
    "PgBouncerServer",
    "PostgresServer",
    "ServerError",
    "find_pg_bindir",
    "find_pgbouncer_124",
    "free_port",
    "hold_transactions",
    "scram_sha256_verifier",
]

DEFAULT_PGBOUNCER = "/usr/sbin/pgbouncer"
#: Where ``scripts/pgbouncer-debian13.sh`` installs PgBouncer 1.24, relative to the repository root.
PGBOUNCER_124_DIR = Path(".cache") / "pgbouncer-1.24"
LOOPBACK = "127.0.0.1"

SettingValue = str | int | float | bool
StopMode = Literal["smart", "fast", "immediate"]

# A unix socket path must fit in sockaddr_un.sun_path (108 bytes with the NUL).
_MAX_SOCKET_PATH = 107


class ServerError(RuntimeError):
    """A server failed to initialise, start or answer; the message carries the end of its log."""


class LoadError(RuntimeError):
    """A :class:`Load` client could not connect or run its first statement."""


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

_ports_lock = threading.Lock()
_ports_given: set[int] = set()


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port the OS reports free on ``host`` (bind port 0 and read it back).

    Ports already handed out by this process are never returned twice, so two servers started
    back to back cannot race each other for the same port.
    """
    with _ports_lock:
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port = int(sock.getsockname()[1])
            if port not in _ports_given:
                _ports_given.add(port)
                return port
    raise ServerError("no free port found")


def _new_password() -> str:
    # URL-safe base64: no quotes, backslashes or spaces, so it needs no escaping anywhere.
    return secrets.token_urlsafe(24)


def scram_sha256_verifier(password: str, *, iterations: int = 4096, salt: bytes | None = None) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802/7677).

    Sending this instead of the password keeps the plain text out of the server log even when a
    statement is logged. (SASLprep is the identity for the ASCII passwords generated here.)
    """
    salt = salt if salt is not None else os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} unreadable)"
    return "\n".join(text.splitlines()[-lines:])


def _check_socket_dir(directory: Path, port: int) -> None:
    path = directory / f".s.PGSQL.{port}"
    if len(str(path).encode()) > _MAX_SOCKET_PATH:
        raise ServerError(
            f"unix socket path {path} is longer than {_MAX_SOCKET_PATH} bytes; use a shorter base_dir"
        )


def _check_plain_path(path: Path) -> None:
    # Paths go unquoted into pgbouncer.ini and quoted into postgresql.conf.
    if re.search(r"[\s;'\"#\\]", str(path)):
        raise ServerError(f"base_dir {path} must not contain whitespace, quotes, ';', '#' or '\\'")


def _conninfo(**params: object) -> str:
    return " ".join(f"{key}={_quote_conninfo(str(value))}" for key, value in params.items())


def _quote_conninfo(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def find_pg_bindir() -> Path:
    """The directory holding ``initdb`` and ``postgres``.

    Order: ``$POOLWATCH_PG_BINDIR``; the directory of ``pg_ctl``/``initdb`` found on ``PATH``
    (symlinks resolved); the newest ``/usr/lib/postgresql/<major>/bin``.
    """
    env = os.environ.get("POOLWATCH_PG_BINDIR")
    if env:
        return Path(env)
    for name in ("initdb", "pg_ctl"):
        found = shutil.which(name)
        if found:
            real = Path(found).resolve().parent
            if (real / "postgres").exists() and (real / "initdb").exists():
                return real
    candidates: list[tuple[int, Path]] = []
    for bindir in Path("/usr/lib/postgresql").glob("*/bin"):
        with contextlib.suppress(ValueError):
            if (bindir / "initdb").exists():
                candidates.append((int(bindir.parent.name), bindir))
    if candidates:
        return max(candidates)[1]
    raise ServerError("PostgreSQL server binaries not found (install postgresql-15: scripts/test does)")


def find_pgbouncer_124(repo_root: str | os.PathLike[str]) -> str | None:
    """The PgBouncer 1.24 launcher under ``<repo_root>/.cache/pgbouncer-1.24`` if it is installed
    and runs, else None. Install it with ``scripts/pgbouncer-debian13.sh``."""
    launcher = Path(repo_root) / PGBOUNCER_124_DIR / "pgbouncer"
    if not (launcher.is_file() and os.access(launcher, os.X_OK)):
        return None
    try:
        out = subprocess.run(
            [str(launcher), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.startswith("PgBouncer "):
        return None
    return str(launcher)


# --------------------------------------------------------------------------------------------
# Running as the postgres OS user
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RunAs:
    """Who server processes run as: the current user, or ``os_user`` when we are root."""

    name: str
    uid: int | None = None
    gid: int | None = None

    @classmethod
    def resolve(cls, os_user: str) -> _RunAs:
        if os.geteuid() != 0:
            return cls(name=pwd.getpwuid(os.geteuid()).pw_name)
        try:
            entry = pwd.getpwnam(os_user)
        except KeyError:
            raise ServerError(
                f"running as root, but OS user {os_user!r} does not exist to run the servers as "
                "(installing the postgresql package creates it)"
            ) from None
        return cls(name=os_user, uid=entry.pw_uid, gid=entry.pw_gid)

    @property
    def switching(self) -> bool:
        return self.uid is not None

    @property
    def extra_groups(self) -> list[int] | None:
        return [] if self.switching else None

    def own(self, *paths: Path) -> None:
        if self.uid is None or self.gid is None:
            return
        for path in paths:
            os.chown(path, self.uid, self.gid)

    def prepare_dir(self, directory: Path, mode: int = 0o700) -> None:
        """Create ``directory`` for the server user and make its ancestors traversable to it."""
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(mode)
        self.own(directory)
        if not self.switching:
            return
        # pytest's /tmp/pytest-of-root is 0700: grant search (x) only, never read, on ancestors.
        for parent in directory.parents:
            st = parent.stat()
            if not st.st_mode & stat.S_IXOTH:
                parent.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)

    def write(self, path: Path, text: str, mode: int = 0o600) -> None:
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        self.own(tmp)
        os.replace(tmp, path)

    def child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.setdefault("LC_ALL", "C.UTF-8")
        if self.switching:
            env["HOME"] = pwd.getpwnam(self.name).pw_dir
            env["USER"] = env["LOGNAME"] = self.name
        return env


# --------------------------------------------------------------------------------------------
# Process tracking: everything started is stopped, even on exceptions or at interpreter exit
# --------------------------------------------------------------------------------------------

_live_lock = threading.Lock()
_live: dict[int, _Process] = {}


def _stop_all_at_exit() -> None:
    with _live_lock:
        procs = list(_live.values())
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.terminate_hard()


atexit.register(_stop_all_at_exit)


class _Process:
    """One server process started in its own session, with its console output in a file."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        run_as: _RunAs,
        cwd: Path,
        output: Path,
    ) -> None:
        self.output = output
        self._out: IO[bytes] = open(output, "ab")  # noqa: SIM115 - closed in _reaped()
        try:
            self.popen: subprocess.Popen[bytes] = subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=self._out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=run_as.child_env(),
                start_new_session=True,
                user=run_as.uid,
                group=run_as.gid,
                extra_groups=run_as.extra_groups,
            )
        except BaseException:
            self._out.close()
            raise
        with _live_lock:
            _live[id(self)] = self

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        if self.popen.poll() is None:
            return True
        self._reaped()
        return False

    def send(self, sig: int) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, sig)

    def wait(self, timeout: float | None) -> bool:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        self._reaped()
        return True

    def kill_group(self) -> None:
        """SIGKILL the whole process group (the server and any children it forked)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.send(signal.SIGKILL)
        self.wait(30)

    def terminate_hard(self) -> None:
        """Last resort (atexit): SIGQUIT, a moment's grace, then SIGKILL the group."""
        if self.running():
            self.send(signal.SIGQUIT)
            if not self.wait(3):
                self.kill_group()
        self._reaped()

    def _reaped(self) -> None:
        with _live_lock:
            _live.pop(id(self), None)
        if not self._out.closed:
            self._out.close()


def _wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _render_pg_value(value: SettingValue) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + value.replace("'", "''") + "'"


def _render_ini_value(value: SettingValue) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


class PostgresServer:
    """A throwaway PostgreSQL cluster under ``base_dir`` listening on 127.0.0.1 and a unix socket.

    ``start()`` runs initdb on first use. Authentication: ``trust`` for the ``postgres`` superuser
    on the unix socket only; SCRAM-SHA-256 for everything else, TCP included.
    """

    superuser = "postgres"
    monitor_user = "poolwatch"
    app_user = "app"
    app_database = "app"
    host = LOOPBACK

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        max_connections: int = 200,
        settings: Mapping[str, SettingValue] | None = None,
        port: int | None = None,
        os_user: str = "postgres",
        bindir: str | os.PathLike[str] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.base_dir = Path(base_dir).absolute()
        _check_plain_path(self.base_dir)
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "sock"
        self.log_file = self.base_dir / "postgres.log"
        self.max_connections = max_connections
        self.settings: dict[str, SettingValue] = dict(settings or {})
        self.port = port if port is not None else free_port()
        _check_socket_dir(self.socket_dir, self.port)
        self.start_timeout = start_timeout
        self.monitor_password = _new_password()
        self.app_password = _new_password()
        self._run_as = _RunAs.resolve(os_user)
        self._bindir = Path(bindir) if bindir is not None else None
        self._proc: _Process | None = None

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<PostgresServer {self.host}:{self.port} {self.base_dir} {state}>"

    # -- DSNs (never with a password) -------------------------------------------------------

    def superuser_dsn(self, dbname: str = "postgres") -> str:
        """Superuser over the unix socket (trust): for setup and test assertions only."""
        return _conninfo(host=self.socket_dir, port=self.port, user=self.superuser, dbname=dbname)

    def monitor_dsn(self, dbname: str = "postgres") -> str:
        """The least-privilege ``poolwatch`` role over TCP; password: ``monitor_password``."""
        return _conninfo(host=self.host, port=self.port, user=self.monitor_user, dbname=dbname)

    def app_dsn(self, dbname: str = "app") -> str:
        """The application role over TCP, directly (not through PgBouncer); password: ``app_password``."""
        return _conninfo(host=self.host, port=self.port, user=self.app_user, dbname=dbname)

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_pg_bindir()
        return self._bindir

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.running() else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.running()

    def start(self) -> Self:
        """initdb if needed, write the configuration, start, wait until it answers, ensure roles."""
        if self.is_running():
            return self
        self._run_as.prepare_dir(self.base_dir)
        self._run_as.prepare_dir(self.socket_dir)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        self._write_config()
        self._proc = _Process(
            [str(self.bindir / "postgres"), "-D", str(self.data_dir)],
            run_as=self._run_as,
            cwd=self.base_dir,
            output=self.log_file,
        )
        try:
            self._wait_ready()
            self._ensure_roles()
        except BaseException:
            self.stop("immediate")
            raise
        return self

    def stop(self, mode: StopMode = "fast", timeout: float = 30.0) -> None:
        """Stop with PostgreSQL's ``smart``/``fast``/``immediate`` shutdown; escalate to SIGQUIT,
        then SIGKILL of the whole process group, if it is not gone within ``timeout``."""
        proc, self._proc = self._proc, None
        if proc is None or not proc.running():
            return
        first = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        proc.send(first)
        if proc.wait(timeout):
            return
        proc.send(signal.SIGQUIT)
        if proc.wait(5):
            return
        proc.kill_group()

    def restart(self, mode: StopMode = "fast") -> Self:
        """Stop and start again on the same port with the same data and passwords."""
        self.stop(mode)
        return self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends (a crash, for failure tests)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill_group()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- SQL as superuser ---------------------------------------------------------------------

    @contextlib.contextmanager
    def connect(self, dbname: str = "postgres") -> Iterator[psycopg.Connection[TupleRow]]:
        """A superuser connection (autocommit) over the unix socket."""
        with psycopg.connect(self.superuser_dsn(dbname), autocommit=True, connect_timeout=10) as conn:
            yield conn

    def execute(
        self,
        query: str | sql.Composable,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        dbname: str = "postgres",
    ) -> list[tuple[Any, ...]]:
        """Run one statement as superuser (autocommit); its rows, or [] if it returns none."""
        with self.connect(dbname) as conn, conn.cursor() as cur:
            cur.execute(query, params)  # type: ignore[arg-type]  # plain str on purpose: test SQL
            return list(cur.fetchall()) if cur.description is not None else []

    # -- internals ----------------------------------------------------------------------------

    def _run_tool(self, args: Sequence[str]) -> None:
        with open(self.log_file, "ab") as log:
            done = subprocess.run(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                env=self._run_as.child_env(),
                user=self._run_as.uid,
                group=self._run_as.gid,
                extra_groups=self._run_as.extra_groups,
                timeout=300,
                check=False,
            )
        if done.returncode != 0:
            raise ServerError(f"{args[0]} failed ({done.returncode}):\n{_tail(self.log_file)}")

    def _initdb(self) -> None:
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self._run_tool(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                self.superuser,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        conf = self.data_dir / "postgresql.conf"
        with open(conf, "a") as fh:
            fh.write("\n# poolwatch.localcluster: its settings win\ninclude 'localcluster.conf'\n")

    def _write_config(self) -> None:
        values: dict[str, SettingValue] = {
            "listen_addresses": self.host,
            "port": self.port,
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": self.max_connections,
            "shared_buffers": "32MB",
            "fsync": False,
            "synchronous_commit": False,
            "full_page_writes": False,
            "password_encryption": "scram-sha-256",
            "logging_collector": False,
            "log_destination": "stderr",
            "log_line_prefix": "%m [%p] %q%u@%d ",
            "log_min_error_statement": "error",
            "log_timezone": "UTC",
            "timezone": "UTC",
        }
        values.update(self.settings)
        text = "".join(f"{key} = {_render_pg_value(value)}\n" for key, value in values.items())
        self._run_as.write(self.data_dir / "localcluster.conf", text)
        hba = (
            "# poolwatch.localcluster: the superuser only over the unix socket, SCRAM everywhere else\n"
            f"local   all   {self.superuser}   trust\n"
            "local   all   all   scram-sha-256\n"
            f"host    all   all   {self.host}/32   scram-sha-256\n"
        )
        self._run_as.write(self.data_dir / "pg_hba.conf", hba)

    def _wait_ready(self) -> None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + self.start_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not proc.running():
                raise ServerError(
                    f"postgres exited with {proc.popen.returncode} during start:\n{_tail(self.log_file)}"
                )
            try:
                with psycopg.connect(self.superuser_dsn(), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                last = exc
                time.sleep(0.05)
        raise ServerError(
            f"postgres did not answer in {self.start_timeout}s ({last}):\n{_tail(self.log_file)}"
        )

    def _ensure_roles(self) -> None:
        """Idempotent: create the roles/database, or reset their passwords to this object's."""
        with self.connect() as conn:
            for role, password in (
                (self.monitor_user, self.monitor_password),
                (self.app_user, self.app_password),
            ):
                exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
                verb = sql.SQL("ALTER ROLE" if exists else "CREATE ROLE")
                conn.execute(
                    sql.SQL("{} {} LOGIN PASSWORD {}").format(
                        verb, sql.Identifier(role), sql.Literal(scram_sha256_verifier(password))
                    )
                )
            conn.execute(sql.SQL("GRANT pg_monitor TO {}").format(sql.Identifier(self.monitor_user)))
            if not conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.app_database,)
            ).fetchone():
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(self.app_database), sql.Identifier(self.app_user)
                    )
                )


# --------------------------------------------------------------------------------------------
# PgBouncer
# --------------------------------------------------------------------------------------------

_PGBOUNCER_DEFAULTS: dict[str, SettingValue] = {
    "auth_type": "scram-sha-256",
    "pool_mode": "transaction",
    "default_pool_size": 5,
    "min_pool_size": 0,
    "reserve_pool_size": 0,
    "reserve_pool_timeout": 5,
    "max_client_conn": 200,
    "max_db_connections": 0,
    "server_lifetime": 3600,
    "server_idle_timeout": 600,
    "server_check_query": "select 1",
    "server_check_delay": 30,
    "query_wait_timeout": 120,
    "ignore_startup_parameters": "extra_float_digits",
    "log_connections": 1,
    "log_disconnections": 1,
    "log_pooler_errors": 1,
}


class PgBouncerServer:
    """A throwaway PgBouncer under ``base_dir`` in front of ``postgres``, on 127.0.0.1.

    ``settings`` and then ``**overrides`` override ``[pgbouncer]`` ini settings
    (``default_pool_size=2``, ``pool_mode="session"``, ``server_lifetime=10`` ...; ``None`` removes
    a default). ``databases``
    adds ``[databases]`` entries besides ``app`` and ``postgres``: a raw connection string, or a
    mapping merged over ``host``/``port`` of ``postgres`` (``{"dbname": "app", "pool_size": 1}``).
    ``users`` adds ``userlist.txt`` entries (name -> plain password).

    Users: ``app`` (clients), ``poolwatch`` (``stats_users``, the monitor) and ``pgb_admin``
    (``admin_users``). Plain-text passwords in ``userlist.txt`` let PgBouncer answer SCRAM from
    clients and do SCRAM itself towards PostgreSQL.
    """

    admin_user = "pgb_admin"
    host = LOOPBACK

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        postgres: PostgresServer,
        binary: str = DEFAULT_PGBOUNCER,
        *,
        port: int | None = None,
        databases: Mapping[str, str | Mapping[str, SettingValue]] | None = None,
        users: Mapping[str, str] | None = None,
        settings: Mapping[str, SettingValue | None] | None = None,
        os_user: str = "postgres",
        start_timeout: float = 30.0,
        term_timeout: float = 3.0,
        **overrides: SettingValue | None,
    ) -> None:
        self.base_dir = Path(base_dir).absolute()
        _check_plain_path(self.base_dir)
        self.postgres = postgres
        self.binary = str(binary)
        self.port = port if port is not None else free_port()
        self.socket_dir = self.base_dir / "sock"
        _check_socket_dir(self.socket_dir, self.port)
        self.ini_file = self.base_dir / "pgbouncer.ini"
        self.userlist_file = self.base_dir / "userlist.txt"
        self.log_file = self.base_dir / "pgbouncer.log"
        self.pid_file = self.base_dir / "pgbouncer.pid"
        self.console_file = self.base_dir / "pgbouncer.console"
        self.start_timeout = start_timeout
        self.term_timeout = term_timeout
        self.admin_password = _new_password()
        self.extra_databases: dict[str, str | Mapping[str, SettingValue]] = dict(databases or {})
        self.extra_users: dict[str, str] = dict(users or {})
        self.settings: dict[str, SettingValue] = dict(_PGBOUNCER_DEFAULTS)
        self._apply(settings or {})
        self._apply(overrides)
        self._run_as = _RunAs.resolve(os_user)
        self._proc: _Process | None = None
        self._version: str | None = None

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<PgBouncerServer {self.binary} {self.host}:{self.port} {state}>"

    # -- identities (passwords are attributes, never in a DSN) --------------------------------

    @property
    def stats_user(self) -> str:
        return self.postgres.monitor_user

    @property
    def stats_password(self) -> str:
        return self.postgres.monitor_password

    @property
    def app_user(self) -> str:
        return self.postgres.app_user

    @property
    def app_password(self) -> str:
        return self.postgres.app_password

    @property
    def admin_dsn(self) -> str:
        """Admin console as ``pgb_admin``; password: ``admin_password``."""
        return _conninfo(host=self.host, port=self.port, user=self.admin_user, dbname="pgbouncer")

    @property
    def stats_dsn(self) -> str:
        """Admin console as the least-privilege ``poolwatch`` stats user; password: ``stats_password``."""
        return _conninfo(host=self.host, port=self.port, user=self.stats_user, dbname="pgbouncer")

    def app_dsn(self, dbname: str = "app") -> str:
        """A client connection through PgBouncer as ``app``; password: ``app_password``."""
        return _conninfo(host=self.host, port=self.port, user=self.app_user, dbname=dbname)

    # -- version --------------------------------------------------------------------------------

    @property
    def version(self) -> str:
        """``"1.18.0"``, from ``pgbouncer --version`` (cached)."""
        if self._version is None:
            out = subprocess.run(
                [self.binary, "--version"], capture_output=True, text=True, timeout=30, check=False
            )
            match = re.search(r"PgBouncer (\d+(?:\.\d+)+)", out.stdout + out.stderr)
            if match is None:
                raise ServerError(f"cannot parse the version of {self.binary}: {out.stdout!r} {out.stderr!r}")
            self._version = match.group(1)
        return self._version

    @property
    def version_info(self) -> tuple[int, ...]:
        return tuple(int(part) for part in self.version.split("."))

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.running() else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.running()

    def start(self) -> Self:
        """Write the config and start; return once the admin console answers. Same port every time."""
        if self.is_running():
            return self
        self._run_as.prepare_dir(self.base_dir)
        self._run_as.prepare_dir(self.socket_dir)
        self._write_files()
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()  # stale after kill(): the process is gone (is_running() is False)
        self._proc = _Process(
            [self.binary, str(self.ini_file)],
            run_as=self._run_as,
            cwd=self.base_dir,
            output=self.console_file,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM, wait ``timeout`` (default ``term_timeout``); then SIGQUIT (the fast exit of
        1.23+, which waits for clients on SIGTERM); then SIGKILL. Nothing is left running."""
        proc, self._proc = self._proc, None
        if proc is None or not proc.running():
            return
        proc.send(signal.SIGTERM)
        if proc.wait(self.term_timeout if timeout is None else timeout):
            return
        proc.send(signal.SIGQUIT)
        if proc.wait(5):
            return
        proc.kill_group()

    def kill(self) -> None:
        """SIGKILL (a crash); ``start()`` brings it back on the same port."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill_group()

    def sigterm(self) -> None:
        """Send SIGTERM and return at once (1.18 exits; 1.23+ waits for every client)."""
        if self._proc is not None:
            self._proc.send(signal.SIGTERM)

    def send_signal(self, sig: int) -> None:
        if self._proc is not None:
            self._proc.send(sig)

    def wait_exit(self, timeout: float) -> bool:
        """True once the process has exited (it is reaped); False if still running after ``timeout``."""
        if self._proc is None:
            return True
        if self._proc.wait(timeout):
            self._proc = None
            return True
        return False

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.popen.poll()

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def reload_config(
        self,
        *,
        databases: Mapping[str, str | Mapping[str, SettingValue]] | None = None,
        users: Mapping[str, str] | None = None,
        timeout: float = 5.0,
        **changes: SettingValue | None,
    ) -> bool:
        """Rewrite pgbouncer.ini/userlist.txt with ``changes`` and send SIGHUP.

        Returns True once SHOW CONFIG reports every changed ``[pgbouncer]`` value (False if that
        was not seen within ``timeout``; some settings are only read at start). Database and user
        changes alone are confirmed by nothing and return True after the signal.
        """
        self._apply(changes)
        if databases is not None:
            self.extra_databases.update(databases)
        if users is not None:
            self.extra_users.update(users)
        self._write_files()
        if self._proc is None:
            return False
        self._proc.send(signal.SIGHUP)
        wanted = {key: _render_ini_value(value) for key, value in changes.items() if value is not None}
        if not wanted:
            return True

        def applied() -> bool:
            try:
                config = {row["key"]: str(row["value"]) for row in self.show("CONFIG", admin=True)}
            except psycopg.Error:
                return False
            return all(config.get(key, value) == value for key, value in wanted.items())

        return _wait_until(applied, timeout, interval=0.1)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- console helpers (simple query protocol) --------------------------------------------------

    @contextlib.contextmanager
    def console(self, *, admin: bool = False) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        """A console connection (stats user, or admin), autocommit, no prepared statements."""
        dsn, password = (
            (self.admin_dsn, self.admin_password) if admin else (self.stats_dsn, self.stats_password)
        )
        with psycopg.connect(
            dsn,
            password=password,
            autocommit=True,
            prepare_threshold=None,
            row_factory=dict_row,
            connect_timeout=5,
        ) as conn:
            yield conn

    def show(self, what: str, *, admin: bool = False) -> list[dict[str, Any]]:
        """``SHOW <what>`` on the console as a list of dicts keyed by column name."""
        return self.admin_command(f"SHOW {what}", admin=admin)

    def admin_command(self, command: str, *, admin: bool = True) -> list[dict[str, Any]]:
        """Run one console command (``PAUSE app``, ``RELOAD``, ``SHOW POOLS``); rows if any."""
        with self.console(admin=admin) as conn, conn.cursor() as cur:
            cur.execute(command)  # type: ignore[arg-type]  # console commands are plain text
            return list(cur.fetchall()) if cur.description is not None else []

    def pool(self, database: str, user: str | None = None) -> dict[str, Any] | None:
        """The SHOW POOLS row of ``database``/``user`` (user defaults to ``app``)."""
        user = self.app_user if user is None else user
        for row in self.show("POOLS"):
            if row["database"] == database and row["user"] == user:
                return row
        return None

    def wait_for_pool(
        self, database: str, user: str | None = None, *, timeout: float = 10.0, **expected: int
    ) -> dict[str, Any]:
        """Poll SHOW POOLS until the row matches every ``column=value`` in ``expected``; the row.

        Blocking: from async code run it in a thread (``asyncio.to_thread``) so clients progress.
        """
        last: dict[str, Any] | None = None

        def matches() -> bool:
            nonlocal last
            last = self.pool(database, user)
            return last is not None and all(last.get(key) == value for key, value in expected.items())

        if _wait_until(matches, timeout, interval=0.05):
            assert last is not None
            return last
        raise TimeoutError(
            f"pool {database}/{user or self.app_user} never matched {expected}; last row: {last}"
        )

    # -- internals ---------------------------------------------------------------------------------

    def _apply(self, changes: Mapping[str, SettingValue | None]) -> None:
        for key, value in changes.items():
            if value is None:
                self.settings.pop(key, None)
            else:
                self.settings[key] = value

    def _database_lines(self) -> list[str]:
        pg = self.postgres
        base: dict[str, str | Mapping[str, SettingValue]] = {
            pg.app_database: {"dbname": pg.app_database},
            "postgres": {"dbname": "postgres"},
        }
        base.update(self.extra_databases)
        lines = []
        for name, entry in base.items():
            if isinstance(entry, str):
                lines.append(f"{name} = {entry}")
            else:
                params: dict[str, SettingValue] = {"host": pg.host, "port": pg.port, **entry}
                lines.append(
                    f"{name} = " + " ".join(f"{k}={_render_ini_value(v)}" for k, v in params.items())
                )
        return lines

    def _write_files(self) -> None:
        users = {
            self.app_user: self.app_password,
            self.stats_user: self.stats_password,
            self.admin_user: self.admin_password,
            **self.extra_users,
        }
        userlist = "".join(
            '"{}" "{}"\n'.format(name.replace('"', '""'), password.replace('"', '""'))
            for name, password in users.items()
        )
        self._run_as.write(self.userlist_file, userlist)
        fixed: dict[str, SettingValue] = {
            "listen_addr": self.host,
            "listen_port": self.port,
            "unix_socket_dir": str(self.socket_dir),
            "auth_file": str(self.userlist_file),
            "admin_users": self.admin_user,
            "stats_users": self.stats_user,
            "logfile": str(self.log_file),
            "pidfile": str(self.pid_file),
        }
        settings = {**fixed, **self.settings}
        ini = (
            "; written by poolwatch.localcluster\n[databases]\n"
            + "".join(line + "\n" for line in self._database_lines())
            + "\n[pgbouncer]\n"
            + "".join(f"{key} = {_render_ini_value(value)}\n" for key, value in settings.items())
        )
        self._run_as.write(self.ini_file, ini)

    def _wait_ready(self) -> None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + self.start_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not proc.running():
                raise ServerError(
                    f"pgbouncer exited with {proc.popen.returncode} during start:\n"
                    f"{_tail(self.console_file)}\n{_tail(self.log_file)}"
                )
            try:
                self.show("VERSION", admin=True)
                return
            except psycopg.OperationalError as exc:
                last = exc
                time.sleep(0.05)
        raise ServerError(
            f"pgbouncer did not answer in {self.start_timeout}s ({last}):\n{_tail(self.log_file)}"
        )


# --------------------------------------------------------------------------------------------
# Both together
# --------------------------------------------------------------------------------------------


class LocalCluster:
    """PostgreSQL plus one PgBouncer in front of it, under one directory; a context manager.

    With ``base_dir=None`` a short temporary directory is made and removed on ``stop()`` (unless
    ``keep_dir``). ``pgbouncer_settings`` go to :class:`PgBouncerServer` as ini overrides.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        pgbouncer_binary: str = DEFAULT_PGBOUNCER,
        max_connections: int = 200,
        postgres_settings: Mapping[str, SettingValue] | None = None,
        pgbouncer_settings: Mapping[str, SettingValue | None] | None = None,
        databases: Mapping[str, str | Mapping[str, SettingValue]] | None = None,
        keep_dir: bool = False,
        os_user: str = "postgres",
    ) -> None:
        self._made_dir = base_dir is None
        self.keep_dir = keep_dir
        self.base_dir = Path(tempfile.mkdtemp(prefix="poolwatch-")) if base_dir is None else Path(base_dir)
        self.postgres = PostgresServer(
            self.base_dir / "pg", max_connections=max_connections, settings=postgres_settings, os_user=os_user
        )
        self.pgbouncer = PgBouncerServer(
            self.base_dir / "pgb",
            self.postgres,
            pgbouncer_binary,
            databases=databases,
            settings=pgbouncer_settings,
            os_user=os_user,
        )

    def __repr__(self) -> str:
        return f"<LocalCluster {self.base_dir} {self.postgres!r} {self.pgbouncer!r}>"

    def start(self) -> Self:
        try:
            self.postgres.start()
            self.pgbouncer.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop PgBouncer, then PostgreSQL; remove a directory we made. Safe to call twice."""
        try:
            self.pgbouncer.stop()
        finally:
            self.postgres.stop()
            if self._made_dir and not self.keep_dir:
                shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Client load
# --------------------------------------------------------------------------------------------

AsyncConn = psycopg.AsyncConnection[TupleRow]


@dataclass
class ClientGroup:
    """Live counters of one group of clients started by :class:`Load` (client-side view).

    ``waiting``: connected, first statement sent, no answer yet (queued in PgBouncer or running);
    ``holding``: inside an open transaction that has a server connection.
    """

    name: str
    size: int
    connected: int = 0
    waiting: int = 0
    holding: int = 0
    transactions: int = 0
    queries: int = 0
    backend_pids: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Load:
    """Client connections that make pools busy, for tests and the demo. An async context manager.

    Every connection uses psycopg async with ``prepare_threshold=None`` (no named prepared
    statements, safe with PgBouncer transaction pooling). ``close()`` (also on exit) ends every
    transaction and closes every connection; tasks still stuck after ``close_timeout`` are
    cancelled.
    """

    def __init__(self, *, connect_timeout: int = 10, seed: int | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.groups: list[ClientGroup] = []
        self._rng = random.Random(seed)
        self._release = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[AsyncConn] = set()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- public ------------------------------------------------------------------------------------

    async def hold_transactions(
        self,
        conninfo: str,
        password: str,
        n: int,
        *,
        busy: bool = False,
        wait_holding: int | None = None,
        wait_timeout: float = 15.0,
        name: str = "holders",
    ) -> ClientGroup:
        """Open ``n`` connections, each running ``BEGIN; SELECT pg_backend_pid()`` and then keeping
        the transaction open (``idle in transaction`` on the server; with ``busy=True`` it runs
        ``pg_sleep`` instead, ``active``) until ``close()``.

        Through PgBouncer (transaction pooling) with pool size ``p < n``: ``p`` clients hold a
        server and ``n - p`` wait in PgBouncer's queue. Returns once all ``n`` are connected and
        have sent their first statement, and at least ``wait_holding`` hold a transaction
        (``TimeoutError`` otherwise; a client's connection error is raised at once).
        """
        group = ClientGroup(name=name, size=n)
        self.groups.append(group)
        for _ in range(n):
            self._spawn(self._hold_one(group, conninfo, password, busy))

        def ready() -> bool:
            if group.errors:
                raise LoadError(f"{name}: {group.errors[0]}")
            settled = group.waiting + group.holding == n
            return settled and group.holding >= (wait_holding or 0)

        await _await_condition(ready, wait_timeout, f"{name}: {n} clients not settled ({group})")
        # The last statements were handed to the socket when `waiting` was counted; give the
        # event loop a moment so they are flushed and PgBouncer has queued them.
        await asyncio.sleep(0.05)
        return group

    async def idle_in_transaction(self, conninfo: str, password: str, *, wait_timeout: float = 15.0) -> int:
        """One session that stays ``idle in transaction`` (open it directly on PostgreSQL); its pid."""
        group = await self.hold_transactions(
            conninfo, password, 1, wait_holding=1, wait_timeout=wait_timeout, name="idle-in-transaction"
        )
        return group.backend_pids[0]

    def churn(
        self,
        conninfo: str,
        password: str,
        *,
        workers: int,
        tx_seconds: tuple[float, float] = (0.5, 2.5),
        pause_seconds: tuple[float, float] = (0.0, 0.5),
        name: str = "churn",
    ) -> ClientGroup:
        """``workers`` clients looping ``BEGIN; SELECT pg_sleep(t); COMMIT`` then a pause, until close."""
        group = ClientGroup(name=name, size=workers)
        self.groups.append(group)
        for _ in range(workers):
            self._spawn(self._churn_one(group, conninfo, password, tx_seconds, pause_seconds))
        return group

    def trickle(
        self,
        conninfo: str,
        password: str,
        *,
        interval: float = 0.5,
        query: str = "SELECT 1",
        name: str = "trickle",
    ) -> ClientGroup:
        """One autocommit client running a short ``query`` every ``interval`` seconds, until close."""
        group = ClientGroup(name=name, size=1)
        self.groups.append(group)
        self._spawn(self._trickle_one(group, conninfo, password, interval, query))
        return group

    async def close(self, grace: float = 10.0) -> None:
        """End every transaction (rollback; cancel running sleeps), close every connection."""
        self._release.set()
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for conn in list(self._conns):
            with contextlib.suppress(Exception):
                await conn.close()
        self._conns.clear()

    # -- internals -------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, conninfo: str, password: str, *, autocommit: bool) -> AsyncConn:
        conn = await psycopg.AsyncConnection.connect(
            conninfo,
            password=password,
            autocommit=autocommit,
            prepare_threshold=None,
            connect_timeout=self.connect_timeout,
        )
        self._conns.add(conn)
        return conn

    async def _disconnect(self, conn: AsyncConn) -> None:
        self._conns.discard(conn)
        with contextlib.suppress(Exception):
            await conn.close()

    async def _released(self, seconds: float) -> bool:
        """Sleep ``seconds`` or until close() is called; True if released."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._release.wait(), timeout=max(seconds, 0.0))
        return self._release.is_set()

    async def _hold_one(self, group: ClientGroup, conninfo: str, password: str, busy: bool) -> None:
        conn: AsyncConn | None = None
        try:
            conn = await self._connect(conninfo, password, autocommit=False)
            group.connected += 1
            group.waiting += 1
            try:
                row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
            finally:
                group.waiting -= 1
            assert row is not None
            group.backend_pids.append(int(row[0]))
            group.holding += 1
            try:
                if busy:
                    await self._sleep(conn, 86400.0)
                else:
                    await self._release.wait()
                await conn.rollback()
                group.transactions += 1
            finally:
                group.holding -= 1
        except psycopg.Error as exc:
            if not self._release.is_set():
                group.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            if conn is not None:
                group.connected -= 1
                await self._disconnect(conn)

    async def _sleep(self, conn: AsyncConn, seconds: float) -> bool:
        """``SELECT pg_sleep(seconds)`` on ``conn``, cancelled server-side if close() comes first.

        True if the sleep ran to its end, False if it was cancelled (the transaction is aborted).
        """
        sleeper = asyncio.ensure_future(conn.execute("SELECT pg_sleep(%s)", (seconds,)))
        release = asyncio.ensure_future(self._release.wait())
        try:
            await asyncio.wait({sleeper, release}, return_when=asyncio.FIRST_COMPLETED)
            if not sleeper.done():
                await conn.cancel_safe(timeout=5)
            try:
                await sleeper
            except psycopg.errors.QueryCanceled:
                return False
            return True
        finally:
            release.cancel()
            if not sleeper.done():
                sleeper.cancel()

    async def _churn_one(
        self,
        group: ClientGroup,
        conninfo: str,
        password: str,
        tx_seconds: tuple[float, float],
        pause_seconds: tuple[float, float],
    ) -> None:
        # Start staggered so the workers do not move in lock step.
        if await self._released(self._rng.uniform(*pause_seconds)):
            return
        while not self._release.is_set():
            conn: AsyncConn | None = None
            try:
                conn = await self._connect(conninfo, password, autocommit=False)
                group.connected += 1
                try:
                    while not self._release.is_set():
                        group.waiting += 1
                        try:
                            await conn.execute("SELECT pg_backend_pid()")
                        finally:
                            group.waiting -= 1
                        group.holding += 1
                        try:
                            if not await self._sleep(conn, self._rng.uniform(*tx_seconds)):
                                await conn.rollback()
                                break
                            await conn.commit()
                        finally:
                            group.holding -= 1
                        group.transactions += 1
                        if await self._released(self._rng.uniform(*pause_seconds)):
                            break
                finally:
                    group.connected -= 1
            except psycopg.Error as exc:
                group.errors.append(f"{type(exc).__name__}: {exc}")
                del group.errors[:-20]
                await self._released(1.0)  # the server is restarting or gone: back off
            finally:
                if conn is not None:
                    await self._disconnect(conn)

    async def _trickle_one(
        self, group: ClientGroup, conninfo: str, password: str, interval: float, query: str
    ) -> None:
        conn: AsyncConn | None = None
        try:
            while not self._release.is_set():
                try:
                    if conn is None or conn.closed:
                        conn = await self._connect(conninfo, password, autocommit=True)
                    await conn.execute(query)  # type: ignore[arg-type]  # caller's plain SQL
                    group.queries += 1
                except psycopg.Error as exc:
                    group.errors.append(f"{type(exc).__name__}: {exc}")
                    del group.errors[:-20]
                    if conn is not None:
                        await self._disconnect(conn)
                        conn = None
                if await self._released(interval):
                    break
        finally:
            if conn is not None:
                await self._disconnect(conn)


async def _await_condition(check: Callable[[], bool], within: float, message: str) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        if asyncio.get_running_loop().time() >= deadline:
            raise TimeoutError(message)
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def hold_transactions(
    conninfo: str,
    password: str,
    n: int,
    *,
    busy: bool = False,
    wait_holding: int | None = None,
    wait_timeout: float = 15.0,
) -> AsyncIterator[ClientGroup]:
    """``async with hold_transactions(dsn, pw, 5, wait_holding=2) as group:`` — :meth:`Load.hold_transactions`
    in its own :class:`Load`, closed on exit. Yields the :class:`ClientGroup`."""
    async with Load() as load:
        yield await load.hold_transactions(
            conninfo, password, n, busy=busy, wait_holding=wait_holding, wait_timeout=wait_timeout
        )
