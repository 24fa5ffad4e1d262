"""Web config (exporter-toolkit format): real aiohttp servers on loopback port 0, real TLS with
certificates made here, and the exact one-line errors operators see."""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import ipaddress
import ssl
import textwrap
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st
from pytest import MonkeyPatch

from poolwatch import webconfig
from poolwatch.webconfig import (
    WebConfig,
    WebConfigError,
    apply,
    basic_auth_middleware,
    hash_password,
    load_web_config,
    parse_basic_authorization,
)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# Cost 4 keeps the suite fast; the code paths are the same as at cost 10.
ALICE_PASSWORD = "correct horse battery staple"
ALICE_HASH = hash_password(ALICE_PASSWORD, rounds=4)
BOB_HASH = hash_password("bobs secret", rounds=4)
ALICE = {"Authorization": basic("alice", ALICE_PASSWORD)}
PATHS = ("/", "/metrics", "/healthz", "/readyz", "/does-not-exist", "/metrics?name[]=x")


# --- certificates -----------------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path  # signed by the CA, SAN DNS:scraper.example
    client_key: Path
    other_client_cert: Path  # signed by the CA, SAN DNS:intruder.example
    other_client_key: Path
    rogue_cert: Path  # self-signed, same SAN as client_cert: must not pass
    rogue_key: Path
    second_server_cert: Path  # same key as server_cert, another serial: for the reload test
    wrong_key: Path  # a key matching nothing


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, signing_key = (issuer[0].subject, issuer[1]) if issuer else (name, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
                       critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                          key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _cert("poolwatch test CA", ca_key, None, ca=True)
    server_key = _key()
    server_sans: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                           x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    client_key, other_key, rogue_key = _key(), _key(), _key()
    client_san: list[x509.GeneralName] = [x509.DNSName("scraper.example")]
    return Pki(
        ca=_write_cert(d / "ca.crt", ca),
        server_cert=_write_cert(d / "server.crt", _cert(
            "localhost", server_key, (ca, ca_key), sans=server_sans, usage=ExtendedKeyUsageOID.SERVER_AUTH)),
        server_key=_write_key(d / "server.key", server_key),
        client_cert=_write_cert(d / "client.crt", _cert("scraper", client_key, (ca, ca_key), sans=client_san,
                                                        usage=ExtendedKeyUsageOID.CLIENT_AUTH)),
        client_key=_write_key(d / "client.key", client_key),
        other_client_cert=_write_cert(d / "other.crt", _cert(
            "intruder", other_key, (ca, ca_key), sans=[x509.DNSName("intruder.example")],
            usage=ExtendedKeyUsageOID.CLIENT_AUTH)),
        other_client_key=_write_key(d / "other.key", other_key),
        rogue_cert=_write_cert(d / "rogue.crt", _cert("scraper", rogue_key, None, sans=client_san,
                                                      usage=ExtendedKeyUsageOID.CLIENT_AUTH)),
        rogue_key=_write_key(d / "rogue.key", rogue_key),
        second_server_cert=_write_cert(d / "server2.crt", _cert(
            "localhost", server_key, (ca, ca_key), sans=server_sans, usage=ExtendedKeyUsageOID.SERVER_AUTH)),
        wrong_key=_write_key(d / "wrong.key", _key()),
    )


def client_context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


# --- servers ----------------------------------------------------------------------------------------


def plain_app() -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text=f"ok {request.path}\n")

    app = web.Application()
    for path in ("/", "/metrics", "/healthz", "/readyz"):
        app.router.add_route("*", path, ok)
    return app


@asynccontextmanager
async def serve(app: web.Application, context: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"{'https' if context else 'http'}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def write(tmp_path: Path, text: str, name: str = "web.yml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def count_bcrypt(monkeypatch: MonkeyPatch) -> list[bytes]:
    """Every hash bcrypt.checkpw is asked about, in order."""
    seen: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        seen.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    return seen


def users_config(**extra: Any) -> WebConfig:
    return webconfig.web_config_from_mapping(
        {"basic_auth_users": {"alice": ALICE_HASH, "bob": BOB_HASH}, **extra}, "web.yml")


# --- basic auth -------------------------------------------------------------------------------------

BAD_CREDENTIALS: dict[str, dict[str, str]] = {
    "none": {},
    "wrong password": {"Authorization": basic("alice", "wrong")},
    "unknown user": {"Authorization": basic("mallory", ALICE_PASSWORD)},
    "other user's password": {"Authorization": basic("bob", ALICE_PASSWORD)},
    "empty": {"Authorization": basic("", "")},
    "bearer": {"Authorization": "Bearer abc"},
    "bad base64": {"Authorization": "Basic !!!"},
    "no colon": {"Authorization": "Basic " + base64.b64encode(b"alice").decode()},
    "scheme only": {"Authorization": "Basic"},
}


async def test_every_path_and_method_needs_credentials_and_refusals_look_alike() -> None:
    app = plain_app()
    apply(app, users_config())
    answers = set()
    async with serve(app) as url, aiohttp.ClientSession() as session:
        for path in PATHS:
            for method in ("GET", "HEAD", "POST"):
                for case, headers in BAD_CREDENTIALS.items():
                    async with session.request(method, url + path, headers=headers) as resp:
                        body = await resp.read()
                        assert resp.status == 401, (path, method, case)
                        assert resp.headers.getall("WWW-Authenticate") == ["Basic"], (path, case)
                        answers.add((method, body, resp.headers["Content-Type"]))
    # Nothing in the answer tells which part was wrong: one answer per method (HEAD has no body).
    assert answers == {("GET", b"Unauthorized\n", "text/plain; charset=utf-8"),
                       ("POST", b"Unauthorized\n", "text/plain; charset=utf-8"),
                       ("HEAD", b"", "text/plain; charset=utf-8")}


async def test_right_credentials_reach_every_path() -> None:
    app = plain_app()
    apply(app, users_config())
    async with serve(app) as url, aiohttp.ClientSession() as session:
        for path in ("/", "/metrics", "/healthz", "/readyz"):
            async with session.get(url + path, headers=ALICE) as resp:
                assert resp.status == 200
                assert await resp.text() == f"ok {path}\n"
        async with session.get(url + "/does-not-exist",
                               headers={"Authorization": basic("bob", "bobs secret")}) as resp:
            assert resp.status == 404  # past auth, the app's own answers


async def test_scheme_is_case_insensitive() -> None:
    app = plain_app()
    apply(app, users_config())
    async with serve(app) as url, aiohttp.ClientSession() as session:
        header = "bAsIc " + basic("alice", ALICE_PASSWORD).split(" ", 1)[1]
        async with session.get(url + "/metrics", headers={"Authorization": header}) as resp:
            assert resp.status == 200


async def test_successes_are_cached_failures_are_not(count_bcrypt: list[bytes]) -> None:
    app = plain_app()
    apply(app, users_config())
    good = {"Authorization": basic("alice", ALICE_PASSWORD)}
    async with serve(app) as url, aiohttp.ClientSession() as session:
        for _ in range(5):
            async with session.get(url + "/metrics", headers=good) as resp:
                assert resp.status == 200
        assert len(count_bcrypt) == 1
        wrong = {"Authorization": basic("alice", "nope")}
        for _ in range(3):
            async with session.get(url + "/metrics", headers=wrong) as resp:
                assert resp.status == 401
        assert len(count_bcrypt) == 4
        # the cached success still holds, and is per password: a wrong one did not evict it
        async with session.get(url + "/metrics", headers=good) as resp:
            assert resp.status == 200
        assert len(count_bcrypt) == 4


async def test_concurrent_first_scrapes_share_one_bcrypt(count_bcrypt: list[bytes]) -> None:
    app = plain_app()
    apply(app, users_config())
    good = {"Authorization": basic("alice", ALICE_PASSWORD)}
    async with serve(app) as url, aiohttp.ClientSession() as session:

        async def get() -> int:
            async with session.get(url + "/metrics", headers=good) as resp:
                return resp.status

        assert await asyncio.gather(*(get() for _ in range(8))) == [200] * 8
    assert len(count_bcrypt) == 1


async def test_cache_expires() -> None:
    now = [1000.0]
    calls: list[int] = []
    middleware = basic_auth_middleware(users_config(), cache_ttl=60.0, clock=lambda: now[0])
    assert middleware is not None

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok")

    app = web.Application(middlewares=[middleware])
    app.router.add_get("/metrics", handler)
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(1)
        return real(password, hashed)

    good = {"Authorization": basic("alice", ALICE_PASSWORD)}
    with MonkeyPatch.context() as mp:
        mp.setattr(bcrypt, "checkpw", counting)
        async with serve(app) as url, aiohttp.ClientSession() as session:
            for step in (0.0, 59.0, 2.0, 1.0):
                now[0] += step
                async with session.get(url + "/metrics", headers=good) as resp:
                    assert resp.status == 200
    assert len(calls) == 2  # first, then again once 60 s had passed


async def test_unknown_user_costs_one_bcrypt_at_the_configured_cost(count_bcrypt: list[bytes]) -> None:
    app = plain_app()
    apply(app, users_config())
    mallory = {"Authorization": basic("mallory", "x")}
    async with serve(app) as url, aiohttp.ClientSession() as session, session.get(url, headers=mallory) as r:
        assert r.status == 401
    assert len(count_bcrypt) == 1
    assert count_bcrypt[0].startswith(b"$2b$04$")
    assert count_bcrypt[0] not in (ALICE_HASH.encode(), BOB_HASH.encode())


async def test_overlong_password_is_refused_without_error(count_bcrypt: list[bytes]) -> None:
    long_password = "p" * 80
    hashed = bcrypt.hashpw(long_password[:72].encode(), bcrypt.gensalt(4)).decode()
    app = plain_app()
    apply(app, webconfig.web_config_from_mapping({"basic_auth_users": {"carol": hashed}}, "web.yml"))
    async with serve(app) as url, aiohttp.ClientSession() as session:
        for password in (long_password, "pw\x00with nul"):
            async with session.get(url + "/", headers={"Authorization": basic("carol", password)}) as resp:
                assert resp.status == 401
        async with session.get(url, headers={"Authorization": basic("carol", long_password[:72])}) as resp:
            assert resp.status == 200


async def test_no_users_means_no_auth() -> None:
    assert basic_auth_middleware(WebConfig()) is None
    app = plain_app()
    apply(app, WebConfig())
    async with serve(app) as url, aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        assert resp.status == 200


async def test_apply_guards_the_real_poolwatch_app() -> None:
    from poolwatch.server import make_app

    def no_engine() -> Any:
        raise AssertionError("a refused request must not reach a handler")

    app = make_app(no_engine)
    apply(app, users_config())
    async with serve(app) as url, aiohttp.ClientSession() as session:
        for path in ("/", "/metrics", "/readyz", "/healthz"):
            async with session.get(url + path) as resp:
                assert resp.status == 401
        async with session.get(url + "/healthz", headers=ALICE) as resp:
            assert resp.status == 200


async def test_guards_run_before_existing_middlewares() -> None:
    reached: list[str] = []

    @web.middleware
    async def existing(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        reached.append(request.path)
        response: web.StreamResponse = await handler(request)
        return response

    app = plain_app()
    app.middlewares.append(existing)
    apply(app, users_config())
    async with serve(app) as url, aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        assert resp.status == 401
    assert reached == []


@given(st.text())
def test_authorization_parser_never_raises(header: str) -> None:
    parse_basic_authorization(header)
    parse_basic_authorization("Basic " + header)


@given(st.binary().filter(lambda b: b":" not in b), st.binary())
def test_authorization_parser_round_trips(user: bytes, password: bytes) -> None:
    header = "Basic " + base64.b64encode(user + b":" + password).decode()
    assert parse_basic_authorization(header) == (user, password)


# --- headers and rate limit ---------------------------------------------------------------------------


async def test_configured_headers_on_every_answer() -> None:
    config = users_config(http_server_config={"headers": {
        "X-Frame-Options": "deny", "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'", "X-XSS-Protection": ""}})
    app = plain_app()
    apply(app, config)
    good = {"Authorization": basic("alice", ALICE_PASSWORD)}
    async with serve(app) as url, aiohttp.ClientSession() as session:
        for path, headers, status in (("/metrics", good, 200), ("/metrics", {}, 401), ("/nope", good, 404)):
            async with session.get(url + path, headers=headers) as resp:
                assert resp.status == status
                assert resp.headers["X-Frame-Options"] == "deny"
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
                assert resp.headers["Content-Security-Policy"] == "default-src 'none'"
                assert "X-XSS-Protection" not in resp.headers  # blank means unset


async def test_rate_limit() -> None:
    config = webconfig.web_config_from_mapping({"rate_limit": {"interval": "1h", "burst": 2}}, "web.yml")
    app = plain_app()
    apply(app, config)
    async with serve(app) as url, aiohttp.ClientSession() as session:
        statuses = []
        for _ in range(3):
            async with session.get(url + "/metrics") as resp:
                statuses.append(resp.status)
    assert statuses == [200, 200, 429]


def test_ipv6_sans_compare_as_addresses() -> None:
    # Python spells IPv6 SANs in full and upper case; configs are written the Go (short) way
    assert webconfig._same_san("2001:DB8:0:0:0:0:0:1\n", "2001:db8::1")
    assert not webconfig._same_san("2001:DB8:0:0:0:0:0:2", "2001:db8::1")
    assert not webconfig._same_san("scraper.example.evil", "scraper.example")


def test_go_durations() -> None:
    def interval(value: object) -> float:
        config = webconfig.web_config_from_mapping({"rate_limit": {"interval": value, "burst": 1}}, "w")
        return config.rate_limit.interval

    assert interval("1m30s") == 90.0
    assert interval("250ms") == 0.25
    assert interval(0) == 0.0
    assert webconfig.rate_limit_middleware(
        webconfig.web_config_from_mapping({"rate_limit": {"interval": "0s"}}, "w")) is None


# --- TLS ----------------------------------------------------------------------------------------------


def tls_config(tmp_path: Path, pki: Pki, extra: str = "", users: bool = False) -> WebConfig:
    text = (f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {pki.server_key}\n"
            + textwrap.indent(textwrap.dedent(extra), "  "))
    if users:
        text += f"basic_auth_users:\n  alice: {ALICE_HASH}\n"
    return load_web_config(write(tmp_path, text))


async def test_tls_handshake_with_the_ca_and_tls12_minimum(tmp_path: Path, pki: Pki) -> None:
    config = tls_config(tmp_path, pki, users=True)
    context = config.ssl_context()
    assert context is not None
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE
    app = plain_app()
    apply(app, config)
    async with serve(app, context) as url:
        assert url.startswith("https://")
        connector = aiohttp.TCPConnector(ssl=client_context(pki))
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.get(url + "/metrics") as resp:
                assert resp.status == 401
            async with session.get(url + "/metrics",
                                   headers={"Authorization": basic("alice", ALICE_PASSWORD)}) as resp:
                assert resp.status == 200
        _, writer = await asyncio.open_connection("127.0.0.1", port_of(url), ssl=client_context(pki))
        assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"  # the best both sides speak
        writer.close()

        # a client that does not trust our CA refuses the server
        public_cas = aiohttp.TCPConnector(ssl=ssl.create_default_context())
        async with aiohttp.ClientSession(connector=public_cas) as s:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await s.get(url + "/metrics")

        # TLS 1.1 and below are refused by default
        old = client_context(pki)
        old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        with warnings.catch_warnings():  # naming TLS 1.1 is deprecated, which is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.open_connection("127.0.0.1", port_of(url), ssl=old)


async def test_plain_http_to_the_tls_port_fails(tmp_path: Path, pki: Pki) -> None:
    config = tls_config(tmp_path, pki)
    async with serve(plain_app(), config.ssl_context()) as url:
        port = port_of(url)
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    await resp.read()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=5)
        writer.close()
        assert not answer.startswith(b"HTTP/")
        assert b"ok /metrics" not in answer


async def test_min_version_tls13_refuses_tls12_clients(tmp_path: Path, pki: Pki) -> None:
    config = tls_config(tmp_path, pki, "min_version: TLS13\n")
    async with serve(plain_app(), config.ssl_context()) as url:
        port = port_of(url)
        tls12 = client_context(pki)
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.open_connection("127.0.0.1", port, ssl=tls12)
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(pki))
        assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
        writer.close()


@pytest.mark.parametrize("curve", ["CurveP256", "CurveP384", "CurveP521", "X25519"])
async def test_each_curve_handshakes(tmp_path: Path, pki: Pki, curve: str) -> None:
    config = tls_config(tmp_path, pki, f"curve_preferences: [{curve}]\n")
    async with serve(plain_app(), config.ssl_context()) as url:
        assert await _status(url, client_context(pki)) == 200


async def _status(url: str, context: ssl.SSLContext) -> int:
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, force_close=True)) as session,
        session.get(url + "/metrics") as resp,
    ):
        await resp.read()
        return resp.status


CLIENT_FAILURES = (aiohttp.ClientError, ssl.SSLError, ConnectionError)


async def test_client_cert_required(tmp_path: Path, pki: Pki) -> None:
    config = tls_config(tmp_path, pki, f"""\
        client_auth_type: RequireAndVerifyClientCert
        client_ca_file: {pki.ca}
        """)
    context = config.ssl_context()
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED
    async with serve(plain_app(), context) as url:
        assert await _status(url, client_context(pki, pki.client_cert, pki.client_key)) == 200
        with pytest.raises(CLIENT_FAILURES):
            await _status(url, client_context(pki))  # no certificate
        with pytest.raises(CLIENT_FAILURES):
            await _status(url, client_context(pki, pki.rogue_cert, pki.rogue_key))  # not from our CA


async def test_verify_client_cert_if_given(tmp_path: Path, pki: Pki) -> None:
    config = tls_config(tmp_path, pki, f"""\
        client_auth_type: VerifyClientCertIfGiven
        client_ca_file: {pki.ca}
        """)
    async with serve(plain_app(), config.ssl_context()) as url:
        assert await _status(url, client_context(pki)) == 200
        assert await _status(url, client_context(pki, pki.client_cert, pki.client_key)) == 200
        with pytest.raises(CLIENT_FAILURES):
            await _status(url, client_context(pki, pki.rogue_cert, pki.rogue_key))


async def test_client_allowed_sans(tmp_path: Path, pki: Pki) -> None:
    config = tls_config(tmp_path, pki, f"""\
        client_auth_type: RequireAndVerifyClientCert
        client_ca_file: {pki.ca}
        client_allowed_sans: [scraper.example, "2001:db8::1"]
        """)
    app = plain_app()
    apply(app, config)
    async with serve(app, config.ssl_context()) as url:
        assert await _status(url, client_context(pki, pki.client_cert, pki.client_key)) == 200
        assert await _status(url, client_context(pki, pki.other_client_cert, pki.other_client_key)) == 403


async def test_inline_certificate_and_key(tmp_path: Path, pki: Pki) -> None:
    config = webconfig.web_config_from_mapping({"tls_server_config": {
        "cert": pki.server_cert.read_text(), "key": pki.server_key.read_text(),
        "client_ca": pki.ca.read_text(), "client_auth_type": "RequireAndVerifyClientCert"}}, "web.yml")
    assert "PRIVATE KEY" not in repr(config)
    async with serve(plain_app(), config.ssl_context()) as url:
        assert await _status(url, client_context(pki, pki.client_cert, pki.client_key)) == 200


def _served_certificate(port: int, pki: Pki) -> Any:
    async def get() -> bytes:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(pki))
        der: bytes = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return der

    return get()


async def test_rotated_certificate_is_picked_up_without_restart(tmp_path: Path, pki: Pki) -> None:
    cert = tmp_path / "live.crt"
    cert.write_bytes(pki.server_cert.read_bytes())
    config = load_web_config(write(tmp_path, f"""\
        tls_server_config:
          cert_file: live.crt
          key_file: {pki.server_key}
        """))
    first, second = (x509.load_pem_x509_certificate(p.read_bytes()).public_bytes(serialization.Encoding.DER)
                     for p in (pki.server_cert, pki.second_server_cert))
    async with serve(plain_app(), config.ssl_context()) as url:
        port = port_of(url)
        assert await _served_certificate(port, pki) == first
        # a broken rotation (garbage lands first) keeps the old certificate in service
        staged = tmp_path / "staged"
        staged.write_text("not a certificate\n")
        staged.replace(cert)
        assert await _served_certificate(port, pki) == first
        staged.write_bytes(pki.second_server_cert.read_bytes())
        staged.replace(cert)
        assert await _served_certificate(port, pki) == second


def test_no_tls_section_means_no_context(tmp_path: Path) -> None:
    assert WebConfig().ssl_context() is None
    config = load_web_config(write(tmp_path, f"basic_auth_users:\n  alice: {ALICE_HASH}\n"))
    assert config.ssl_context() is None
    assert config.auth_enabled and not config.tls_enabled
    assert load_web_config(write(tmp_path, "")).tls_enabled is False


def test_relative_paths_are_relative_to_the_file(tmp_path: Path, pki: Pki, monkeypatch: MonkeyPatch) -> None:
    conf = tmp_path / "etc"
    conf.mkdir()
    (conf / "s.crt").write_bytes(pki.server_cert.read_bytes())
    (conf / "s.key").write_bytes(pki.server_key.read_bytes())
    write(conf, "tls_server_config:\n  cert_file: s.crt\n  key_file: s.key\n")
    monkeypatch.chdir(tmp_path)
    config = load_web_config(Path("etc/web.yml"))
    assert config.tls_server_config.cert_file == conf / "s.crt"
    monkeypatch.chdir("/")
    assert config.ssl_context() is not None


# --- errors: one line each, naming file, field and value ------------------------------------------------


def errors(tmp_path: Path, text: str, monkeypatch: MonkeyPatch) -> list[str]:
    write(tmp_path, text)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WebConfigError) as caught:
        load_web_config(Path("web.yml"))
    assert str(caught.value) == "\n".join(caught.value.lines)
    for line in caught.value.lines:
        assert "\n" not in line
    return caught.value.lines


def test_missing_cert_file(tmp_path: Path, pki: Pki, monkeypatch: MonkeyPatch) -> None:
    assert errors(tmp_path, f"tls_server_config:\n  cert_file: /x\n  key_file: {pki.server_key}\n",
                  monkeypatch) == ["web.yml: tls_server_config.cert_file: file '/x' does not exist"]


def test_relative_missing_file_is_shown_resolved(tmp_path: Path, pki: Pki, monkeypatch: MonkeyPatch) -> None:
    assert errors(tmp_path, f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: nope.key\n",
                  monkeypatch) == [
        f"web.yml: tls_server_config.key_file: file '{tmp_path}/nope.key' does not exist"]


@pytest.mark.parametrize(("text", "expected"), [
    ("tls_server_confg: {}\n", ["web.yml: tls_server_confg: unknown key"]),
    ("tls_server_config:\n  cert_flie: a\n", ["web.yml: tls_server_config.cert_flie: unknown key"]),
    ("tls_server_config: 3\n",
     ["web.yml: tls_server_config: Input should be a valid dictionary or instance of TLSServerConfig "
      "(got 3)"]),
    ("tls_server_config:\n  min_version: TLS14\n",
     ["web.yml: tls_server_config.min_version: unknown TLS version 'TLS14'; expected one of TLS10, TLS11, "
      "TLS12, TLS13"]),
    ("tls_server_config:\n  client_auth_type: Sometimes\n",
     ["web.yml: tls_server_config.client_auth_type: unknown client auth type 'Sometimes'; expected one of "
      "NoClientCert, RequestClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert"]),
    ("tls_server_config:\n  client_auth_type: RequireAnyClientCert\n",
     ["web.yml: tls_server_config.client_auth_type: 'RequireAnyClientCert' (require a certificate without "
      "verifying it) is not supported: Python's ssl cannot do it and it authenticates nobody; use "
      "RequireAndVerifyClientCert with client_ca_file"]),
    ("tls_server_config:\n  cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, RC4]\n",
     ["web.yml: tls_server_config.cipher_suites[1]: unknown cipher suite 'RC4'; expected a Go crypto/tls "
      "name such as TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"]),
    ("tls_server_config:\n  curve_preferences: [CurveP999]\n",
     ["web.yml: tls_server_config.curve_preferences[0]: unknown curve 'CurveP999'; expected one of "
      "CurveP256, CurveP384, CurveP521, X25519"]),
    ("tls_server_config:\n  prefer_server_cipher_suites: maybe\n",
     ["web.yml: tls_server_config.prefer_server_cipher_suites: Input should be a valid boolean, unable to "
      "interpret input (got 'maybe')"]),
    ("http_server_config:\n  headers:\n    X-Frame-Options: allow\n    Server: poolwatch\n",
     ["web.yml: http_server_config.headers.X-Frame-Options: expected one of deny, sameorigin (got 'allow')",
      "web.yml: http_server_config.headers.Server: header 'Server' can not be configured; expected one of "
      "Content-Security-Policy, Strict-Transport-Security, X-Content-Type-Options, X-Frame-Options, "
      "X-XSS-Protection"]),
    ("http_server_config:\n  http3: true\n", ["web.yml: http_server_config.http3: unknown key"]),
    ("rate_limit:\n  interval: 5 seconds\n  burst: 1\n",
     ["web.yml: rate_limit.interval: expected a Go duration such as 1s, 500ms or 1m30s, or 0 to disable "
      "(got '5 seconds')"]),
    ("rate_limit:\n  interval: 1s\n",
     ["web.yml: rate_limit.burst: must be at least 1 when rate_limit.interval is set, or every request is "
      "refused (got 0)"]),
    ("rate_limit:\n  burst: -1\n",
     ["web.yml: rate_limit.burst: Input should be greater than or equal to 0 (got -1)"]),
    ("basic_auth_users: [alice]\n",
     ["web.yml: basic_auth_users: Input should be a valid dictionary (got list)"]),
    ("tls_server_config:\n  cert_file: [\n", ["web.yml: line 3, column 1: invalid YAML: expected the node "
                                             "content, but found '<stream end>'"]),
    ("- a\n- b\n", ["web.yml: the top level must be a mapping, got list"]),
])
def test_malformed_files(tmp_path: Path, monkeypatch: MonkeyPatch, text: str, expected: list[str]) -> None:
    assert errors(tmp_path, text, monkeypatch) == expected


def test_every_problem_is_reported(tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    lines = errors(tmp_path, """\
        tls_server_config:
          min_version: TLS9
          cert_file: /missing.crt
        basic_auth_users:
          alice: hunter2
        extra: 1
        """, monkeypatch)
    assert [line.split(": ")[1] for line in lines] == [
        "tls_server_config.cert_file", "tls_server_config.min_version", "basic_auth_users.alice", "extra"]


@pytest.mark.parametrize(("value", "expected"), [
    ("hunter2", "web.yml: basic_auth_users.alice: not a bcrypt hash (value not shown, it may be a password); "
                "expected 60 characters such as '$2y$10$' followed by 53 more, made by "
                "`htpasswd -nBC 10 \"\" | tr -d ':\\n'` or `python -m poolwatch.webconfig`"),
    (ALICE_HASH[:-1], None),  # one character short: same message
    ("$2x$10$" + "a" * 53, "web.yml: basic_auth_users.alice: bcrypt variant '$2x$' is not supported; "
                           "expected $2a$, $2b$ or $2y$"),
    ("$2y$03$" + "a" * 53, "web.yml: basic_auth_users.alice: bcrypt cost 03 is out of range 04-31"),
    ("", None),
    ("{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", None),
])
def test_bad_bcrypt_hash(tmp_path: Path, monkeypatch: MonkeyPatch, value: str, expected: str | None) -> None:
    lines = errors(tmp_path, f"basic_auth_users:\n  alice: '{value}'\n", monkeypatch)
    assert len(lines) == 1
    if expected is None:
        assert lines[0].startswith("web.yml: basic_auth_users.alice: not a bcrypt hash (value not shown")
    else:
        assert lines == [expected]
    if value:
        assert value not in lines[0]  # might have been a plain-text password


def test_secret_values_are_never_echoed(tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    lines = errors(tmp_path, "basic_auth_users:\n  alice: 12345678\ntls_server_config:\n  key: 987654\n",
                   monkeypatch)
    assert lines == [
        "web.yml: tls_server_config.key: Input should be a valid string (value not shown)",
        "web.yml: basic_auth_users.alice: Input should be a valid string (value not shown)",
    ]


def test_bad_user_names(tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    assert errors(tmp_path, f"basic_auth_users:\n  'a:b': {ALICE_HASH}\n", monkeypatch) == [
        "web.yml: basic_auth_users.a:b: user name 'a:b' contains ':', which HTTP basic auth cannot carry"]


@pytest.mark.parametrize(("extra", "expected"), [
    ("cert_file: {cert}\n",
     ["web.yml: tls_server_config.key_file: required when TLS is configured (or give key inline)"]),
    ("key_file: {key}\n",
     ["web.yml: tls_server_config.cert_file: required when TLS is configured (or give cert inline)"]),
    ("cert_file: {cert}\nkey_file: {key}\nclient_auth_type: RequireAndVerifyClientCert\n",
     ["web.yml: tls_server_config.client_ca_file: required with client_auth_type RequireAndVerifyClientCert "
      "(the CA that signs the scrapers' certificates)"]),
    ("cert_file: {cert}\nkey_file: {key}\nclient_ca_file: {ca}\n",
     ["web.yml: tls_server_config.client_auth_type: client_ca_file is set but client_auth_type is "
      "NoClientCert; set RequireAndVerifyClientCert"]),
    ("cert_file: {cert}\nkey_file: {key}\nclient_allowed_sans: [a]\n",
     ["web.yml: tls_server_config.client_allowed_sans: needs client_auth_type RequireAndVerifyClientCert "
      "(got 'NoClientCert')"]),
    ("cert_file: {cert}\nkey_file: {key}\nmin_version: TLS13\nmax_version: TLS12\n",
     ["web.yml: tls_server_config.min_version: TLS13 is above max_version TLS12"]),
    ("cert_file: {cert}\nkey_file: {key}\ncurve_preferences: [X25519, CurveP256]\n",
     ["web.yml: tls_server_config.curve_preferences: only one curve can be set here (Python's ssl); list "
      "one, or leave it out for OpenSSL's defaults (got X25519, CurveP256)"]),
    ("cert: x\ncert_file: {cert}\nkey_file: {key}\n",
     ["web.yml: tls_server_config.cert: give cert or cert_file, not both"]),
    ("cert_file: {cert}\nkey_file: {wrong_key}\n",
     ["web.yml: tls_server_config.key_file: file '{wrong_key}' holds a private key that does not match the "
      "certificate"]),
    ("cert_file: {key}\nkey_file: {key}\n",
     ["web.yml: tls_server_config.cert_file: file '{key}' holds no PEM certificate"]),
    ("cert_file: {cert}\nkey_file: {cert}\n",
     ["web.yml: tls_server_config.key_file: file '{cert}' holds no PEM private key"]),
    ("cert_file: {cert}\nkey_file: {key}\nclient_auth_type: VerifyClientCertIfGiven\nclient_ca_file: {key}\n",
     ["web.yml: tls_server_config.client_ca_file: file '{key}' holds no PEM certificate"]),
    ("cert_file: {cert}\nkey_file: {key}\ncipher_suites: [TLS_AES_128_GCM_SHA256]\n", []),
])
def test_tls_problems(tmp_path: Path, pki: Pki, monkeypatch: MonkeyPatch, extra: str,
                      expected: list[str]) -> None:
    names = {"cert": pki.server_cert, "key": pki.server_key, "ca": pki.ca, "wrong_key": pki.wrong_key}
    text = "tls_server_config:\n" + textwrap.indent(extra.format(**names), "  ")
    if not expected:
        write(tmp_path, text)
        assert load_web_config(tmp_path / "web.yml").tls_enabled
        return
    assert errors(tmp_path, text, monkeypatch) == [line.format(**names) for line in expected]


def test_encrypted_key_is_refused_without_prompting(tmp_path: Path, pki: Pki,
                                                    monkeypatch: MonkeyPatch) -> None:
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"pass")))
    assert errors(tmp_path, f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {encrypted}\n",
                  monkeypatch) == [
        f"web.yml: tls_server_config.key_file: file '{encrypted}' holds an encrypted private key; give an "
        f"unencrypted one (readable only by poolwatch's user)"]


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(WebConfigError) as caught:
        load_web_config(tmp_path / "absent.yml")
    assert caught.value.lines == [f"{tmp_path}/absent.yml: web config file does not exist"]
    with pytest.raises(WebConfigError) as caught:
        load_web_config(tmp_path)
    assert caught.value.lines == [f"{tmp_path}: is a directory, not a web config file"]


def test_a_toolkit_example_file_loads(tmp_path: Path, pki: Pki) -> None:
    """The shape of exporter-toolkit's docs/web-config.yml, with defaults spelled out."""
    config = load_web_config(write(tmp_path, f"""\
        tls_server_config:
          cert_file: {pki.server_cert}
          key_file: {pki.server_key}
          client_auth_type: ""
          min_version: TLS12
          max_version: TLS13
          cipher_suites:
            - TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            - TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
          prefer_server_cipher_suites: true
          curve_preferences: [CurveP256]
        http_server_config:
          http2: false
          headers:
            Strict-Transport-Security: max-age=31536000
        basic_auth_users:
          alice: $2y$10$mDwo.lAisC94iLAyP81MCesa29IzH37oigHC/42V2pdJlUprsJPze
          bob: $2y$10$hLqFl9jSjoAAy95Z/zw8Ye8wkdMBM8c5Bn1ptYqP/AXyV0.oy0S8m
        rate_limit:
          interval: 0
          burst: 20
        """))
    assert config.tls_enabled and config.auth_enabled
    assert config.ssl_context() is not None
    assert "$2y$10$" not in repr(config)


# --- hashes -----------------------------------------------------------------------------------------


def test_hash_password_round_trip(tmp_path: Path) -> None:
    hashed = hash_password("s3cret")
    assert hashed.startswith("$2b$10$") and len(hashed) == 60
    assert bcrypt.checkpw(b"s3cret", hashed.encode())
    assert load_web_config(write(tmp_path, f"basic_auth_users:\n  me: {hashed}\n")).auth_enabled
    with pytest.raises(ValueError, match="at most 72 bytes"):
        hash_password("x" * 73)


def test_hash_command_reads_stdin(monkeypatch: MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    assert webconfig.main(["4"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("$2b$04$") and bcrypt.checkpw(b"s3cret", printed.encode())
    assert webconfig.main(["four"]) == 2
