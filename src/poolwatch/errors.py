"""Driver exceptions → one of a few reasons plus a sentence a person can act on.

Raw driver errors are what today's exporters print, and users then ask on issue trackers what
"not allowed" means. Each known message maps to the fix; nothing here echoes a password.
"""

from __future__ import annotations

import socket

from poolwatch.logs import scrub
from poolwatch.metrics import ErrorReason

# (substring of the server's or driver's message, reason, advice)
_KNOWN: tuple[tuple[str, ErrorReason, str], ...] = (
    (
        "password authentication failed",
        "auth",
        "wrong password for this user: check password_file / password_env",
    ),
    ("no password supplied", "auth", "the server asks for a password: set password_file or password_env"),
    ("fe_sendauth", "auth", "the server asks for a password: set password_file or password_env"),
    (
        "not allowed",
        "privilege",
        "PgBouncer refused the console login: add this user to stats_users (or admin_users) in "
        "pgbouncer.ini and RELOAD",
    ),
    (
        "admin access needed",
        "privilege",
        "this command needs an admin_users entry; a stats_users user can only run SHOW",
    ),
    (
        "unrecognized configuration parameter",
        "config",
        "this is not PgBouncer's admin console: point the DSN at PgBouncer's port with dbname=pgbouncer",
    ),
    (
        "no such database",
        "config",
        "PgBouncer does not know this database: the console is dbname=pgbouncer; probes need a "
        "[databases] entry",
    ),
    ("does not exist", "config", "the database or role does not exist on the server"),
    ("permission denied", "privilege", "missing privilege: grant pg_monitor to the monitoring role"),
    ("too many connections", "connect", "the server has no free connection slots"),
    ("no more connections allowed", "connect", "PgBouncer's max_client_conn is reached"),
    ("query_wait_timeout", "timeout", "the client waited longer than PgBouncer's query_wait_timeout"),
    ("connection refused", "connect", "nothing listens at this host and port"),
    ("could not translate host name", "connect", "the host name does not resolve"),
    ("name or service not known", "connect", "the host name does not resolve"),
    ("timeout expired", "timeout", "connecting took longer than connect_timeout"),
    ("server closed the connection", "connect", "the server closed the connection"),
    ("database system is shutting down", "connect", "PostgreSQL is shutting down"),
    ("database system is starting up", "connect", "PostgreSQL is starting up"),
    ("pgbouncer cannot connect to server", "connect", "PgBouncer cannot reach PostgreSQL"),
    (
        "server login has been failing",
        "connect",
        "PgBouncer cannot log in to PostgreSQL (down, or refusing PgBouncer's login); PgBouncer "
        "retries after server_login_retry",
    ),
    (
        "does not match host name",
        "connect",
        "TLS: the server certificate is not for this host name (sslmode=verify-full): connect by a "
        "name or address the certificate lists, or use verify-ca",
    ),
    ("ssl", "connect", "TLS negotiation failed: check sslmode and sslrootcert"),
)


def classify(exc: BaseException) -> tuple[ErrorReason, str]:
    """The reason class and a one-line, secret-free explanation of ``exc``."""
    if isinstance(exc, TimeoutError):
        return "timeout", "no answer within the timeout"
    text = " ".join(str(exc).split())
    lowered = text.lower()
    for needle, reason, advice in _KNOWN:
        if needle in lowered:
            return reason, f"{advice} (server said: {scrub(_short(text))})"
    if isinstance(exc, socket.gaierror):
        return "connect", "the host name does not resolve"
    if isinstance(exc, ConnectionRefusedError):
        return "connect", "nothing listens at this host and port"
    if isinstance(exc, OSError | ConnectionError):
        return "connect", scrub(_short(text)) or type(exc).__name__
    name = type(exc).__name__
    if "Operational" in name or "Connection" in name or "Interface" in name:
        return "connect", scrub(_short(text)) or name
    return "query", scrub(_short(text)) or name


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
