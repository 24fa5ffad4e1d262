"""Secrets never leave poolwatch, and bad input is one clear line with exit code 2.

* The daemon runs as a subprocess with JSON logs at debug level while targets fail in every way a
  password could be echoed (wrong password, inline DSN passwords, a dead target, a PgBouncer restart,
  a SIGHUP reload); every log line, every HTTP answer and the doctor's report are searched for
  every password in play.
* The table of bad configurations and arguments extends tests/test_config.py's: each is exactly one
  ``poolwatch: ...`` line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from poolwatch.cli import main
from poolwatch.localcluster import PgBouncerServer, PostgresServer, free_port
from tests.conftest import MakePgBouncer

REPO = Path(__file__).resolve().parents[1]


def _secret(tag: str) -> str:
    return f"{tag}-{secrets.token_hex(10)}"


# ------------------------------------------------------------------------------------------------
# Secrets in logs, metrics, error messages, /checklist
# ------------------------------------------------------------------------------------------------
def _fetch(url: str, accept: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


ENDPOINTS = [
    ("/", None),
    ("/metrics", None),
    ("/metrics", "application/openmetrics-text; version=1.0.0"),
    ("/healthz", None),
    ("/readyz", None),
    ("/checklist", None),
    ("/checklist", "application/json"),
    ("/checklist?format=json", None),
    ("/no-such-page", None),
]


def _scrape_everything(base: str, answers: list[str]) -> dict[str, str]:
    seen = {}
    for path, accept in ENDPOINTS:
        status, body = _fetch(base + path, accept)
        answers.append(f"--- {path} {accept} {status}\n{body}")
        seen[f"{path} {accept}"] = body
    return seen


def _wait_for_line(log: Path, needle: str, within: float) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if needle in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not logged within {within}s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def _daemon(
    args: list[str], env: dict[str, str], workdir: Path
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    stderr, stdout = workdir / "stderr.log", workdir / "stdout.log"
    with open(stderr, "wb") as err, open(stdout, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "poolwatch.cli", *args], stdout=out, stderr=err, env=env, cwd=workdir
        )
    try:
        yield proc, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_no_secret_in_logs_metrics_errors_or_checklist(
    pg: PostgresServer, make_pgbouncer: MakePgBouncer, tmp_path: Path
) -> None:
    target = make_pgbouncer()
    right = target.stats_password  # also the PostgreSQL monitor role's password
    wrong_env, wrong_inline, dead_env = _secret("WrongEnv"), _secret("WrongInline"), _secret("DeadEnv")
    pg_wrong_env, pg_wrong_url = _secret("PgWrongEnv"), _secret("PgWrongUrl")
    all_secrets = {
        "right": right,
        "wrong_env": wrong_env,
        "wrong_inline": wrong_inline,
        "dead_env": dead_env,
        "pg_wrong_env": pg_wrong_env,
        "pg_wrong_url": pg_wrong_url,
        "app": target.app_password,
        "admin": target.admin_password,
    }
    password_file = tmp_path / "pgbouncer.pw"
    password_file.write_text(right + "\n")
    dead_port = free_port()
    where = f"host=127.0.0.1 port={target.port} dbname=pgbouncer"
    config = tmp_path / "poolwatch.yaml"
    config.write_text(
        f"""
listen: 127.0.0.1:0
collection: {{timeout: 1, interval: 0.5, max_age: 0}}
probes: {{interval: 0.5, timeout: 1}}
pgbouncers:
  - name: ok
    dsn: "{where} user={target.stats_user}"
    password_file: {password_file}
  - name: wrongpw
    dsn: "{where} user={target.stats_user}"
    password_env: SEC_WRONG
  - name: inline
    dsn: "{where} user={target.stats_user} password={wrong_inline}"
  - name: dead
    dsn: "host=127.0.0.1 port={dead_port} user=poolwatch"
    password_env: SEC_DEAD
    connect_timeout: 1
postgres:
  - name: db
    dsn: "host={pg.host} port={pg.port} user={pg.monitor_user} dbname=postgres"
    password_env: SEC_RIGHT
  - name: pgwrong
    dsn: "host={pg.host} port={pg.port} user={pg.monitor_user} dbname=postgres"
    password_env: SEC_PG_WRONG
  - name: pgurl
    dsn: "postgresql://{pg.monitor_user}:{pg_wrong_url}@{pg.host}:{pg.port}/postgres"
"""
    )
    env = {
        **os.environ,
        "SEC_WRONG": wrong_env,
        "SEC_DEAD": dead_env,
        "SEC_RIGHT": right,
        "SEC_PG_WRONG": pg_wrong_env,
    }
    answers: list[str] = []
    args = ["run", "--config", str(config), "--log-level", "debug", "--log-format", "json"]
    with _daemon(args, env, tmp_path) as (proc, stderr):
        listening = json.loads(_wait_for_line(stderr, '"listening"', 30))
        base = listening["url"]
        _wait_for_line(stderr, '"target": "wrongpw"', 10)
        time.sleep(1.2)  # a few collections and probe rounds
        first = _scrape_everything(base, answers)
        assert 'pgbouncer_up{target="ok"} 1.0' in first["/metrics None"]
        ready = json.loads(first["/readyz None"])
        reasons = {(f["target"], f["kind"]): f["reason"] for f in ready["failing"]}
        assert reasons[("wrongpw", "pgbouncer")] == "auth"
        assert reasons[("inline", "pgbouncer")] == "auth"
        assert reasons[("dead", "pgbouncer")] == "connect"
        assert reasons[("pgwrong", "postgres")] == "auth"
        assert reasons[("pgurl", "postgres")] == "auth"
        assert ("ok", "pgbouncer") not in reasons and ("db", "postgres") not in reasons

        target.kill()  # PgBouncer restart: every console connection fails, then comes back
        time.sleep(1.2)
        _scrape_everything(base, answers)
        target.start()
        time.sleep(1.2)
        after = _scrape_everything(base, answers)
        assert 'pgbouncer_up{target="ok"} 1.0' in after["/metrics None"]

        proc.send_signal(signal.SIGHUP)  # a reload logs the new config's targets
        _wait_for_line(stderr, '"config reloaded"', 10)
        time.sleep(1.2)
        _scrape_everything(base, answers)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    logs = stderr.read_text() + (tmp_path / "stdout.log").read_text()

    doctor = subprocess.run(
        [
            sys.executable,
            "-m",
            "poolwatch.cli",
            "doctor",
            "--config",
            str(config),
            "--format",
            "json",
            "--sample-seconds",
            "0",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert doctor.returncode in (0, 1), doctor.stderr
    json.loads(doctor.stdout)
    check = subprocess.run(
        [sys.executable, "-m", "poolwatch.cli", "check-config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stderr

    # what was captured is substantial: debug lines, failures with their reasons, the inline warning
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert any(line["level"] == "debug" for line in lines)
    assert any(line.get("event") == "target down" and line.get("reason") == "auth" for line in lines)
    assert any("password is written in the DSN" in line.get("event", "") for line in lines)
    assert "Traceback" not in logs
    everything = "\n".join([logs, *answers, doctor.stdout, doctor.stderr, check.stdout, check.stderr])
    for name, value in all_secrets.items():
        assert value not in everything, f"the {name} password leaked"


def test_password_never_on_the_command_line_of_servers_or_daemon(
    pg: PostgresServer, pgb: PgBouncerServer
) -> None:
    """The throwaway servers and the documented daemon invocation keep passwords out of argv."""
    for pid in (pg.pid, pgb.pid):
        assert pid is not None
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace")
        assert pgb.stats_password not in cmdline and pg.app_password not in cmdline


# ------------------------------------------------------------------------------------------------
# Bad configuration and arguments: one line, exit 2, no traceback
# ------------------------------------------------------------------------------------------------
def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.fixture
def busy_port() -> Iterator[int]:
    with _listening_socket() as sock:
        yield int(sock.getsockname()[1])


def _files(tmp_path: Path) -> dict[str, Path]:
    """Every file a case below refers to, by name."""
    made = {
        "web_bad_yaml": "tls_server_config: [\n",
        "web_unknown_key": "tls_server_confg: {}\n",
        "web_missing_cert": "tls_server_config:\n  cert_file: /nonexistent/c.pem\n  key_file: {key}\n",
        "web_bad_hash": "basic_auth_users:\n  alice: notahash\n",
        "key": "not really a key\n",
    }
    paths = {}
    for name, text in made.items():
        path = tmp_path / f"{name}.txt"
        path.write_text(text.replace("{key}", str(tmp_path / "key.txt")))
        paths[name] = path
    (tmp_path / "pwdir").mkdir()
    paths["pwdir"] = tmp_path / "pwdir"
    latin1 = tmp_path / "latin1.pw"
    latin1.write_bytes("pässword\n".encode("latin-1"))
    paths["latin1_pw"] = latin1
    locked = tmp_path / "locked.pw"
    locked.write_text("secret\n")
    locked.chmod(0)
    paths["locked_pw"] = locked
    configs = {
        "cfg_pwdir": f"pgbouncers:\n  - name: a\n    password_file: {paths['pwdir']}\n",
        "cfg_latin1_pw": f"pgbouncers:\n  - name: a\n    password_file: {latin1}\n",
        "cfg_locked_pw": f"pgbouncers:\n  - name: a\n    password_file: {locked}\n",
        "cfg_ca_missing": (
            "postgres:\n  - name: p\n    sslmode: verify-full\n    sslrootcert: /nonexistent/ca.pem\n"
        ),
        "cfg_web_missing": "web_config: /nonexistent/web.yml\npgbouncers:\n  - name: a\n",
        "cfg_listen_negative": "listen: '127.0.0.1:-1'\npgbouncers:\n  - name: a\n",
    }
    for name, text in configs.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        paths[name] = path
    not_utf8 = tmp_path / "not-utf8.yaml"
    not_utf8.write_bytes(b"pgbouncers:\n  - name: \xff\xfe\n")
    paths["cfg_not_utf8"] = not_utf8
    return paths


TARGET = ["--pgbouncer", "host=127.0.0.1 port=1 user=poolwatch", "--listen", "127.0.0.1:0"]

#: (case, argv with {file} placeholders, expected text of the one line)
BAD_INPUT = [
    (
        "web config missing",
        ["run", *TARGET, "--web-config", "/nonexistent/web.yml"],
        "web config file does not exist",
    ),
    ("web config invalid YAML", ["run", *TARGET, "--web-config", "{web_bad_yaml}"], "invalid YAML"),
    (
        "web config unknown key",
        ["run", *TARGET, "--web-config", "{web_unknown_key}"],
        "tls_server_confg: unknown key",
    ),
    (
        "web config cert missing",
        ["run", *TARGET, "--web-config", "{web_missing_cert}"],
        "cert_file: file '/nonexistent/c.pem' does not exist",
    ),
    (
        "web config plain password",
        ["run", *TARGET, "--web-config", "{web_bad_hash}"],
        "not a bcrypt hash (value not shown",
    ),
    (
        "web config named in the file",
        ["run", "--config", "{cfg_web_missing}"],
        "web config file does not exist",
    ),
    ("check-config web config", ["check-config", "{cfg_web_missing}"], "web config file does not exist"),
    (
        "sample seconds negative",
        ["doctor", *TARGET[:2], "--sample-seconds", "-1"],
        "--sample-seconds: must be",
    ),
    (
        "sample seconds infinite",
        ["doctor", *TARGET[:2], "--sample-seconds", "inf"],
        "--sample-seconds: must be",
    ),
    ("sample seconds nan", ["doctor", *TARGET[:2], "--sample-seconds", "nan"], "--sample-seconds: must be"),
    (
        "sample seconds text",
        ["doctor", *TARGET[:2], "--sample-seconds", "soon"],
        "invalid float value: 'soon'",
    ),
    ("password file is a directory", ["check-config", "{cfg_pwdir}"], "does not exist or is not a file"),
    (
        "password file is a directory (run)",
        ["run", "--config", "{cfg_pwdir}"],
        "does not exist or is not a file",
    ),
    ("password file not UTF-8", ["run", "--config", "{cfg_latin1_pw}"], "is not UTF-8 text (byte 1)"),
    ("password file unreadable", ["check-config", "{cfg_locked_pw}"], "is not readable"),
    (
        "CA file missing",
        ["check-config", "{cfg_ca_missing}"],
        "sslrootcert: CA file '/nonexistent/ca.pem' does not exist",
    ),
    ("config not UTF-8", ["check-config", "{cfg_not_utf8}"], "not UTF-8 text (byte 22)"),
    ("config not UTF-8 (run)", ["run", "--config", "{cfg_not_utf8}"], "not UTF-8 text (byte 22)"),
    ("config is a directory", ["run", "--config", "{pwdir}"], "is a directory, not a config file"),
    ("config missing", ["run", "--config", "/nonexistent/poolwatch.yaml"], "config file does not exist"),
    (
        "listen host unresolvable",
        ["run", *TARGET[:2], "--listen", "poolwatch-no-such-host.invalid:0"],
        "listen: cannot listen on poolwatch-no-such-host.invalid:0",
    ),
    (
        "listen port in use",
        ["run", *TARGET[:2], "--listen", "127.0.0.1:{busy_port}"],
        "address already in use",
    ),
    (
        "listen port out of range",
        ["run", *TARGET[:2], "--listen", "127.0.0.1:70000"],
        "listen.port: Input should be less than or equal to 65535",
    ),
    ("listen port negative", ["run", "--config", "{cfg_listen_negative}"], "is not HOST:PORT"),
    (
        "bad DSN on the command line",
        ["run", "--pgbouncer", "host=x port", "--listen", "127.0.0.1:0"],
        "not a valid connection string",
    ),
    (
        "bad log level",
        ["run", *TARGET, "--log-level", "verbose"],
        "argument --log-level: invalid choice: 'verbose'",
    ),
    ("unknown command", ["frobnicate"], "invalid choice: 'frobnicate'"),
]


def _argv(template: list[str], files: dict[str, Path], port: int) -> list[str]:
    values = {**{k: str(v) for k, v in files.items()}, "busy_port": str(port)}
    return [part.format(**values) if "{" in part else part for part in template]


@pytest.mark.parametrize(("case", "argv", "expected"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(
    case: str,
    argv: list[str],
    expected: str,
    tmp_path: Path,
    busy_port: int,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if case == "password file unreadable" and os.geteuid() == 0:
        pytest.skip("root reads a chmod 000 file; the directory case covers an unusable password file")
    for var in ("POOLWATCH_CONFIG", "POOLWATCH_PGBOUNCER_DSN", "POOLWATCH_POSTGRES_DSN", "POOLWATCH_LISTEN"):
        monkeypatch.delenv(var, raising=False)
    files = _files(tmp_path)
    try:
        code = main(_argv(argv, files, busy_port))
    except SystemExit as exc:  # argparse exits by itself, with the same one-line contract
        code = exc.code if isinstance(exc.code, int) else 1
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("poolwatch"), lines
    assert expected in lines[0], lines[0]


def test_config_from_the_environment_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POOLWATCH_CONFIG", "/nonexistent/from-env.yaml")
    assert main(["run"]) == 2
    assert (
        capsys.readouterr().err.strip() == "poolwatch: /nonexistent/from-env.yaml: config file does not exist"
    )


@pytest.mark.parametrize(
    "case",
    ["config not UTF-8 (run)", "listen port in use", "password file not UTF-8", "sample seconds infinite"],
)
def test_bad_input_as_a_process_has_no_traceback(case: str, tmp_path: Path, busy_port: int) -> None:
    _, argv, expected = next(c for c in BAD_INPUT if c[0] == case)
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOLWATCH_")}
    proc = subprocess.run(
        [sys.executable, "-m", "poolwatch.cli", *_argv(argv, _files(tmp_path), busy_port)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
