"""TLS and HTTP basic auth for every endpoint, set up with the Prometheus exporter-toolkit web config file.

Operators already have ``web.yml`` files for node_exporter and friends (``--web.config.file``);
poolwatch reads the same format so those files can be reused as they are:

.. code-block:: yaml

    tls_server_config:
      cert_file: server.crt          # relative paths are relative to this file's directory
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert
      client_ca_file: scrapers-ca.crt
    http_server_config:
      headers:
        X-Content-Type-Options: nosniff
    basic_auth_users:
      prometheus: $2b$10$...         # bcrypt, e.g. `python -m poolwatch.webconfig`

What differs from the Go toolkit, and why:

* Python's ``ssl`` cannot accept a client certificate without verifying it, so ``RequireAnyClientCert``
  is refused (use ``RequireAndVerifyClientCert``) and ``RequestClientCert`` (which authenticates nobody)
  behaves like ``NoClientCert``. Verifying modes need ``client_ca_file``/``client_ca``: Go would fall
  back to the system's public CAs, which is almost never what was meant.
* ``curve_preferences`` can name one curve only (``ssl`` sets a single ECDH group).
* ``http_server_config.http2`` is accepted and has no effect: aiohttp speaks HTTP/1.1.
* ``client_allowed_sans`` is checked per request (403) rather than during the handshake.
* The file is read once (and again on reload), not on every request; certificate, key and client CA
  *files* are however re-read on the next TLS handshake after they change, as with the toolkit, so
  certificate rotation needs no restart.

Every problem in the file is one line, ``FILE: FIELD: PROBLEM``, collected in ``WebConfigError.lines``.
Values that may be secrets (``basic_auth_users`` entries, an inline ``key``) are never echoed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import getpass
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import ssl
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Final

import bcrypt
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from poolwatch.config import ConfigError, field_path, read_yaml_mapping, shown_value
from poolwatch.logs import get_logger

__all__ = [
    "DEFAULT_CACHE_TTL",
    "HTTPServerConfig",
    "RateLimitConfig",
    "TLSServerConfig",
    "WebConfig",
    "WebConfigError",
    "apply",
    "basic_auth_middleware",
    "client_san_middleware",
    "hash_password",
    "headers_middleware_hook",
    "load_web_config",
    "parse_basic_authorization",
    "rate_limit_middleware",
]

log = get_logger("poolwatch.webconfig")

# How long a successful bcrypt verification is remembered. bcrypt costs ~50-100 ms of CPU at cost 10 on
# purpose; Prometheus scrapes every 15-60 s, so without a cache every scrape would pay it. Five minutes
# covers a 1-minute scrape interval while bounding how long a password-derived value stays in memory.
DEFAULT_CACHE_TTL: Final = 300.0

# bcrypt only looks at the first 72 bytes; pyca/bcrypt >= 5 refuses longer input instead of truncating.
_BCRYPT_MAX_PASSWORD: Final = 72


class WebConfigError(Exception):
    """A web config problem; ``lines`` are ready to print, one problem each."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


# --- value vocabularies of the Go toolkit -------------------------------------------------------------

_TLS_VERSIONS: Final[dict[str, ssl.TLSVersion]] = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

# client_auth_type -> ssl verify mode; None marks values Python's ssl cannot honour (see module doc).
_CLIENT_AUTH: Final[dict[str, ssl.VerifyMode | None]] = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_NONE,
    "RequireAnyClientCert": None,
    "RequireClientCert": None,  # the toolkit's old spelling of RequireAnyClientCert
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}

# Go's crypto/tls names (the ones tls.CipherSuites() returns) -> OpenSSL names. TLS 1.3 suites map to
# None: neither Go nor Python's ssl lets them be chosen, so they are accepted and have no effect.
_CIPHER_SUITES: Final[dict[str, str | None]] = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
}

_CURVES: Final[dict[str, str]] = {
    "CurveP256": "prime256v1",
    "CurveP384": "secp384r1",
    "CurveP521": "secp521r1",
    "X25519": "X25519",
}

# Header names are matched exactly, as the toolkit does; None means any value is allowed.
_HEADERS: Final[dict[str, tuple[str, ...] | None]] = {
    "Content-Security-Policy": None,
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
}

_BCRYPT_HASH = re.compile(r"^\$(2[a-z]?)\$(\d\d)\$[./A-Za-z0-9]{53}$")
_BCRYPT_VARIANTS: Final = ("2a", "2b", "2y")
_GO_DURATION = re.compile(r"^(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+$")
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_DURATION_UNITS: Final = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def _one_of(values: Sequence[str]) -> str:
    return ", ".join(values)


# --- validators ----------------------------------------------------------------------------------------


def _blank_is_unset(value: object) -> object:
    # The toolkit (Go zero values) treats "" exactly like an absent key.
    return None if value == "" else value


def _none_is_empty(value: object) -> object:
    # `basic_auth_users:` with nothing under it is YAML null; Go reads it as an empty map.
    return {} if value is None else value


def _existing_file(value: Path | None, info: ValidationInfo) -> Path | None:
    """Resolve against the web config file's directory (as the toolkit does) and check it can be read."""
    if value is None:
        return None
    base = (info.context or {}).get("base_dir")
    path = value if value.is_absolute() or base is None else Path(base) / value
    if not path.exists():
        raise ValueError(f"file '{path}' does not exist")
    if not path.is_file():
        raise ValueError(f"'{path}' is not a file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"file '{path}' is not readable by this user")
    return path


def _tls_version(value: str) -> str:
    if value not in _TLS_VERSIONS:
        raise ValueError(f"unknown TLS version {value!r}; expected one of {_one_of(list(_TLS_VERSIONS))}")
    return value


def _client_auth_type(value: str | None) -> str | None:
    if value is None:
        return None
    if value not in _CLIENT_AUTH:
        raise ValueError(
            f"unknown client auth type {value!r}; expected one of NoClientCert, "
            f"RequestClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert"
        )
    if _CLIENT_AUTH[value] is None:
        raise ValueError(
            f"{value!r} (require a certificate without verifying it) is not supported: Python's "
            f"ssl cannot do it and it authenticates nobody; use RequireAndVerifyClientCert "
            f"with client_ca_file"
        )
    return value


def _cipher_suite(value: str) -> str:
    if value not in _CIPHER_SUITES:
        raise ValueError(
            f"unknown cipher suite {value!r}; expected a Go crypto/tls name such as "
            f"TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"
        )
    return value


def _curve(value: str) -> str:
    if value not in _CURVES:
        raise ValueError(f"unknown curve {value!r}; expected one of {_one_of(list(_CURVES))}")
    return value


def _bcrypt_hash(value: SecretStr) -> SecretStr:
    # The value may well be a plain-text password pasted by mistake: never put it in the message.
    text = value.get_secret_value()
    match = _BCRYPT_HASH.match(text)
    if match is None:
        raise ValueError(
            "not a bcrypt hash (value not shown, it may be a password); expected 60 characters such as "
            "'$2y$10$' followed by 53 more, made by `htpasswd -nBC 10 \"\" | tr -d ':\\n'` "
            "or `python -m poolwatch.webconfig`"
        )
    variant, cost = match.group(1), int(match.group(2))
    if variant not in _BCRYPT_VARIANTS:
        raise ValueError(f"bcrypt variant '${variant}$' is not supported; expected $2a$, $2b$ or $2y$")
    if not 4 <= cost <= 31:
        raise ValueError(f"bcrypt cost {match.group(2)} is out of range 04-31")
    return value


def _username(value: str) -> str:
    # RFC 7617: the user-id cannot contain a colon, so such a user could never log in.
    if ":" in value:
        raise ValueError(f"user name {value!r} contains ':', which HTTP basic auth cannot carry")
    if not value:
        raise ValueError("user name is empty")
    return value


def _go_duration(value: object) -> object:
    """Go's time.ParseDuration syntax (``1s``, ``500ms``, ``1m30s``, ``0``) -> seconds."""
    if value == 0 or value == "0":
        return 0.0
    if isinstance(value, str) and _GO_DURATION.match(value):
        return sum(float(n) * _GO_DURATION_UNITS[unit] for n, unit in _GO_DURATION_PART.findall(value))
    raise ValueError(f"expected a Go duration such as 1s, 500ms or 1m30s, or 0 to disable (got {value!r})")


_OptionalFile = Annotated[Path | None, BeforeValidator(_blank_is_unset), AfterValidator(_existing_file)]
_OptionalText = Annotated[str | None, BeforeValidator(_blank_is_unset)]
_BcryptHash = Annotated[SecretStr, AfterValidator(_bcrypt_hash)]
_Username = Annotated[str, AfterValidator(_username)]


# --- the model -----------------------------------------------------------------------------------------


class _Model(BaseModel):
    # Unknown keys are errors: a typo such as `cert_flie` must not silently serve plain HTTP.
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSServerConfig(_Model):
    cert: _OptionalText = None
    key: Annotated[SecretStr | None, BeforeValidator(_blank_is_unset)] = None
    client_ca: _OptionalText = None
    cert_file: _OptionalFile = None
    key_file: _OptionalFile = None
    client_auth_type: Annotated[
        str | None, BeforeValidator(_blank_is_unset), AfterValidator(_client_auth_type)
    ] = None
    client_ca_file: _OptionalFile = None
    client_allowed_sans: list[str] | None = None
    min_version: Annotated[str, AfterValidator(_tls_version)] = "TLS12"
    max_version: Annotated[str, AfterValidator(_tls_version)] = "TLS13"
    cipher_suites: list[Annotated[str, AfterValidator(_cipher_suite)]] = Field(default_factory=list)
    prefer_server_cipher_suites: bool = True
    curve_preferences: list[Annotated[str, AfterValidator(_curve)]] = Field(default_factory=list)

    @property
    def enabled(self) -> bool:
        """Same rule as the toolkit: any certificate, key or client-auth setting turns TLS on."""
        return any(
            v is not None
            for v in (
                self.cert,
                self.key,
                self.client_ca,
                self.cert_file,
                self.key_file,
                self.client_ca_file,
                self.client_auth_type,
            )
        )

    @property
    def verify_mode(self) -> ssl.VerifyMode:
        return _CLIENT_AUTH[self.client_auth_type or "NoClientCert"] or ssl.CERT_NONE

    def watched_files(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p is not None)


class HTTPServerConfig(_Model):
    http2: bool = True  # accepted for compatibility; aiohttp serves HTTP/1.1 only
    headers: Annotated[dict[str, str], BeforeValidator(_none_is_empty)] = Field(default_factory=dict)


class RateLimitConfig(_Model):
    interval: Annotated[float, BeforeValidator(_go_duration)] = 0.0  # seconds between requests; 0 = off
    burst: int = Field(default=0, ge=0)


class WebConfig(_Model):
    """A validated web config. ``WebConfig()`` is "no file": plain HTTP, no auth."""

    tls_server_config: Annotated[TLSServerConfig, BeforeValidator(_none_is_empty)] = Field(
        default_factory=TLSServerConfig
    )
    http_server_config: Annotated[HTTPServerConfig, BeforeValidator(_none_is_empty)] = Field(
        default_factory=HTTPServerConfig
    )
    basic_auth_users: Annotated[dict[_Username, _BcryptHash], BeforeValidator(_none_is_empty)] = Field(
        default_factory=dict
    )
    rate_limit: Annotated[RateLimitConfig, BeforeValidator(_none_is_empty)] = Field(
        default_factory=RateLimitConfig
    )

    _source: str = PrivateAttr(default="web config")

    @model_validator(mode="before")
    @classmethod
    def _top_level_mapping(cls, value: object) -> object:
        return {} if value is None else value

    @property
    def source(self) -> str:
        """The file this came from, as given: it starts every error line."""
        return self._source

    @property
    def tls_enabled(self) -> bool:
        return self.tls_server_config.enabled

    @property
    def auth_enabled(self) -> bool:
        return bool(self.basic_auth_users)

    def ssl_context(self) -> ssl.SSLContext | None:
        """A server-side context for ``web.TCPSite(..., ssl_context=...)``, or None when TLS is off.

        TLS 1.2 is the minimum unless the file says otherwise. Certificate, key and client CA files are
        checked on each new handshake and re-read when they change; if the new ones are broken (say, half
        of a rotation has landed) the previous ones keep being used and a warning is logged.
        Raises ``WebConfigError`` if the files became unusable since ``load_web_config``.
        """
        tls = self.tls_server_config
        if not tls.enabled:
            return None
        problems, context = _build_ssl_context(tls, self._source)
        if context is None:
            raise WebConfigError(problems)
        if tls.watched_files():
            context.sni_callback = _CertificateReloader(tls, self._source, context).on_client_hello
        return context


# --- loading and error lines ---------------------------------------------------------------------------


def _is_secret(loc: Sequence[int | str]) -> bool:
    if tuple(loc[:2]) == ("tls_server_config", "key"):
        return True
    return bool(loc) and loc[0] == "basic_auth_users" and loc[-1] != "[key]" and len(loc) > 1


def _format_validation_error(source: str, error: ValidationError) -> list[str]:
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        where = f"{source}: {field_path(loc)}"
        if item["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key")
        elif item["type"] == "value_error":
            # our own validators: the message already names the bad value (or deliberately hides it)
            lines.append(f"{where}: {item['msg'].removeprefix('Value error, ')}")
        elif _is_secret(loc):
            lines.append(f"{where}: {item['msg']} (value not shown)")
        else:
            lines.append(f"{where}: {item['msg']} (got {shown_value(item.get('input'))})")
    return lines


def _semantic_problems(config: WebConfig, source: str) -> list[str]:
    """Cross-field rules pydantic's per-field validation cannot see."""
    problems: list[str] = []
    tls = config.tls_server_config
    at = f"{source}: tls_server_config"
    if tls.enabled:
        for inline, file in (("cert", "cert_file"), ("key", "key_file"), ("client_ca", "client_ca_file")):
            if getattr(tls, inline) is not None and getattr(tls, file) is not None:
                problems.append(f"{at}.{inline}: give {inline} or {file}, not both")
        if tls.cert is None and tls.cert_file is None:
            problems.append(f"{at}.cert_file: required when TLS is configured (or give cert inline)")
        if tls.key is None and tls.key_file is None:
            problems.append(f"{at}.key_file: required when TLS is configured (or give key inline)")
        has_ca = tls.client_ca is not None or tls.client_ca_file is not None
        auth = tls.client_auth_type or "NoClientCert"
        if tls.verify_mode != ssl.CERT_NONE and not has_ca:
            problems.append(
                f"{at}.client_ca_file: required with client_auth_type {auth} (the CA that "
                f"signs the scrapers' certificates)"
            )
        if has_ca and auth == "NoClientCert":
            problems.append(
                f"{at}.client_auth_type: client_ca_file is set but client_auth_type is "
                f"NoClientCert; set RequireAndVerifyClientCert"
            )
        if tls.client_allowed_sans is not None and tls.verify_mode != ssl.CERT_REQUIRED:
            problems.append(
                f"{at}.client_allowed_sans: needs client_auth_type RequireAndVerifyClientCert (got {auth!r})"
            )
        if _TLS_VERSIONS[tls.min_version] > _TLS_VERSIONS[tls.max_version]:
            problems.append(f"{at}.min_version: {tls.min_version} is above max_version {tls.max_version}")
        if len(tls.curve_preferences) > 1:
            problems.append(
                f"{at}.curve_preferences: only one curve can be set here (Python's ssl); "
                f"list one, or leave it out for OpenSSL's defaults "
                f"(got {_one_of(tls.curve_preferences)})"
            )
    headers = config.http_server_config.headers
    for name, value in headers.items():
        where = f"{source}: http_server_config.headers.{name}"
        if name not in _HEADERS:
            problems.append(
                f"{where}: header {name!r} can not be configured; expected one of {_one_of(list(_HEADERS))}"
            )
            continue
        allowed = _HEADERS[name]
        if allowed is not None and value and value not in allowed:
            problems.append(f"{where}: expected one of {_one_of(allowed)} (got {value!r})")
    rate = config.rate_limit
    if rate.interval > 0 and rate.burst < 1:
        problems.append(
            f"{source}: rate_limit.burst: must be at least 1 when rate_limit.interval is set, "
            f"or every request is refused (got {rate.burst})"
        )
    return problems


def web_config_from_mapping(data: Mapping[str, Any], source: str, base_dir: Path | None = None) -> WebConfig:
    """Validate an already-parsed mapping; relative file paths resolve against ``base_dir``."""
    try:
        config = WebConfig.model_validate(dict(data), context={"base_dir": base_dir})
    except ValidationError as exc:
        raise WebConfigError(_format_validation_error(source, exc)) from None
    config._source = source
    problems = _semantic_problems(config, source)
    if not problems and config.tls_enabled:
        # Load the certificate and key now so a bad file fails at start (or `check-config`), not at the
        # first scrape.
        problems, _ = _build_ssl_context(config.tls_server_config, source)
    if problems:
        raise WebConfigError(problems)
    return config


def load_web_config(path: Path) -> WebConfig:
    """Read and validate a web config file, including its certificate, key and CA files.

    Raises ``WebConfigError`` whose ``lines`` say, one problem each, ``FILE: FIELD: PROBLEM``.
    """
    source = str(path)
    try:
        data = read_yaml_mapping(path, "web config")
    except ConfigError as exc:
        raise WebConfigError(exc.lines) from None
    # Absolute, so a later chdir or a certificate reload still finds the files.
    return web_config_from_mapping(data, source, base_dir=path.parent.absolute())


# --- TLS -----------------------------------------------------------------------------------------------


class _EncryptedKey(Exception):
    pass


def _refuse_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal and hang a daemon; Go refuses too.
    raise _EncryptedKey


@contextlib.contextmanager
def _as_files(tls: TLSServerConfig) -> Iterator[tuple[str, str]]:
    """Certificate and key as file names: ``load_cert_chain`` reads files only, so inline PEM is written
    to a private temporary directory for the moment of loading."""
    cert_file, key_file = tls.cert_file, tls.key_file
    with tempfile.TemporaryDirectory(prefix="poolwatch-tls-") as tmp:  # mode 0700
        if tls.cert is not None:
            cert_file = Path(tmp) / "cert.pem"
            cert_file.write_text(tls.cert, encoding="utf-8")
        if tls.key is not None:
            key_file = Path(tmp) / "key.pem"
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(tls.key.get_secret_value())
        yield str(cert_file), str(key_file)


def _pem_text(path: Path | None, inline: str | None) -> str:
    if path is not None:
        return path.read_bytes().decode("ascii", errors="replace")
    return inline or ""


def _holds_certificate(pem: str) -> bool:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem)
    except (ssl.SSLError, ValueError):
        return False
    return True


def _build_ssl_context(tls: TLSServerConfig, source: str) -> tuple[list[str], ssl.SSLContext | None]:
    """The server context, or the problems (one line each) that prevent making it."""
    at = f"{source}: tls_server_config"
    cert_field = f"{at}.cert_file: file '{tls.cert_file}'" if tls.cert_file else f"{at}.cert: the inline text"
    key_field = f"{at}.key_file: file '{tls.key_file}'" if tls.key_file else f"{at}.key: the inline text"
    ca_field = (
        f"{at}.client_ca_file: file '{tls.client_ca_file}'"
        if tls.client_ca_file
        else f"{at}.client_ca: the inline text"
    )
    problems: list[str] = []

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _TLS_VERSIONS[tls.min_version]
    context.maximum_version = _TLS_VERSIONS[tls.max_version]
    if tls.prefer_server_cipher_suites:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    # Go's server never renegotiates; renegotiation has been a source of DoS and injection bugs.
    context.options |= ssl.OP_NO_RENEGOTIATION
    # Say plainly that we speak HTTP/1.1 so an h2-capable client does not have to guess.
    context.set_alpn_protocols(["http/1.1"])

    openssl_ciphers = [name for s in tls.cipher_suites if (name := _CIPHER_SUITES[s]) is not None]
    if openssl_ciphers:
        try:
            context.set_ciphers(":".join(openssl_ciphers))
        except ssl.SSLError:
            problems.append(
                f"{at}.cipher_suites: none of the listed TLS 1.2 cipher suites is available in "
                f"this OpenSSL ({ssl.OPENSSL_VERSION})"
            )
    if tls.curve_preferences:
        context.set_ecdh_curve(_CURVES[tls.curve_preferences[0]])

    try:
        cert_pem = _pem_text(tls.cert_file, tls.cert)
        if not _holds_certificate(cert_pem):
            problems.append(f"{cert_field} holds no PEM certificate")
        else:
            with _as_files(tls) as (cert_file, key_file):
                context.load_cert_chain(cert_file, key_file, password=_refuse_passphrase)
    except _EncryptedKey:
        problems.append(
            f"{key_field} holds an encrypted private key; give an unencrypted one (readable "
            f"only by poolwatch's user)"
        )
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            problems.append(f"{key_field} holds a private key that does not match the certificate")
        else:
            problems.append(f"{key_field} holds no PEM private key")
    except OSError as exc:  # a file vanished or lost its permissions since validation
        problems.append(f"{cert_field} or its key cannot be read: {exc.strerror or exc}")

    if tls.client_ca is not None or tls.client_ca_file is not None:
        try:
            ca_pem = _pem_text(tls.client_ca_file, tls.client_ca)
        except OSError as exc:
            problems.append(f"{ca_field} cannot be read: {exc.strerror or exc}")
        else:
            if not _holds_certificate(ca_pem):
                problems.append(f"{ca_field} holds no PEM certificate")
            else:
                context.load_verify_locations(cadata=ca_pem)
    context.verify_mode = tls.verify_mode
    if problems:
        return problems, None
    return [], context


def _fingerprint(paths: Sequence[Path]) -> tuple[tuple[int, int, int], ...] | None:
    try:
        # inode too: Kubernetes secret volumes and most rotation tools swap files by rename
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in (p.stat() for p in paths))
    except OSError:
        return None


class _CertificateReloader:
    """Re-reads certificate, key and client CA files on the first handshake after they change.

    Runs as the context's SNI callback, which OpenSSL calls for every ClientHello (with or without a
    server name), and hands the connection a freshly built context. A stat of two or three files per
    handshake is cheap, and scrapers keep their connections alive.
    """

    def __init__(self, tls: TLSServerConfig, source: str, context: ssl.SSLContext) -> None:
        self._tls = tls
        self._source = source
        self._files = tls.watched_files()
        self._seen = _fingerprint(self._files)
        self._current = context
        self._initial = context

    def on_client_hello(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, context: ssl.SSLContext
    ) -> None:
        seen = _fingerprint(self._files)
        if seen is not None and seen != self._seen:
            self._seen = seen  # once per change: a broken rotation is logged once, retried on the next
            problems, fresh = _build_ssl_context(self._tls, self._source)
            if fresh is None:
                log.warning(
                    "TLS files changed but cannot be used; keeping the previous ones", problems=problems
                )
            else:
                self._current = fresh
                log.info("TLS files changed; using the new ones", files=[str(p) for p in self._files])
        if self._current is not self._initial:
            connection.context = self._current


# --- HTTP basic auth -----------------------------------------------------------------------------------


def parse_basic_authorization(header: str | None) -> tuple[bytes, bytes] | None:
    """``Authorization: Basic base64(user:password)`` -> (user, password) as bytes, or None.

    Strict like Go's ``Request.BasicAuth``: case-insensitive scheme, one space, standard base64 with padding.
    Never raises: every malformed header is simply "no credentials".
    """
    if header is None or len(header) < 6 or header[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].encode("ascii"), validate=True)
    except (binascii.Error, ValueError):  # UnicodeEncodeError is a ValueError
        return None
    user, colon, password = decoded.partition(b":")
    if not colon:
        return None
    return user, password


def _dummy_hash(cost: int) -> bytes:
    # A well-formed hash nobody knows the password of, at the configured cost: checking an unknown user
    # against it takes as long as checking a real one, so response times do not reveal which users exist.
    # Building it costs nothing (no hashing happens until checkpw).
    return b"$2b$%02d$" % cost + b"." * 53


class _BasicAuth:
    def __init__(self, users: Mapping[str, SecretStr], cache_ttl: float, clock: Callable[[], float]) -> None:
        self._names = [hashlib.sha256(name.encode("utf-8")).digest() for name in users]
        self._hashes = [h.get_secret_value().encode("ascii") for h in users.values()]
        cost = max((int(h[4:6]) for h in self._hashes), default=10)
        self._dummy = _dummy_hash(cost)
        # The cache keeps HMAC(password) under a key that lives only in this process, not sha256(password):
        # a memory dump then gives nothing to brute-force offline faster than bcrypt itself.
        self._mac_key = secrets.token_bytes(32)
        self._cache: dict[int, tuple[bytes, float]] = {}  # user index -> (mac, expires at)
        self._ttl = cache_ttl
        self._clock = clock
        # One bcrypt at a time, like the toolkit: a flood of bad passwords cannot take every core.
        self._lock = asyncio.Lock()

    def _find_user(self, user: bytes) -> int | None:
        # Compare against every name, in constant time each, without stopping at a match; comparing
        # digests makes the names' lengths irrelevant too.
        digest = hashlib.sha256(user).digest()
        found = None
        for index, name in enumerate(self._names):
            if hmac.compare_digest(digest, name):
                found = index
        return found

    def _cached(self, index: int | None, mac: bytes) -> bool:
        if index is None:
            return False
        entry = self._cache.get(index)
        return entry is not None and entry[1] > self._clock() and hmac.compare_digest(entry[0], mac)

    @staticmethod
    def _bcrypt_matches(password: bytes, hashed: bytes) -> bool:
        try:
            # Too long for bcrypt: still spend one check (timing), then refuse; such a password cannot
            # have been hashed by pyca/bcrypt anyway.
            matches = bcrypt.checkpw(password[:_BCRYPT_MAX_PASSWORD], hashed)
        except ValueError:  # e.g. a NUL byte in the password
            return False
        return matches and len(password) <= _BCRYPT_MAX_PASSWORD

    async def check(self, header: str | None) -> bool:
        credentials = parse_basic_authorization(header)
        if credentials is None:
            return False
        user, password = credentials
        index = self._find_user(user)
        mac = hmac.new(self._mac_key, password, hashlib.sha256).digest()
        if self._cached(index, mac):
            return True
        async with self._lock:
            # Several scrapes may have queued behind the first check of the same password.
            if self._cached(index, mac):
                return True
            hashed = self._dummy if index is None else self._hashes[index]
            # bcrypt is ~100 ms of CPU on purpose: off the event loop, so /healthz keeps answering.
            matches = await asyncio.to_thread(self._bcrypt_matches, password, hashed)
        if index is None or not matches:
            return False
        self._cache[index] = (mac, self._clock() + self._ttl)
        return True


def _unauthorized() -> web.Response:
    # The same answer whatever was wrong (no header, unknown user, bad password, malformed header).
    return web.Response(status=401, text="Unauthorized\n", headers={hdrs.WWW_AUTHENTICATE: "Basic"})


def basic_auth_middleware(
    web_config: WebConfig,
    *,
    cache_ttl: float = DEFAULT_CACHE_TTL,
    clock: Callable[[], float] = time.monotonic,
) -> Middleware | None:
    """Middleware demanding one of ``basic_auth_users`` on every request, or None if there are none."""
    if not web_config.basic_auth_users:
        return None
    auth = _BasicAuth(web_config.basic_auth_users, cache_ttl, clock)

    @web.middleware
    async def basic_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if await auth.check(request.headers.get(hdrs.AUTHORIZATION)):
            return await handler(request)
        return _unauthorized()

    return basic_auth


# --- the rest of the file: rate limit, client SANs, headers ---------------------------------------------


def rate_limit_middleware(
    web_config: WebConfig, *, clock: Callable[[], float] = time.monotonic
) -> Middleware | None:
    """Token bucket (``burst`` tokens, one more every ``interval``) answering 429 when empty, like the
    toolkit's golang.org/x/time/rate limiter; None when ``rate_limit.interval`` is 0."""
    interval, burst = web_config.rate_limit.interval, web_config.rate_limit.burst
    if interval <= 0:
        return None
    state = {"tokens": float(burst), "at": clock()}

    @web.middleware
    async def rate_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        now = clock()
        state["tokens"] = min(float(burst), state["tokens"] + (now - state["at"]) / interval)
        state["at"] = now
        if state["tokens"] < 1.0:
            return web.Response(status=429, text="Too Many Requests\n")
        state["tokens"] -= 1.0
        return await handler(request)

    return rate_limit


def _san_values(peercert: Mapping[str, Any]) -> list[str]:
    return [
        value
        for kind, value in peercert.get("subjectAltName", ())
        if kind in ("DNS", "IP Address", "email", "URI")
    ]


def _same_san(presented: str, allowed: str) -> bool:
    if presented == allowed:
        return True
    # Python writes IPv6 SANs as 2001:DB8:0:0:0:0:0:1, Go (whose configs these are) as 2001:db8::1.
    try:
        return ipaddress.ip_address(presented.strip()) == ipaddress.ip_address(allowed)
    except ValueError:
        return False


def client_san_middleware(web_config: WebConfig) -> Middleware | None:
    """403 unless the verified client certificate has a SAN in ``client_allowed_sans``; None if unset."""
    allowed = web_config.tls_server_config.client_allowed_sans
    if allowed is None or not web_config.tls_enabled:
        return None

    @web.middleware
    async def client_san(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        peercert = transport.get_extra_info("peercert") if transport is not None else None
        presented = _san_values(peercert) if peercert else []
        if any(_same_san(p, a) for p in presented for a in allowed):
            return await handler(request)
        return web.Response(status=403, text="Forbidden\n")

    return client_san


def headers_middleware_hook(
    web_config: WebConfig,
) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]] | None:
    """An ``on_response_prepare`` callback adding ``http_server_config.headers``; None if there are none.

    A signal rather than a middleware so the headers also reach 401s, 404s and aiohttp's own error pages.
    """
    headers = {name: value for name, value in web_config.http_server_config.headers.items() if value}
    if not headers:
        return None

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        for name, value in headers.items():
            response.headers[name] = value

    return add_headers


def apply(app: web.Application, web_config: WebConfig, *, cache_ttl: float = DEFAULT_CACHE_TTL) -> None:
    """Put the web config's HTTP side (auth, client SANs, rate limit, headers) on ``app``.

    Call before the app starts (``AppRunner.setup`` freezes it). The checks go in front of any middleware
    already there, so nothing else runs for a request that is refused. TLS is not applied here: pass
    ``web_config.ssl_context()`` to ``web.TCPSite``.
    """
    guards = [
        client_san_middleware(web_config),  # first: in the toolkit a wrong SAN fails the TLS handshake
        rate_limit_middleware(web_config),  # the toolkit limits before it authenticates
        basic_auth_middleware(web_config, cache_ttl=cache_ttl),
    ]
    for middleware in reversed([g for g in guards if g is not None]):
        app.middlewares.insert(0, middleware)
    hook = headers_middleware_hook(web_config)
    if hook is not None:
        app.on_response_prepare.append(hook)


# --- making hashes -------------------------------------------------------------------------------------


def hash_password(password: str, *, rounds: int = 10) -> str:
    """A bcrypt hash for ``basic_auth_users`` (what ``htpasswd -nBC 10 "" | tr -d ':\\n'`` prints)."""
    raw = password.encode("utf-8")
    if len(raw) > _BCRYPT_MAX_PASSWORD:
        raise ValueError(
            f"bcrypt uses at most {_BCRYPT_MAX_PASSWORD} bytes of a password; this one has {len(raw)}"
        )
    return bcrypt.hashpw(raw, bcrypt.gensalt(rounds=rounds)).decode("ascii")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m poolwatch.webconfig [ROUNDS]``: read a password, print its bcrypt hash."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1 or (args and not args[0].isdigit()):
        print(
            "usage: python -m poolwatch.webconfig [ROUNDS]  (reads the password from the terminal or stdin)",
            file=sys.stderr,
        )
        return 2
    rounds = int(args[0]) if args else 10
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    try:
        print(hash_password(password, rounds=rounds))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
