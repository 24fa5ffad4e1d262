"""Shared fixtures: real throwaway servers from :mod:`poolwatch.localcluster`.

* ``pg``: one PostgreSQL for the whole session (roles ``poolwatch`` in pg_monitor and ``app``).
* ``pgb``: the system's PgBouncer 1.18 in front of it, for the whole session. Leave its settings
  alone; a test that needs other settings, a restart or a crash uses ``make_pgbouncer``.
* ``make_pgbouncer(version="1.18"|"1.24", **ini_overrides)``: a fresh PgBouncer per call, always
  stopped at the end of the test.
* ``pgbouncer_124_binary``: the 1.24 launcher; installed on demand; skipped when it cannot be had
  locally, but a failure when ``CI=true`` (CI must test 1.24).

Server directories come from ``tmp_path_factory``; :mod:`poolwatch.localcluster` chowns them to
the ``postgres`` OS user and makes their ancestors traversable to it when the tests run as root.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn, Protocol

import pytest

from poolwatch.localcluster import (
    DEFAULT_PGBOUNCER,
    PgBouncerServer,
    PostgresServer,
    find_pgbouncer_124,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
INSTALL_124 = REPO_ROOT / "scripts" / "pgbouncer-debian13.sh"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str, ci_hint: str = "") -> NoReturn:
    """A tool or server the test needs is missing: skip locally, fail in CI, where it must run."""
    if _in_ci():
        pytest.fail(f"{reason} (CI=true: this must run{'; ' + ci_hint if ci_hint else ''})", pytrace=False)
    pytest.skip(reason)


class MakePgBouncer(Protocol):
    def __call__(
        self, *, version: str = "1.18", binary: str | None = None, start: bool = True, **overrides: object
    ) -> PgBouncerServer: ...


@pytest.fixture(scope="session")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    with PostgresServer(tmp_path_factory.mktemp("pg")) as server:
        yield server


@pytest.fixture(scope="session")
def pgbouncer_118_binary() -> str:
    if not Path(DEFAULT_PGBOUNCER).exists():
        message = f"{DEFAULT_PGBOUNCER} is missing: apt-get install -y pgbouncer (scripts/test does)"
        unavailable(message)
    return DEFAULT_PGBOUNCER


@pytest.fixture(scope="session")
def pgbouncer_124_binary() -> str:
    found = find_pgbouncer_124(REPO_ROOT)
    reason = "not installed"
    if found is None and INSTALL_124.exists():
        try:
            done = subprocess.run(
                ["bash", str(INSTALL_124)], capture_output=True, text=True, timeout=600, check=False
            )
            reason = f"{INSTALL_124.name} exited {done.returncode}: {done.stderr.strip()[-500:]}"
        except (OSError, subprocess.SubprocessError) as exc:
            reason = f"{INSTALL_124.name} failed: {exc}"
        found = find_pgbouncer_124(REPO_ROOT)
    if found is None:
        message = f"PgBouncer 1.24 unavailable under {REPO_ROOT / '.cache/pgbouncer-1.24'} ({reason})"
        unavailable(message)
    return found


@pytest.fixture(scope="session")
def pgb(
    tmp_path_factory: pytest.TempPathFactory, pg: PostgresServer, pgbouncer_118_binary: str
) -> Iterator[PgBouncerServer]:
    with PgBouncerServer(tmp_path_factory.mktemp("pgb"), pg, pgbouncer_118_binary) as server:
        yield server


@pytest.fixture
def make_pgbouncer(
    tmp_path_factory: pytest.TempPathFactory, pg: PostgresServer, request: pytest.FixtureRequest
) -> Iterator[MakePgBouncer]:
    made: list[PgBouncerServer] = []

    def make(
        *, version: str = "1.18", binary: str | None = None, start: bool = True, **overrides: object
    ) -> PgBouncerServer:
        if binary is None:
            if version == "1.18":
                binary = request.getfixturevalue("pgbouncer_118_binary")
            elif version == "1.24":
                binary = request.getfixturevalue("pgbouncer_124_binary")
            else:
                raise ValueError(f"version must be '1.18' or '1.24', not {version!r}")
        assert binary is not None
        server = PgBouncerServer(
            tmp_path_factory.mktemp(f"pgb-{version}"),
            pg,
            binary,
            **overrides,  # type: ignore[arg-type]
        )
        made.append(server)
        if start:
            server.start()
        return server

    yield make
    errors: list[BaseException] = []
    for server in reversed(made):
        try:
            server.stop()
        except BaseException as exc:  # stop the others before reporting
            errors.append(exc)
    if errors:
        raise errors[0]
