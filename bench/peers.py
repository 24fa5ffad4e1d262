"""The peers poolwatch is measured against, installed the way their users get them.

* ``prometheus-pgbouncer-exporter`` 2.1.2 from PyPI, into its own venv under
  ``.cache/bench/pgbouncer-exporter-venv``. It pins ``psycopg2==2.8.5``, which no longer builds on
  Python 3.11, so it is installed with ``--no-deps`` plus its other pins and ``psycopg2-binary``
  (the same ``psycopg2`` module, prebuilt).
* ``prometheus-postgres-exporter`` from Debian (0.11.1 on bookworm), ``apt-get install``-ed when
  missing; the package's service is never started (Debian's policy-rc.d), the bench runs the binary.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEER_VENV = REPO / ".cache" / "bench" / "pgbouncer-exporter-venv"
PGBOUNCER_EXPORTER = "prometheus-pgbouncer-exporter==2.1.2"
#: its own pins, minus psycopg2==2.8.5 (does not build on 3.11), plus the prebuilt psycopg2
PGBOUNCER_EXPORTER_DEPS = (
    "psycopg2-binary",
    "prometheus_client==0.8.0",
    "python-json-logger==0.1.11",
    "PyYAML",
)
POSTGRES_EXPORTER = "/usr/bin/prometheus-postgres-exporter"


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )


def pgbouncer_exporter() -> Path:
    """The ``pgbouncer-exporter`` console script of the PyPI package (installed on first use)."""
    script = PEER_VENV / "bin" / "pgbouncer-exporter"
    if script.exists():
        return script
    PEER_VENV.parent.mkdir(parents=True, exist_ok=True)
    print(f"installing {PGBOUNCER_EXPORTER} into {PEER_VENV} ...", flush=True)
    _run([sys.executable, "-m", "venv", str(PEER_VENV)])
    pip = [
        str(PEER_VENV / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ]
    _run([*pip, "--no-deps", PGBOUNCER_EXPORTER])
    _run([*pip, *PGBOUNCER_EXPORTER_DEPS])
    return script


def pgbouncer_exporter_version() -> str:
    python = PEER_VENV / "bin" / "python"
    out = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m; print(m.version('prometheus-pgbouncer-exporter'))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or "?"


def postgres_exporter() -> Path:
    """Debian's prometheus-postgres-exporter (apt-get install on first use; needs root)."""
    if not Path(POSTGRES_EXPORTER).exists():
        if os.geteuid() != 0:
            raise RuntimeError(
                f"{POSTGRES_EXPORTER} is missing: apt-get install prometheus-postgres-exporter"
            )
        print("apt-get install prometheus-postgres-exporter ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, capture_output=True)
        done = subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus-postgres-exporter"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"apt-get install prometheus-postgres-exporter failed:\n{done.stderr[-2000:]}")
    return Path(POSTGRES_EXPORTER)


def postgres_exporter_version() -> str:
    out = subprocess.run([POSTGRES_EXPORTER, "--version"], capture_output=True, text=True, check=False)
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "?"


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
