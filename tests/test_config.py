"""Config validation: each bad input is one line naming file, field and value, and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from poolwatch.cli import main
from poolwatch.config import ConfigError, load_config, parse_listen, postgres_url, redact

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "poolwatch.yaml"
    path.write_text(text)
    return path


BAD_CONFIGS = [
    ("unknown top-level key", "listne: ':9127'\n", "listne: unknown key"),
    (
        "unknown nested key",
        "pgbouncers:\n  - name: a\n    pasword_file: /x\n",
        "pgbouncers[0].pasword_file: unknown key",
    ),
    (
        "port out of range",
        "pgbouncers:\n  - name: a\n    port: 70000\n",
        "pgbouncers[0].port: Input should be less than or equal to 65535 (got 70000)",
    ),
    (
        "wrong type",
        "collection:\n  timeout: soon\n",
        "collection.timeout: expected a duration such as 5, 5s, 500ms, 2m or 1h (got 'soon')",
    ),
    (
        "negative duration",
        "probes:\n  interval: -1\n",
        "probes.interval: Input should be greater than 0 (got -1)",
    ),
    (
        "missing password file",
        "pgbouncers:\n  - name: a\n    password_file: /nonexistent/pw\n",
        "pgbouncers[0].password_file: password file '/nonexistent/pw' does not exist or is not a file",
    ),
    ("missing name", "postgres:\n  - dsn: 'host=x'\n", "postgres[0].name: required field is missing"),
    (
        "bad dsn",
        "postgres:\n  - name: p\n    dsn: 'host=x port'\n",
        'postgres[0].dsn: not a valid connection string: missing "=" after "port" in connection info string',
    ),
    ("bad sslmode", "postgres:\n  - name: p\n    sslmode: maybe\n", "postgres[0].sslmode: Input should be"),
    ("duplicate names", "postgres:\n  - name: p\n  - name: p\n", "postgres: target name 'p' is used twice"),
    ("not a mapping", "- a\n- b\n", "the top level must be a mapping, got list"),
    ("invalid yaml", "listen: [\n", "invalid YAML"),
    ("bad listen", "listen: 'localhost:http'\n", "listen: listen address 'localhost:http' is not HOST:PORT"),
    (
        "cached body limit not a count",
        "collection:\n  cached_body_max_series: lots\n",
        "collection.cached_body_max_series: Input should be a valid integer, unable to parse string as an "
        "integer (got 'lots')",
    ),
    (
        "probe cap negative",
        "pgbouncers:\n  - name: a\n    probe:\n      max_databases: -2\n",
        "pgbouncers[0].probe.max_databases: Input should be greater than or equal to 0 (got -2)",
    ),
    (
        "hold_connection value",
        "pgbouncers:\n  - name: a\n    hold_connection: sometimes\n",
        "pgbouncers[0].hold_connection: Input should be 'auto', 'always' or 'never' (got 'sometimes')",
    ),
]


@pytest.mark.parametrize(("case", "text", "expected"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_one_clear_line(tmp_path: Path, case: str, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.lines) == 1, info.value.lines
    line = info.value.lines[0]
    assert line.startswith(f"{path}: ")
    assert expected in line


@pytest.mark.parametrize(("case", "text", "expected"), BAD_CONFIGS[:4], ids=[c[0] for c in BAD_CONFIGS[:4]])
def test_check_config_exits_2_without_traceback(tmp_path: Path, case: str, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    proc = subprocess.run(
        [sys.executable, "-m", "poolwatch.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"poolwatch: {path}: " + proc.stderr.split(f"{path}: ", 1)[1].strip()
    ]
    assert expected in proc.stderr


def test_several_problems_each_get_a_line(tmp_path: Path) -> None:
    path = write(tmp_path, "listne: 1\ncollection:\n  timeout: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.lines) == 2


def test_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(REPO / "config.example.yaml")
    assert [t.name for t in config.pgbouncers] == ["pgbouncer-1"]
    assert config.collection.timeout == 5.0
    assert config.probes.timeout == 3.0
    assert config.pgbouncers[0].connection_params(6432, "pgbouncer")["dbname"] == "pgbouncer"


def test_check_config_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(REPO / "config.example.yaml")]) == 0
    assert "ok (1 PgBouncer and 1 PostgreSQL targets)" in capsys.readouterr().out


def test_missing_file_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "/nonexistent/poolwatch.yaml"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "poolwatch: /nonexistent/poolwatch.yaml: config file does not exist"
    )


def test_durations_and_defaults(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, "collection:\n  timeout: 500ms\n  interval: 2m\nprobes:\n  interval: 1h\n")
    )
    assert config.collection.timeout == 0.5
    assert config.collection.interval == 120.0
    assert config.probes.interval == 3600.0


def test_password_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("PW_FOR_TEST", "from-env")
    config = load_config(
        write(
            tmp_path,
            f"pgbouncers:\n  - name: a\n    password_file: {secret}\n"
            "postgres:\n  - name: b\n    password_env: PW_FOR_TEST\n",
        )
    )
    assert config.pgbouncers[0].password() == "s3cret"
    assert config.postgres[0].password() == "from-env"
    # the password never appears in the model's printable form
    assert "s3cret" not in repr(config) and "from-env" not in repr(config)


def test_no_targets_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("POOLWATCH_CONFIG", "POOLWATCH_PGBOUNCER_DSN", "POOLWATCH_POSTGRES_DSN", "POOLWATCH_LISTEN"):
        monkeypatch.delenv(var, raising=False)
    assert main(["run"]) == 2
    assert "nothing to watch" in capsys.readouterr().err


def test_unknown_argument_is_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "poolwatch.cli", "run", "--bogus"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "poolwatch: error: unrecognized arguments: --bogus"


def test_listen_parsing() -> None:
    assert parse_listen("127.0.0.1:9127") == {"host": "127.0.0.1", "port": 9127}
    assert parse_listen(":9000") == {"host": "0.0.0.0", "port": 9000}
    assert parse_listen("9000") == {"host": "0.0.0.0", "port": 9000}
    assert parse_listen("[::1]:9000") == {"host": "::1", "port": 9000}


def test_redact_and_asyncpg_url() -> None:
    assert "hunter2" not in redact("host=a password=hunter2 user=u")
    assert "hunter2" not in redact("postgresql://u:hunter2@h/db")
    url = postgres_url(
        {"host": "db.example", "port": "5433", "user": "mon itor", "dbname": "postgres", "sslmode": "require"}
    )
    assert url == "postgresql://mon%20itor@db.example:5433/postgres?sslmode=require"
    assert postgres_url({"host": "/tmp/sock", "port": "5432", "user": "u", "dbname": "d"}) == (
        "postgresql://u@/d?host=/tmp/sock&port=5432"
    )
