"""TLS from poolwatch to PostgreSQL and to PgBouncer, against servers with a certificate made here.

A throwaway CA signs a server certificate for 127.0.0.1 only (no DNS name), so:

* ``verify-full`` to 127.0.0.1 with ``sslrootcert`` = that CA connects;
* ``verify-ca`` connects even by the name ``localhost`` (it checks the chain, not the name);
* ``verify-full`` by the name ``localhost`` fails on the name, and any mode with another CA fails on
  the chain: both with reason ``connect`` and a detail that names TLS and what to check.

PostgreSQL runs with ``ssl = on``; PgBouncer with ``client_tls_sslmode = require``. The sessions are
checked to really be encrypted (``pg_stat_ssl``, ``SHOW CLIENTS``'s ``tls`` column).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from poolwatch.localcluster import PgBouncerServer, PostgresServer
from tests.daemon import make_config, pick, running_daemon, secret_env


# ------------------------------------------------------------------------------------------------
# Certificates
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the CA that signed the server certificate
    other_ca: Path  # a CA that signed nothing here
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("poolwatch test server"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def make_tls_files(directory: Path, owner: str = "postgres") -> TlsFiles:
    """CA, other CA, and a server key + certificate for 127.0.0.1, readable by the server's OS user
    (the key 0600, as PostgreSQL insists)."""
    ca_key, ca_cert = _ca("poolwatch test CA")
    _, other_cert = _ca("some other CA")
    key, cert = _server_cert(ca_key, ca_cert)
    pem = serialization.Encoding.PEM
    files = TlsFiles(
        directory / "ca.pem", directory / "other-ca.pem", directory / "server.crt", directory / "server.key"
    )
    files.ca.write_bytes(ca_cert.public_bytes(pem))
    files.other_ca.write_bytes(other_cert.public_bytes(pem))
    files.cert.write_bytes(cert.public_bytes(pem))
    files.key.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    files.key.chmod(0o600)
    if os.geteuid() == 0:
        entry = pwd.getpwnam(owner)
        for path in (directory, files.cert, files.key):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        directory.chmod(0o755)
    return files


@contextlib.contextmanager
def private_dir(prefix: str) -> Iterator[Path]:
    # not tmp_path: pytest keeps its base directory 0700 root, the postgres OS user must enter ours
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_files() -> Iterator[TlsFiles]:
    with private_dir("pw-tls-certs-") as directory:
        yield make_tls_files(directory)


def _target(kind_defaults: dict[str, Any], name: str, ca: Path | None, **extra: Any) -> dict[str, Any]:
    target = {**kind_defaults, "name": name, **extra}
    if ca is not None:
        target["sslrootcert"] = str(ca)
    return target


def _failing(body: str) -> dict[str, dict[str, Any]]:
    return {f"{f['target']}/{f['kind']}": f for f in json.loads(body)["failing"]}


TLS_COLLECTION = {"timeout": 2, "interval": 0.5, "max_age": 0}
TLS_PROBES = {"interval": 0.5, "timeout": 2}


# ------------------------------------------------------------------------------------------------
# PostgreSQL with ssl = on
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_pg(tls_files: TlsFiles) -> Iterator[PostgresServer]:
    with private_dir("pw-tls-pg-") as base:
        settings: dict[str, str | bool] = {
            "ssl": True,
            "ssl_cert_file": str(tls_files.cert),
            "ssl_key_file": str(tls_files.key),
        }
        server = PostgresServer(base, settings=settings)
        try:
            server.start()
            yield server
        finally:
            server.stop("immediate")


async def test_postgres_over_tls_verify_full_and_verify_ca(
    tls_pg: PostgresServer, tls_files: TlsFiles
) -> None:
    base = {
        "host": tls_pg.host,
        "port": tls_pg.port,
        "user": tls_pg.monitor_user,
        "dbname": "postgres",
        "password_env": secret_env(tls_pg.monitor_password),
        "connect_timeout": 2,
    }
    config = make_config(
        postgres=[
            _target(base, "full", tls_files.ca, sslmode="verify-full"),
            _target(base, "ca-by-name", tls_files.ca, sslmode="verify-ca", host="localhost"),
            _target(base, "full-by-name", tls_files.ca, sslmode="verify-full", host="localhost"),
            _target(base, "other-ca", tls_files.other_ca, sslmode="verify-full"),
        ],
        collection=TLS_COLLECTION,
        probes=TLS_PROBES,
    )
    async with running_daemon(config) as daemon:
        samples = await daemon.metrics()
        assert pick(samples, "pg_up", target="full") == 1
        assert pick(samples, "pg_up", target="ca-by-name") == 1
        assert pick(samples, "pg_up", target="full-by-name") == 0
        assert pick(samples, "pg_up", target="other-ca") == 0
        await daemon.wait_for("poolwatch_probe_success", 1, target="full", kind="postgres")
        _, body = await daemon.get("/readyz")
        failing = _failing(body)
        for name in ("full-by-name", "other-ca"):
            entry = failing[f"{name}/postgres"]
            assert entry["reason"] == "connect", entry
            assert entry["detail"].startswith("TLS to postgresql://"), entry
            assert "sslrootcert" in entry["detail"], entry
        assert "certificate verify failed" in failing["other-ca/postgres"]["detail"]
        assert "127.0.0.1" not in failing["full-by-name/postgres"]["detail"].split(":", 1)[0]
        assert "full/postgres" not in failing and "ca-by-name/postgres" not in failing
        # the sessions really are encrypted
        rows = tls_pg.execute(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)"
            " WHERE a.application_name = 'poolwatch'"
        )
        assert rows and all(ssl for (ssl,) in rows), rows


# ------------------------------------------------------------------------------------------------
# PgBouncer with client_tls_sslmode = require
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def tls_pgbouncer(
    pg: PostgresServer, tls_files: TlsFiles, pgbouncer_118_binary: str
) -> Iterator[PgBouncerServer]:
    with private_dir("pw-tls-pgb-") as base:
        server = PgBouncerServer(
            base,
            pg,
            pgbouncer_118_binary,
            client_tls_sslmode="require",
            client_tls_cert_file=str(tls_files.cert),
            client_tls_key_file=str(tls_files.key),
        )
        try:
            server.start()
            yield server
        finally:
            server.stop()


async def test_pgbouncer_over_tls_verify_full_and_verify_ca(
    tls_pgbouncer: PgBouncerServer, tls_files: TlsFiles
) -> None:
    pgb = tls_pgbouncer
    base = {
        "host": pgb.host,
        "port": pgb.port,
        "user": pgb.stats_user,
        "password_env": secret_env(pgb.stats_password),
        "connect_timeout": 2,
    }
    config = make_config(
        pgbouncers=[
            _target(base, "full", tls_files.ca, sslmode="verify-full", probe={"databases": ["app"]}),
            _target(base, "ca-by-name", tls_files.ca, sslmode="verify-ca", host="localhost"),
            _target(base, "full-by-name", tls_files.ca, sslmode="verify-full", host="localhost"),
            _target(base, "other-ca", tls_files.other_ca, sslmode="verify-full"),
            _target(base, "plaintext", None, sslmode="disable"),
        ],
        collection=TLS_COLLECTION,
        probes=TLS_PROBES,
    )
    async with running_daemon(config) as daemon:
        samples = await daemon.metrics()
        assert pick(samples, "pgbouncer_up", target="full") == 1
        assert pick(samples, "pgbouncer_up", target="ca-by-name") == 1
        for name in ("full-by-name", "other-ca", "plaintext"):
            assert pick(samples, "pgbouncer_up", target=name) == 0, name
        # the probe through PgBouncer uses the same TLS settings
        assert (
            await daemon.wait_for(
                "poolwatch_probe_success", 1, target="full", kind="pgbouncer", database="app"
            )
            == 1
        )
        _, body = await daemon.get("/readyz")
        failing = _failing(body)
        for name in ("full-by-name", "other-ca"):
            entry = failing[f"{name}/pgbouncer"]
            assert entry["reason"] == "connect", entry
            assert entry["detail"].startswith("TLS"), entry
        by_name, other_ca = (
            failing["full-by-name/pgbouncer"]["detail"],
            failing["other-ca/pgbouncer"]["detail"],
        )
        assert "not for this host name" in by_name and "verify-ca" in by_name
        assert "sslrootcert" in other_ca and "certificate verify failed" in other_ca
        plaintext = failing["plaintext/pgbouncer"]
        assert plaintext["reason"] in ("connect", "config"), plaintext
        assert "TLS" in plaintext["detail"] or "SSL" in plaintext["detail"], plaintext
        assert "full/pgbouncer" not in failing and "ca-by-name/pgbouncer" not in failing
        clients = [
            row for row in pgb.show("CLIENTS", admin=True) if row.get("application_name") == "poolwatch"
        ]
        assert clients and all(row["tls"] for row in clients), clients
