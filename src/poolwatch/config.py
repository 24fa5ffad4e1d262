"""The configuration model: YAML file, command-line DSNs and environment, validated in one place.

Every problem becomes one line naming the file, the field and the bad value, so that
``poolwatch check-config`` and the daemon can exit 2 without a traceback. Passwords are never
part of the model's printable state: they are read from an environment variable or a file
when a connection is made (``Credentials.resolve``), so a config dump or an error cannot leak one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

import yaml
from psycopg import conninfo as libpq_conninfo
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_LISTEN_PORT = 9127

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def _parse_duration(value: object) -> object:
    """Seconds as a number, or a string such as ``500ms``, ``5s``, ``2m``, ``1h``."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError("expected a duration such as 5, 5s, 500ms, 2m or 1h")
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return value


Seconds = Annotated[float, BeforeValidator(_parse_duration), Field(gt=0)]
Port = Annotated[int, Field(ge=1, le=65535)]


class ConfigError(Exception):
    """A configuration problem; ``lines`` are ready to print, one problem each."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


class _Model(BaseModel):
    # Unknown keys are errors: a typo such as ``pasword_file`` must not silently do nothing.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Credentials(_Model):
    """Where a password comes from. Inline passwords are not accepted in the file."""

    password_env: str | None = Field(default=None, description="environment variable holding the password")
    password_file: Path | None = Field(default=None, description="file holding the password (first line)")

    @field_validator("password_file")
    @classmethod
    def _file_readable(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"password file {str(path)!r} does not exist or is not a file")
        if path is not None and not os.access(path, os.R_OK):
            raise ValueError(f"password file {str(path)!r} is not readable")
        if path is not None:
            try:
                path.read_bytes().decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"password file {str(path)!r} is not UTF-8 text (byte {exc.start})"
                ) from None
            except OSError as exc:
                raise ValueError(f"password file {str(path)!r} cannot be read: {exc.strerror}") from None
        return path

    def resolve_password(self) -> str | None:
        """The password now (files and variables may change between reloads)."""
        if self.password_file is not None:
            text = self.password_file.read_text(encoding="utf-8")
            return text.splitlines()[0] if text else ""
        if self.password_env is not None:
            return os.environ.get(self.password_env)
        return None


class Endpoint(Credentials):
    """A server: a DSN (URL or ``key=value``) or host/port/user/dbname, plus TLS settings."""

    dsn: str | None = Field(default=None, description="libpq connection string or URL, without a password")
    host: str | None = Field(
        default=None, description="host name, IP or Unix socket directory (default 127.0.0.1)"
    )
    port: Port | None = Field(
        default=None, description="port (default 6432 for PgBouncer, 5432 for PostgreSQL)"
    )
    user: str | None = Field(default=None, description="user to log in as")
    dbname: str | None = Field(
        default=None, description="database (PgBouncer default: pgbouncer, the console)"
    )
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = Field(
        default=None, description="TLS mode, as libpq's sslmode"
    )
    sslrootcert: Path | None = Field(default=None, description="CA file for verify-ca / verify-full")
    connect_timeout: Seconds = Field(default=5.0, description="time allowed to connect")

    @field_validator("sslrootcert")
    @classmethod
    def _ca_file_exists(cls, path: Path | None) -> Path | None:
        # "system" (libpq 16+): the operating system's trusted CAs
        if path is not None and str(path) != "system" and not path.is_file():
            raise ValueError(f"CA file {str(path)!r} does not exist or is not a file")
        return path

    @field_validator("dsn")
    @classmethod
    def _dsn_parses(cls, dsn: str | None) -> str | None:
        if dsn is not None:
            try:
                libpq_conninfo.conninfo_to_dict(dsn)
            except Exception as exc:  # psycopg raises ProgrammingError with libpq's own words
                raise ValueError(f"not a valid connection string: {_first_line(str(exc))}") from None
        return dsn

    def connection_params(self, default_port: int, default_dbname: str | None) -> dict[str, str]:
        """libpq parameters, the password removed (it travels separately)."""
        params: dict[str, str] = {}
        if self.dsn:
            params.update({k: str(v) for k, v in libpq_conninfo.conninfo_to_dict(self.dsn).items()})
        for key in ("host", "port", "user", "dbname", "sslmode", "sslrootcert"):
            value = getattr(self, key)
            if value is not None:
                params[key] = str(value)
        params.pop("password", None)
        params.setdefault("host", "127.0.0.1")
        params.setdefault("port", str(default_port))
        if default_dbname is not None:
            params.setdefault("dbname", default_dbname)
        params["connect_timeout"] = str(max(1, round(self.connect_timeout)))
        return params

    def inline_password(self) -> str | None:
        """A password written into the DSN itself: accepted, but the daemon warns about it."""
        if self.dsn:
            value = libpq_conninfo.conninfo_to_dict(self.dsn).get("password")
            return None if value is None else str(value)
        return None

    def password(self) -> str | None:
        return self.resolve_password() or self.inline_password()


class PgBouncerProbe(Credentials):
    """``SELECT 1`` through PgBouncer: which databases, as whom."""

    databases: Literal["auto"] | list[str] = Field(
        default="auto",
        description="'auto' = every database PgBouncer lists (up to max_databases), or a list, or []",
    )
    max_databases: int = Field(default=20, ge=0, description="cap on databases probed with 'auto'")
    user: str | None = Field(default=None, description="user for the probe; default: the console user")


def _check_pattern(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return pattern


#: A regular expression matched against a whole name (anchored, as in Prometheus relabelling).
NamePattern = Annotated[str, AfterValidator(_check_pattern)]


class NamePatterns(_Model):
    """Which names pass the cardinality guard: an include list and an exclude list of patterns."""

    include: list[NamePattern] = Field(
        default_factory=list,
        description="regular expressions matched against the whole name; if any are given, a name must "
        "match one of them",
    )
    exclude: list[NamePattern] = Field(
        default_factory=list, description="regular expressions; a name that matches one is left out"
    )


class PgBouncerTarget(Endpoint):
    name: str = Field(min_length=1, description="label value `target` for this PgBouncer")
    postgres: str | None = Field(
        default=None,
        description="name of the postgres target behind this PgBouncer (the doctor compares their limits); "
        "default: the only postgres target, if there is exactly one",
    )
    hold_connection: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="keep the admin connection between collections: 'auto' only when its listener is "
        "visible on this host, so a PgBouncer 1.23+ SIGTERM is never delayed",
    )
    probe: PgBouncerProbe = Field(
        default_factory=PgBouncerProbe, description="SELECT 1 through this PgBouncer"
    )
    databases: NamePatterns = Field(
        default_factory=NamePatterns,
        description="cardinality guard: the databases whose pools, stats and clients are exported "
        "(the pool doctor still sees all)",
    )
    users: NamePatterns = Field(
        default_factory=NamePatterns, description="cardinality guard: the users whose pools are exported"
    )
    max_pools: int = Field(
        default=10000,
        ge=0,
        description="cardinality guard: at most this many pools exported, the first by (database, user); "
        "0 = no cap. poolwatch_pools_dropped{reason} counts the pools left out",
    )


class PostgresTarget(Endpoint):
    name: str = Field(min_length=1, description="label value `target` for this PostgreSQL")
    pool_max_size: int = Field(default=2, ge=1, le=10, description="connections poolwatch may hold")
    probe: bool = Field(default=True, description="run SELECT 1 directly against this server")


class Listen(_Model):
    host: str = Field(default="0.0.0.0", description="address to serve HTTP on")
    port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=DEFAULT_LISTEN_PORT, description="port to serve HTTP on (0: any free port)"
    )


class Logging(_Model):
    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="least severe level logged"
    )
    format: Literal["auto", "json", "console"] = Field(
        default="auto", description="'auto': console on a terminal, JSON lines otherwise"
    )


class Collection(_Model):
    timeout: Seconds = Field(default=5.0, description="per-target collection deadline")
    interval: Seconds = Field(default=15.0, description="background collection interval")
    max_age: Annotated[float, BeforeValidator(_parse_duration), Field(ge=0)] = Field(
        default=1.0, description="a scrape reuses a collection younger than this; older triggers a new one"
    )
    cached_body_max_series: int = Field(
        default=100_000,
        ge=0,
        description="a body with more series is kept compressed between scrapes, family by family "
        "(a thirtieth of the text), not as text: a gzip scrape is served it as it is, a text scrape "
        "decompresses it on the way (0: always keep the text)",
    )


class Probes(_Model):
    interval: Seconds = Field(default=10.0, description="time between SELECT 1 checks")
    timeout: Seconds = Field(default=3.0, description="deadline of one check, connect included")


class DoctorThresholds(_Model):
    """The pool doctor's thresholds; each default and its origin is documented in the README."""

    server_check_delay_max: Seconds = Field(
        default=60.0, description="idle time before a server is re-checked"
    )
    recycle_min: Seconds = Field(default=3600.0, description="server_lifetime lower bound (seed: 1 h)")
    recycle_max: Seconds = Field(default=14400.0, description="server_lifetime upper bound (seed: 4 h)")
    reserve_ratio_max: float = Field(default=0.5, ge=0, description="reserve_pool_size / pool_size bound")
    statement_timeout_min: Seconds = Field(default=30.0, description="statement_timeout band, low end")
    statement_timeout_max: Seconds = Field(default=60.0, description="statement_timeout band, high end")
    direct_connections_max: int = Field(default=100, ge=0, description="client backends bypassing PgBouncer")
    abandoned_per_minute_max: float = Field(default=1.0, ge=0, description="sessions_abandoned rate bound")
    cores: int | None = Field(default=None, ge=1, description="PostgreSQL server CPU cores, for sizing")
    spindles: int = Field(default=1, ge=0, description="effective spindle count (SSD: 1)")
    efficient_connections_max: int = Field(
        default=300, ge=1, description="connections PostgreSQL serves well"
    )
    memory_per_connection_mb: float = Field(default=10.0, gt=0, description="upper estimate per connection")
    churn_sessions_per_second_min: float = Field(
        default=1.0, ge=0, description="new sessions/s worth judging"
    )
    churn_sessions_per_transaction_max: float = Field(
        default=0.5, ge=0, description="sessions per transaction"
    )
    saturation_warn: float = Field(default=0.75, gt=0, le=1, description="used / usable connection slots")
    saturation_fail: float = Field(default=0.9, gt=0, le=1, description="used / usable connection slots")
    long_transaction_warn: Seconds = Field(default=60.0, description="oldest open transaction")
    long_transaction_fail: Seconds = Field(default=300.0, description="oldest open transaction")
    idle_in_transaction_warn: Seconds = Field(default=30.0, description="longest idle in transaction")
    idle_in_transaction_fail: Seconds = Field(default=300.0, description="longest idle in transaction")
    expect_extra_float_digits: bool = Field(
        default=False, description="clients send extra_float_digits (lib/pq, JDBC): PgBouncer must ignore it"
    )
    expect_prepared_statements: bool | None = Field(
        default=None,
        description="clients use protocol-level prepared statements (asyncpg, psycopg prepare, JDBC): "
        "true fails transaction pooling without max_prepared_statements; null = not known (warn)",
    )
    history_window: Seconds = Field(default=600.0, description="how far back rates and trends look")


class Doctor(_Model):
    enabled: bool = Field(default=True, description="evaluate the checklist after every collection")
    defaults: DoctorThresholds = Field(
        default_factory=DoctorThresholds, description="thresholds for all targets"
    )
    targets: dict[str, DoctorThresholds] = Field(
        default_factory=dict,
        description="per-target overrides: target name → any doctor.defaults keys, merged over defaults",
    )

    @model_validator(mode="before")
    @classmethod
    def _merge_overrides(cls, data: object) -> object:
        # an override names only what differs; the rest comes from `defaults`
        if isinstance(data, dict) and isinstance(data.get("targets"), dict):
            defaults = data.get("defaults") or {}
            if isinstance(defaults, DoctorThresholds):
                defaults = defaults.model_dump()
            if isinstance(defaults, dict):
                data = {
                    **data,
                    "targets": {
                        name: ({**defaults, **override} if isinstance(override, dict) else override)
                        for name, override in data["targets"].items()
                    },
                }
        return data

    def thresholds(self, target: str) -> DoctorThresholds:
        return self.targets.get(target, self.defaults)


class Config(_Model):
    listen: Listen = Field(default_factory=Listen, description="where HTTP is served; also 'HOST:PORT'")
    log: Logging = Field(default_factory=Logging, description="logging")
    collection: Collection = Field(
        default_factory=Collection, description="when and how long targets are read"
    )
    probes: Probes = Field(default_factory=Probes, description="SELECT 1 checks")
    pgbouncers: list[PgBouncerTarget] = Field(default_factory=list, description="PgBouncer admin consoles")
    postgres: list[PostgresTarget] = Field(default_factory=list, description="PostgreSQL servers")
    doctor: Doctor = Field(default_factory=Doctor, description="the pool doctor")
    web_config: Path | None = Field(
        default=None,
        description="exporter-toolkit web config file (TLS, basic auth); --web-config overrides it",
    )

    @field_validator("listen", mode="before")
    @classmethod
    def _listen_string(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_listen(value)
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        for kind, targets in (("pgbouncers", self.pgbouncers), ("postgres", self.postgres)):
            seen: set[str] = set()
            for target in targets:
                if target.name in seen:
                    raise ValueError(f"{kind}: target name {target.name!r} is used twice")
                seen.add(target.name)
        postgres_names = {t.name for t in self.postgres}
        for index, pgb in enumerate(self.pgbouncers):
            if pgb.postgres is not None and pgb.postgres not in postgres_names:
                raise ValueError(f"pgbouncers[{index}].postgres: no postgres target named {pgb.postgres!r}")
        known = postgres_names | {t.name for t in self.pgbouncers}
        for name in self.doctor.targets:
            if name not in known:
                raise ValueError(f"doctor.targets: no target named {name!r}")
        return self

    def postgres_behind(self, pgbouncer: PgBouncerTarget) -> PostgresTarget | None:
        """The PostgreSQL a PgBouncer pools for, as configured or implied by there being one."""
        if pgbouncer.postgres is not None:
            return next(t for t in self.postgres if t.name == pgbouncer.postgres)
        return self.postgres[0] if len(self.postgres) == 1 else None


def parse_listen(value: str) -> dict[str, Any]:
    """``HOST:PORT``, ``:PORT``, ``PORT`` or ``[v6]:PORT``."""
    text = value.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit():
        raise ValueError(f"listen address {value!r} is not HOST:PORT")
    return {"host": host, "port": int(port)}


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if part == "[key]":  # pydantic's marker for "the key itself was wrong": the key is already named
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def shown_value(value: object) -> str:
    if isinstance(value, dict | list):
        return type(value).__name__
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def format_validation_error(source: str, error: ValidationError) -> list[str]:
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            lines.append(f"{source}: {field_path(loc)}: unknown key")
            continue
        if item["type"] == "missing":
            lines.append(f"{source}: {field_path(loc)}: required field is missing")
            continue
        value = item.get("input")
        lines.append(f"{source}: {field_path(loc)}: {message} (got {shown_value(value)})")
    return lines


def config_from_mapping(data: Mapping[str, Any], source: str) -> Config:
    try:
        return Config.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from None


def read_yaml_mapping(path: Path, kind: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file: {}); every problem a ``ConfigError`` line.

    ``kind`` names the file in messages ("config", "web config").
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: {kind} file does not exist"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, not a {kind} file"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read {kind} file: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{path}: {where}invalid YAML: {problem}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping, got {type(data).__name__}"])
    return data


def load_config(path: Path) -> Config:
    """Read and validate a YAML file; every problem is a ``ConfigError`` line."""
    return config_from_mapping(read_yaml_mapping(path, "config"), str(path))


@dataclass(frozen=True)
class CommandLine:
    """The file-less options of the one-sidecar case (flags or their environment variables)."""

    pgbouncer_dsn: str | None = None
    postgres_dsn: str | None = None
    listen: str | None = None


def config_from_command_line(opts: CommandLine, base: Config | None = None) -> Config:
    """Merge ``--pgbouncer``/``--postgres``/``--listen`` into a config (or build one from nothing)."""
    data: dict[str, Any] = base.model_dump(mode="python", exclude_unset=True) if base else {}
    if opts.pgbouncer_dsn:
        data["pgbouncers"] = [{"name": "pgbouncer", "dsn": opts.pgbouncer_dsn}]
    if opts.postgres_dsn:
        data["postgres"] = [{"name": "postgres", "dsn": opts.postgres_dsn}]
    if opts.listen:
        data["listen"] = opts.listen
    return config_from_mapping(data, "command line")


def redact(conninfo: str) -> str:
    """A connection string safe to log: any password replaced."""
    try:
        params = libpq_conninfo.conninfo_to_dict(conninfo)
    except Exception:
        return "<unparseable connection string>"
    if "password" in params:
        params["password"] = "***"
    return libpq_conninfo.make_conninfo("", **params)


def postgres_url(params: Mapping[str, str]) -> str:
    """An asyncpg DSN (it accepts only URLs) from libpq parameters, no password in it."""
    user = quote(params.get("user", ""), safe="")
    host = params.get("host", "127.0.0.1")
    if host.startswith("/"):
        netloc = f"{user}@" if user else ""
        query = {"host": host, "port": params.get("port", "5432")}
    else:
        host_part = f"[{host}]" if ":" in host else host
        netloc, query = (f"{user}@" if user else "") + f"{host_part}:{params.get('port', '5432')}", {}
    for key in ("sslmode", "sslrootcert", "sslcert", "sslkey"):
        if key in params:
            query[key] = params[key]
    dbname = quote(params.get("dbname", ""), safe="")
    suffix = "&".join(f"{k}={quote(v, safe='/')}" for k, v in query.items())
    return f"postgresql://{netloc}/{dbname}" + (f"?{suffix}" if suffix else "")
