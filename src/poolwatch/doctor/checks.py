"""One rule per checklist item. Each is a pure function of facts and thresholds returning a Finding.

A check whose data cannot be read says UNKNOWN and why; it never falls back to OK.

Checklist items (seed-pooling-patterns.md "Production Checklist", plus the field notes' traps):
 1 stale-connection detection   2 recycling            3 bounded overflow     4 timeouts
 5 PgBouncer above 100 clients  6 metrics exported     7 health checks        8 graceful shutdown
 9 sizing                      10 anti-patterns        11 PgBouncer traps
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import compress, pairwise, repeat
from operator import itemgetter, not_
from typing import Any, TypeVar, cast

from poolwatch.config import DoctorThresholds
from poolwatch.doctor.facts import ActivityRow, Facts, PgBouncerFacts, PostgresFacts, columns
from poolwatch.doctor.model import Finding, Status

SEED = "seed-pooling-patterns.md"
NOTES = "field-notes.md"
POOLWATCH_APP = "poolwatch"
#: collections in a row whose per-application connection count must rise every time to say "growing"
GROWTH_SAMPLES = 5

_T = TypeVar("_T")


@dataclass(frozen=True)
class Check:
    id: str
    title: str
    scope: str  # "pgbouncer" | "postgres" | "poolwatch" | "any"
    reference: str
    run: Callable[..., Finding]
    item: int = 0  # checklist item number (1-11), see the module docstring


def _finding(
    check: Check,
    target: str,
    status: Status,
    summary: str,
    *,
    evidence: dict[str, Any] | None = None,
    fix: str | None = None,
    value: float | None = None,
    kind: str | None = None,
) -> Finding:
    return Finding(
        check.id,
        check.title,
        target,
        status,
        summary,
        evidence or {},
        fix if status is not Status.OK else None,
        check.reference,
        value,
        kind=kind or check.scope,
        item=check.item,
    )


def _seconds(value: float | None) -> str:
    if value is None:
        return "unknown"
    if value >= 3600 and value % 3600 == 0:
        return f"{value / 3600:g} h"
    if value >= 60 and value % 60 == 0:
        return f"{value / 60:g} min"
    if value >= 600:
        return f"{value / 60:.0f} min"
    return f"{value:g} s"


def _down(check: Check, target: str, detail: str | None) -> Finding:
    return _finding(
        check, target, Status.UNKNOWN, f"cannot judge: the target is down ({detail or 'no answer'})"
    )


def _no_config(check: Check, pgb: PgBouncerFacts, keys: str) -> Finding:
    why = (
        "SHOW CONFIG failed"
        if not pgb.config_readable
        else f"SHOW CONFIG of PgBouncer {pgb.version_text} has no {keys}"
    )
    return _finding(check, pgb.target, Status.UNKNOWN, f"cannot judge: {why}")


def _no_pg_monitor(check: Check, pg: PostgresFacts, what: str) -> Finding:
    role = pg.role or "poolwatch's role"
    return _finding(
        check,
        pg.target,
        Status.UNKNOWN,
        f"cannot judge: {what} are hidden from {role} (it is not in pg_monitor)",
        evidence={"role": role, "can_read_all_stats": False},
        fix=f"GRANT pg_monitor TO {role}",
    )


def _app_label(row_app: str) -> str:
    return row_app or "no application_name"


def _own(application_name: str) -> bool:
    """poolwatch's own sessions: the collector ("poolwatch") and the SELECT 1 checks ("poolwatch-probe")."""
    return application_name.startswith(POOLWATCH_APP)


def _applications(pg: PostgresFacts) -> list[ActivityRow]:
    """The activity rows of every session but poolwatch's own, picked out once per sample (three
    checks walk them)."""
    rows: list[ActivityRow] | None = pg.__dict__.get("_applications")
    if rows is None:
        rows = [row for row in pg.activity if not row.application_name.startswith(POOLWATCH_APP)]
        pg.__dict__["_applications"] = rows
    return rows


# -- 1. stale-connection detection -------------------------------------------------------------
def stale_connections(check: Check, pgb: PgBouncerFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pgb.up:
        return _down(check, pgb.target, pgb.down_detail)
    query, delay = pgb.setting("server_check_query"), pgb.number("server_check_delay")
    if query is None or delay is None:
        return _no_config(check, pgb, "server_check_query/server_check_delay")
    evidence: dict[str, Any] = {"server_check_query": query, "server_check_delay": delay}
    if query.strip() == "":
        return _finding(
            check,
            pgb.target,
            Status.FAIL,
            "server_check_query is empty, which disables the check: PgBouncer hands out server "
            "connections that died while idle",
            evidence=evidence,
            value=delay,
            fix="set server_check_query = select 1 (PgBouncer 1.25+: leave the default <empty>); it is "
            "PgBouncer's pool_pre_ping",
        )
    if query == "<empty>":
        if pgb.version is not None and pgb.version < (1, 25, 0):
            return _finding(
                check,
                pgb.target,
                Status.WARN,
                f"PgBouncer {pgb.version_text} sends server_check_query '<empty>' literally: every "
                "check is a syntax error in PostgreSQL's log (only 1.25+ reads it as an empty query)",
                evidence=evidence,
                value=delay,
                fix="set server_check_query = select 1 on PgBouncer before 1.25",
            )
        evidence["check"] = "empty query (PgBouncer 1.25+ <empty>)"
        what = "an empty query"
    else:
        what = repr(query)
    if delay > t.server_check_delay_max:
        return _finding(
            check,
            pgb.target,
            Status.WARN,
            f"server_check_delay is {_seconds(delay)}: an idle server connection is re-checked only "
            f"after more than {_seconds(t.server_check_delay_max)}",
            evidence=evidence,
            value=delay,
            fix=f"lower server_check_delay to {_seconds(t.server_check_delay_max)} or less (default 30 s)",
        )
    return _finding(
        check,
        pgb.target,
        Status.OK,
        f"a server connection idle for {_seconds(delay)} is checked with {what} before reuse",
        evidence=evidence,
        value=delay,
    )


# -- 2. recycling -------------------------------------------------------------------------------
def _differing_lifetimes(names: Sequence[Any], lifetimes: Sequence[Any], lifetime: float) -> dict[str, float]:
    """Databases whose effective server_lifetime (SHOW DATABASES, 1.23+) is not the global one."""
    # almost always every database has the global value: look at the distinct values first
    if not any(isinstance(v, int | float) and v != lifetime for v in set(lifetimes)):
        return {}
    per_db = {
        str(name): float(value)
        for name, value in zip(names, lifetimes, strict=True)
        if isinstance(value, int | float) and name != "pgbouncer"
    }
    return {name: value for name, value in per_db.items() if value != lifetime}


def recycling(check: Check, pgb: PgBouncerFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pgb.up:
        return _down(check, pgb.target, pgb.down_detail)
    lifetime = pgb.number("server_lifetime")
    if lifetime is None:
        return _no_config(check, pgb, "server_lifetime")
    # 1.23+ lists the effective server_lifetime per database; only the ones that differ matter
    names, lifetimes = columns(pgb.databases, "name", "server_lifetime")
    differing = _carried(
        pgb,
        "differing_lifetimes",
        (names, lifetimes, lifetime),
        lambda: _differing_lifetimes(names, lifetimes, lifetime),
    )
    effective = {"(global)": lifetime, **differing}
    once = [name for name, value in effective.items() if value == 0]
    too_long = {name: value for name, value in effective.items() if value > t.recycle_max}
    too_short = {name: value for name, value in effective.items() if 0 < value < t.recycle_min}
    evidence: dict[str, Any] = {"server_lifetime": lifetime}
    if differing:
        evidence["server_lifetime_per_database"] = differing
    evidence["recycle_window"] = f"{_seconds(t.recycle_min)}–{_seconds(t.recycle_max)}"
    band = evidence["recycle_window"]
    fix = f"set server_lifetime within {band} (e.g. 3600); it is PgBouncer's pool_recycle"
    if once:
        # measured on 1.18 and 1.24: 0 closes every server connection after one use
        return _finding(
            check,
            pgb.target,
            Status.FAIL,
            "server_lifetime = 0 ("
            + ", ".join(once)
            + "): every server connection is closed after one use, so each transaction opens a new "
            "PostgreSQL backend",
            evidence=evidence,
            value=0.0,
            fix=fix,
        )
    if too_long:
        what = ", ".join(f"{n}: {_seconds(v)}" for n, v in too_long.items())
        return _finding(
            check,
            pgb.target,
            Status.FAIL,
            f"server connections live too long ({what}); the recycle window is {band}",
            evidence=evidence,
            value=max(too_long.values()),
            fix=fix,
        )
    if too_short:
        what = ", ".join(f"{n}: {_seconds(v)}" for n, v in too_short.items())
        return _finding(
            check,
            pgb.target,
            Status.WARN,
            f"server connections are recycled very often ({what}), below {band}: connection churn on "
            "PostgreSQL",
            evidence=evidence,
            value=min(too_short.values()),
            fix=f"raise server_lifetime into {band}",
        )
    return _finding(
        check,
        pgb.target,
        Status.OK,
        f"server connections are recycled after {_seconds(lifetime)}, within {band}",
        evidence=evidence,
        value=lifetime,
    )


def connection_age(check: Check, pg: PostgresFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pg.up:
        return _down(check, pg.target, pg.down_detail)
    if not pg.activity_readable:
        return _no_pg_monitor(check, pg, "other roles' connections")
    oldest: dict[str, float] = {}
    for row in _applications(pg):
        if row.oldest_backend_age is None:
            continue
        app = _app_label(row.application_name)
        oldest[app] = max(oldest.get(app, 0.0), row.oldest_backend_age)
    limit = t.recycle_max
    old = {app: age for app, age in oldest.items() if age > limit}
    top = max(oldest.values(), default=0.0)
    evidence = {
        "oldest_connection_seconds_by_application": {
            k: round(v) for k, v in sorted(oldest.items(), key=lambda kv: -kv[1])
        },
        "recycle_window_max_seconds": limit,
    }
    if old:
        apps = ", ".join(f"{a} ({_seconds(round(v))})" for a, v in sorted(old.items(), key=lambda kv: -kv[1]))
        return _finding(
            check,
            pg.target,
            Status.WARN,
            f"connections older than the {_seconds(limit)} recycle window: {apps}",
            evidence=evidence,
            value=top,
            fix="set a maximum connection lifetime of 1–4 h in the client pool (SQLAlchemy "
            "pool_recycle, asyncpg max_inactive_connection_lifetime) and server_lifetime in PgBouncer",
        )
    if not oldest:
        return _finding(
            check,
            pg.target,
            Status.OK,
            "no client connections besides poolwatch's own",
            evidence=evidence,
            value=0.0,
        )
    return _finding(
        check,
        pg.target,
        Status.OK,
        f"every client connection is younger than {_seconds(limit)} (oldest {_seconds(round(top))})",
        evidence=evidence,
        value=top,
    )


# -- 3. bounded overflow ------------------------------------------------------------------------
def _int(value: Any) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return 0


@dataclass(frozen=True)
class _DatabaseLimits:
    """SHOW DATABASES as the limit checks read it, the admin console's row left out: names,
    (pool_size, reserve) as printed, max_connections as printed, and each distinct printed pair's
    effective (pool size, reserve) (a 0 pool_size falls back to default_pool_size, a missing reserve
    to reserve_pool_size)."""

    names: list[str]
    printed: list[tuple[Any, Any]]
    caps: Sequence[Any]
    effective: dict[tuple[Any, Any], tuple[int, int]]


def _carried(pgb: PgBouncerFacts, name: str, inputs: tuple[Any, ...], compute: Callable[[], _T]) -> _T:
    """``compute()``, or the result it gave at an earlier collection of this PgBouncer when
    ``inputs`` were equal then.

    SHOW DATABASES, SHOW CONFIG and the list of pools rarely change between collections, and at
    10,000 pools what the limit checks derive from them was most of the doctor's time. The
    computations are pure functions of ``inputs``, so a result carried over is the one computing
    afresh would give. ``inputs`` hold whole columns: comparing two 10,000-value tuples runs in C
    and costs a fraction of a millisecond. A value that is == but of another type (5 and 5.0)
    means the same to these computations (they read numbers through ``_int``).
    """
    entry = pgb.memo.get(name)
    if entry is not None and entry[0] == inputs:
        return cast(_T, entry[1])
    value = compute()
    pgb.memo[name] = (inputs, value)
    return value


def _database_limits(pgb: PgBouncerFacts) -> _DatabaseLimits:
    """Read column-wise, computed once per distinct pair, kept on the facts (several checks ask)
    and carried over to the next collection while SHOW DATABASES and the defaults are unchanged."""
    cached = pgb.derived.get("database_limits")
    if isinstance(cached, _DatabaseLimits):
        return cached
    rows = pgb.databases
    positions = getattr(rows, "positions", None)
    names, sizes, caps = columns(rows, "name", "pool_size", "max_connections")
    if positions is not None:
        reserve_column = "reserve_pool_size" if "reserve_pool_size" in positions else "reserve_pool"
        (reserves,) = columns(rows, reserve_column)
    else:
        reserves = [row.get("reserve_pool_size", row.get("reserve_pool")) for row in rows]
    defaults = (pgb.setting("default_pool_size"), pgb.setting("reserve_pool_size"))
    limits = _carried(
        pgb,
        "database_limits",
        (names, sizes, reserves, caps, *defaults),
        lambda: _read_database_limits(names, sizes, reserves, caps, *defaults),
    )
    pgb.derived["database_limits"] = limits
    return limits


def _read_database_limits(
    names: Sequence[Any],
    sizes: Sequence[Any],
    reserves: Sequence[Any],
    caps: Sequence[Any],
    default_pool_size: str | None,
    reserve_pool_size: str | None,
) -> _DatabaseLimits:
    if "pgbouncer" in names:
        keep = [name != "pgbouncer" for name in names]
        names, sizes, reserves, caps = (list(compress(c, keep)) for c in (names, sizes, reserves, caps))
    printed = list(zip(sizes, reserves, strict=True))
    default_size = _int(default_pool_size)
    default_reserve = _int(reserve_pool_size)
    effective = {
        (size, reserve): (
            _int(size) or default_size,
            _int(reserve) if reserve is not None else default_reserve,
        )
        for size, reserve in set(printed)
    }
    return _DatabaseLimits(list(map(str, names)), printed, caps, effective)


def max_server_connections(pgb: PgBouncerFacts) -> tuple[int, dict[str, int]]:
    """The most server connections PgBouncer could open, per database, from its limits.

    Per database: (pool_size + reserve_pool_size) × users with a pool there, capped by the
    database's max_db_connections; the total is capped by max_user_connections × users.
    Computed once per collection (bounded_overflow and sizing both ask) and carried over while its
    inputs are unchanged, from whole columns and once per distinct (pool_size, reserve,
    max_connections, users) combination.
    """
    total, per_db = _server_connections(pgb)
    return total, dict(per_db)


def _server_connections(pgb: PgBouncerFacts) -> tuple[int, dict[str, int]]:
    """``max_server_connections`` without the copy: the dict is shared by the findings' evidence
    and by later collections, so nothing may change it."""
    cached = pgb.derived.get("max_server_connections")
    if cached is not None:
        return cast(tuple[int, dict[str, int]], cached)
    databases, users = columns(pgb.pools, "database", "user")
    limits = _database_limits(pgb)
    settings = (pgb.setting("max_db_connections"), pgb.setting("max_user_connections"))
    result = _carried(
        pgb,
        "max_server_connections",
        (limits, databases, users, *settings),
        lambda: _count_server_connections(limits, databases, users, *settings),
    )
    pgb.derived["max_server_connections"] = result
    return result


def _count_server_connections(
    limits: _DatabaseLimits,
    databases: Sequence[Any],
    users: Sequence[Any],
    max_db_connections: str | None,
    max_user_connections: str | None,
) -> tuple[int, dict[str, int]]:
    max_db = _int(max_db_connections)
    max_user = _int(max_user_connections)
    # distinct (database, user) pairs, then users per database: one pass, in C
    pairs = set(zip(map(str, databases), map(str, users), strict=True))
    users_per_db = Counter(db for db, _ in pairs)
    users_per_db.pop("pgbouncer", None)
    keys = list(
        zip(
            map(limits.effective.__getitem__, limits.printed),
            limits.caps,
            map(users_per_db.get, limits.names, repeat(0)),
            strict=True,
        )
    )
    capped: dict[tuple[tuple[int, int], Any, int], int] = {}
    for (size, reserve), cap, n_users in set(keys):
        total = (size + reserve) * max(1, n_users)
        db_cap = _int(cap) or max_db
        if db_cap:
            total = min(total, db_cap)
        capped[(size, reserve), cap, n_users] = total
    per_db = dict(zip(limits.names, map(capped.__getitem__, keys), strict=True))
    total = sum(per_db.values())
    if max_user:
        all_users = {u for db, u in pairs if db != "pgbouncer"}
        total = min(total, max_user * max(1, len(all_users)))
    return total, per_db


def _reserve_ratios(
    limits: _DatabaseLimits, pool: int, reserve: int, ratio_max: float
) -> tuple[dict[str, float], float]:
    """reserve / pool size of the default and of every database: (those above ``ratio_max``, the
    largest; 0 when none has a pool size)."""
    ratios: dict[str, float] = {}
    if pool:
        ratios["(default)"] = reserve / pool
    ratio = {pair: res / size for pair, (size, res) in limits.effective.items() if size}
    if len(ratio) == len(limits.effective):
        ratios.update(zip(limits.names, map(ratio.__getitem__, limits.printed), strict=True))
    else:  # some pool size is 0 (and so is default_pool_size): those databases have no ratio
        for name, pair in zip(limits.names, limits.printed, strict=True):
            if pair in ratio:
                ratios[name] = ratio[pair]
    over = {k: v for k, v in ratios.items() if v > ratio_max}
    return over, max(ratios.values(), default=0.0)


def bounded_overflow(check: Check, pgb: PgBouncerFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pgb.up:
        return _down(check, pgb.target, pgb.down_detail)
    if not pgb.config_readable or pgb.setting("default_pool_size") is None:
        return _no_config(check, pgb, "default_pool_size")
    pool, reserve = _int(pgb.setting("default_pool_size")), _int(pgb.setting("reserve_pool_size"))
    limits = _database_limits(pgb)
    over, worst_ratio = _carried(
        pgb,
        "reserve_ratios",
        (limits, pool, reserve, t.reserve_ratio_max),
        lambda: _reserve_ratios(limits, pool, reserve, t.reserve_ratio_max),
    )
    total, per_db = _server_connections(pgb)
    pg = facts.postgres_named(facts.links.get(pgb.target))
    usable = pg.usable_connections if pg is not None and pg.up else None
    evidence: dict[str, Any] = {
        "default_pool_size": pool,
        "reserve_pool_size": reserve,
        "reserve_ratio_max": t.reserve_ratio_max,
        "max_server_connections": total,
        "max_server_connections_per_database": per_db,
    }
    if usable is not None:
        evidence["postgres_usable_connections"] = usable
    problems, status = [], Status.OK
    if over:
        status = Status.FAIL
        problems.append(
            "reserve_pool_size above "
            + f"{t.reserve_ratio_max:g} × pool_size ("
            + ", ".join(f"{k}: {v:.2f}" for k, v in over.items())
            + ")"
        )
    if usable is not None and total > usable:
        status = Status.FAIL
        problems.append(
            f"PgBouncer may open {total} server connections but PostgreSQL "
            f"{pg.target if pg else ''} has only {usable} usable slots"
        )
    if problems:
        return _finding(
            check,
            pgb.target,
            status,
            "; ".join(problems),
            evidence=evidence,
            value=worst_ratio,
            fix=f"keep reserve_pool_size ≤ pool_size × {t.reserve_ratio_max:g} (the seed's max_overflow = "
            "pool_size / 2) and the sum of (pool_size + reserve) over all pools under max_connections − "
            "reserved slots (cap with max_db_connections / max_user_connections)",
        )
    if usable is None:
        if pg is None:
            why = "no PostgreSQL target is linked to it (pgbouncers[].postgres)"
        elif not pg.up:
            why = f"PostgreSQL {pg.target} is down"
        else:
            why = f"max_connections of PostgreSQL {pg.target} could not be read"
        return _finding(
            check,
            pgb.target,
            Status.UNKNOWN,
            f"reserve within bounds and at most {total} server connections, but {why}, so the total "
            "cannot be compared with max_connections",
            evidence=evidence,
            value=worst_ratio,
            fix="add the PostgreSQL behind this PgBouncer as a postgres target (and pgbouncers[].postgres "
            "if there are several)",
        )
    return _finding(
        check,
        pgb.target,
        Status.OK,
        f"reserve ≤ {t.reserve_ratio_max:g} × pool; at most {total} server connections fit in "
        f"{usable} usable PostgreSQL slots",
        evidence=evidence,
        value=worst_ratio,
    )


# -- 4. timeouts --------------------------------------------------------------------------------
def _effective_setting(pg: PostgresFacts, name: str, role: str, db: str) -> tuple[float | None, str]:
    """What a new session of ``role`` in ``db`` starts with, and where it comes from.

    PostgreSQL's precedence: ALTER ROLE r IN DATABASE d > ALTER ROLE r > ALTER DATABASE d >
    ALTER ROLE ALL > the server default (postgresql.conf / ALTER SYSTEM).
    """
    settings = {(d, r): v for d, r, n, v in pg.role_settings if n == name}
    for key, source in (
        ((db, role), "ALTER ROLE IN DATABASE"),
        (("", role), "ALTER ROLE"),
        ((db, ""), "ALTER DATABASE"),
        (("", ""), "ALTER ROLE ALL"),
    ):
        if key in settings:
            return settings[key], source
    server = pg.statement_timeout if name == "statement_timeout" else pg.idle_in_transaction_timeout
    return server, "server default"


def _application_sessions(pg: PostgresFacts) -> list[tuple[str, str]]:
    """(role, database) pairs of the client sessions seen, poolwatch's own left out."""
    pairs = {
        (row.usename, row.datname)
        for row in _applications(pg)
        if row.usename and row.datname and row.usename != pg.role
    }
    return sorted(pairs)


def _configured_pairs(pg: PostgresFacts) -> list[tuple[str, str, str]]:
    """(label, role, database) of every ALTER ROLE/DATABASE ... SET of a timeout: the roles and
    databases an administrator set up for applications ("\0" matches no real name)."""
    pairs = {
        (f"{role or 'ALL'}@{db or '*'}", role or "\0", db or "\0") for db, role, _, _ in pg.role_settings
    }
    return sorted(pairs)


def postgres_timeouts(check: Check, pg: PostgresFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pg.up:
        return _down(check, pg.target, pg.down_detail)
    if not pg.role_settings_readable:
        return _finding(
            check, pg.target, Status.UNKNOWN, "cannot judge: pg_db_role_setting could not be read"
        )
    band = f"{_seconds(t.statement_timeout_min)}–{_seconds(t.statement_timeout_max)}"
    overrides = {
        f"{role or 'ALL'}@{db or '*'}": value
        for db, role, name, value in pg.role_settings
        if name == "statement_timeout"
    }
    evidence: dict[str, Any] = {
        "statement_timeout": pg.statement_timeout if pg.statement_timeout is not None else "unknown",
        "idle_in_transaction_session_timeout": pg.idle_in_transaction_timeout
        if pg.idle_in_transaction_timeout is not None
        else "unknown",
        "statement_timeout_band": band,
    }
    if overrides:
        evidence["statement_timeout_overrides"] = overrides
    # judge what the application sessions really start with; with none seen (or hidden without
    # pg_monitor), the roles/databases given their own settings, else the server default
    sessions = _application_sessions(pg) if pg.activity_readable else []
    pairs: list[tuple[str, str, str]] = [(f"{r}@{d}", r, d) for r, d in sessions]
    if not pairs:
        pairs = _configured_pairs(pg) or [("(server default)", "\0", "\0")]
    statement: dict[str, tuple[float | None, str]] = {
        label: _effective_setting(pg, "statement_timeout", role, db) for label, role, db in pairs
    }
    idle: dict[str, tuple[float | None, str]] = {
        label: _effective_setting(pg, "idle_in_transaction_session_timeout", role, db)
        for label, role, db in pairs
    }
    if pairs[0][0] != "(server default)":
        evidence["effective_statement_timeout"] = {k: v for k, (v, _) in statement.items()}
        evidence["effective_idle_in_transaction_session_timeout"] = {k: v for k, (v, _) in idle.items()}
    hidden = [k for k, (v, _) in [*statement.items(), *idle.items()] if v is None]
    unset_default = [k for k, (v, src) in statement.items() if v == 0 and src == "server default"]
    unset_explicit = [k for k, (v, src) in statement.items() if v == 0 and src != "server default"]
    # nothing anywhere (server default and every ALTER ROLE/DATABASE) is a fail; a role left out
    # while others got one is a warning
    set_anywhere = bool(pg.statement_timeout) or any(
        v for _, _, name, v in pg.role_settings if name == "statement_timeout"
    )
    outside = {
        k: v
        for k, (v, _) in statement.items()
        if v and not t.statement_timeout_min <= v <= t.statement_timeout_max
    }
    idle_unset = [k for k, (v, _) in idle.items() if v == 0]
    problems, status = [], Status.OK
    if unset_default:
        status = Status.WARN if set_anywhere else Status.FAIL
        problems.append("no statement_timeout for " + ", ".join(unset_default))
    if unset_explicit:
        status = max(status, Status.WARN)
        problems.append("statement_timeout explicitly 0 for " + ", ".join(unset_explicit))
    if outside:
        status = max(status, Status.WARN)
        problems.append(
            f"statement_timeout outside {band}: "
            + ", ".join(f"{k} {_seconds(v)}" for k, v in outside.items())
        )
    if idle_unset:
        status = max(status, Status.WARN)
        problems.append("no idle_in_transaction_session_timeout for " + ", ".join(idle_unset))
    values = [v for v, _ in statement.values() if v is not None]
    value = 0.0 if (unset_default or unset_explicit) else (max(values) if values else None)
    roles = sorted(
        {
            role
            for label, role, _ in pairs
            if label in {*unset_default, *unset_explicit, *outside, *idle_unset} and role != "\0"
        }
    )
    who = ", ".join(roles) if roles else "<application role>"
    fix = (
        f"ALTER ROLE {who} SET statement_timeout = '30s' (within {band}); ALTER ROLE {who} SET "
        "idle_in_transaction_session_timeout = '60s' (or server-wide: ALTER SYSTEM SET ...; "
        "SELECT pg_reload_conf())"
    )
    if problems:
        return _finding(
            check, pg.target, status, "; ".join(problems), evidence=evidence, value=value, fix=fix
        )
    if hidden:
        role = pg.role or "poolwatch's role"
        return _finding(
            check,
            pg.target,
            Status.UNKNOWN,
            f"cannot judge {', '.join(sorted(set(hidden)))}: an ALTER ROLE/DATABASE ... SET on {role} or "
            "its database hides the server default",
            evidence=evidence,
            value=value,
            fix="set the timeouts on the application roles explicitly (ALTER ROLE ... SET)",
        )
    scope = (
        "the server default"
        if pairs[0][0] == "(server default)"
        else ", ".join(label for label, _, _ in pairs)
    )
    return _finding(
        check,
        pg.target,
        Status.OK,
        f"statement_timeout within {band} and idle_in_transaction_session_timeout set for {scope}",
        evidence=evidence,
        value=value,
    )


def pgbouncer_timeouts(check: Check, pgb: PgBouncerFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pgb.up:
        return _down(check, pgb.target, pgb.down_detail)
    wait, connect = pgb.number("query_wait_timeout"), pgb.number("server_connect_timeout")
    if wait is None or connect is None:
        return _no_config(check, pgb, "query_wait_timeout/server_connect_timeout")
    evidence = {
        "query_wait_timeout": wait,
        "server_connect_timeout": connect,
        "query_timeout": pgb.number("query_timeout"),
        "idle_transaction_timeout": pgb.number("idle_transaction_timeout"),
    }
    unset = [
        name
        for name, value in (("query_wait_timeout", wait), ("server_connect_timeout", connect))
        if value == 0
    ]
    if unset:
        return _finding(
            check,
            pgb.target,
            Status.WARN,
            " and ".join(unset) + " = 0: a client can wait for a server connection forever",
            evidence=evidence,
            value=wait,
            fix="set query_wait_timeout (default 120) and server_connect_timeout (default 15)",
        )
    return _finding(
        check,
        pgb.target,
        Status.OK,
        f"clients wait at most {_seconds(wait)} for a server (query_wait_timeout); connecting to "
        f"PostgreSQL may take {_seconds(connect)} (server_connect_timeout)",
        evidence=evidence,
        value=wait,
    )


# -- 5. a pooler above 100 concurrent connections -------------------------------------------------
_ADDR_PORT = itemgetter(0, 1)
_ADDR_APP = itemgetter(0, 2)
_APP = itemgetter(2)


def direct_connections(check: Check, pg: PostgresFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pg.up:
        return _down(check, pg.target, pg.down_detail)
    if not pg.backends_readable:
        return _no_pg_monitor(check, pg, "client addresses")
    poolers = facts.pgbouncers_in_front_of(pg.target)
    blind = [b.target for b in poolers if not b.up or not b.servers_readable]
    if blind:
        return _finding(
            check,
            pg.target,
            Status.UNKNOWN,
            "cannot tell pooled connections from direct ones: SHOW SERVERS of "
            + ", ".join(blind)
            + " could not be read",
            evidence={"pgbouncers": [b.target for b in poolers]},
        )
    pooled: set[tuple[str, int]] = set()
    for pgb in poolers:
        pooled |= pgb.server_endpoints
    # Counted in C, a thousand backends at a time: per (address, application) and, when a PgBouncer
    # is in front, split by whether (address, port) is one of its server connections. A Counter keeps
    # first occurrences in order, so the sources below come in the order their first direct backend
    # appears (ties in "top_direct_sources" stay in that order).
    backends = pg.backends
    through = 0
    if pooled:
        is_pooled = list(map(pooled.__contains__, map(_ADDR_PORT, backends)))
        through_apps = Counter(map(_APP, compress(backends, is_pooled)))
        through = sum(n for app, n in through_apps.items() if not _own(app))
        direct = Counter(map(_ADDR_APP, compress(backends, map(not_, is_pooled))))
    else:
        direct = Counter(map(_ADDR_APP, backends))
    bypass: dict[str, int] = {}
    for (addr, app), n in direct.items():
        if _own(app):
            continue
        key = f"{addr} {_app_label(app)}"
        bypass[key] = bypass.get(key, 0) + n
    count = sum(bypass.values())
    top = dict(sorted(bypass.items(), key=lambda kv: -kv[1])[:5])
    evidence: dict[str, Any] = {
        "direct_client_connections": count,
        "through_pgbouncer": through,
        "limit": t.direct_connections_max,
        "top_direct_sources": top,
        "pgbouncers": [b.target for b in poolers],
    }
    endpoints = sum(len(b.server_endpoints) for b in poolers)
    if count > t.direct_connections_max and endpoints and not through:
        # PgBouncer has server connections, yet none is among PostgreSQL's backends: the addresses
        # are translated between them (NAT, a proxy), so "direct" cannot be told from "pooled"
        return _finding(
            check,
            pg.target,
            Status.UNKNOWN,
            f"cannot judge: none of the {endpoints} server connections PgBouncer reports appears among "
            "PostgreSQL's client addresses (NAT or a proxy between them?)",
            evidence=evidence,
            value=count,
        )
    if count > t.direct_connections_max:
        return _finding(
            check,
            pg.target,
            Status.FAIL,
            f"{count} client connections reach PostgreSQL without PgBouncer (more than "
            f"{t.direct_connections_max}); largest: "
            + ", ".join(f"{k} ({v})" for k, v in list(top.items())[:3]),
            evidence=evidence,
            value=count,
            fix="route these applications through PgBouncer (transaction pooling) instead of "
            "connecting directly",
        )
    via = f"; {through} through PgBouncer" if poolers else " (no PgBouncer target in front of it)"
    return _finding(
        check,
        pg.target,
        Status.OK,
        f"{count} client connection{'s' if count != 1 else ''} bypass{'' if count != 1 else 'es'} "
        f"PgBouncer (limit {t.direct_connections_max}){via}",
        evidence=evidence,
        value=count,
    )


# -- 6. metrics exported / targets up --------------------------------------------------------------
def targets_up(check: Check, facts: Facts, t: DoctorThresholds) -> Finding:
    everything = [(b.target, "pgbouncer", b.up, b.down_detail) for b in facts.pgbouncers] + [
        (p.target, "postgres", p.up, p.down_detail) for p in facts.postgres
    ]
    down = {f"{name} ({kind})": detail or "no answer" for name, kind, up, detail in everything if not up}
    evidence = {
        "targets": len(everything),
        "up": [f"{name} ({kind})" for name, kind, up, _ in everything if up],
        "down": down,
    }
    if not everything:
        return _finding(check, "poolwatch", Status.UNKNOWN, "no targets configured", evidence=evidence)
    if down:
        return _finding(
            check,
            "poolwatch",
            Status.FAIL,
            f"{len(down)} of {len(everything)} targets are down, their pool metrics are missing: "
            + "; ".join(f"{k}: {v}" for k, v in down.items()),
            evidence=evidence,
            value=len(down),
            fix="see /readyz and poolwatch_target_down_reason for the reason of each",
        )
    return _finding(
        check,
        "poolwatch",
        Status.OK,
        f"pool metrics exported for all {len(everything)} targets",
        evidence=evidence,
        value=0,
    )


# -- 7. health checks validate connectivity ---------------------------------------------------------
def health_checks(check: Check, target: str, kind: str, facts: Facts) -> Finding:
    probes = [p for p in facts.probes if p.target == target and p.kind == kind]
    configured = facts.probes_configured.get(target, False)
    if not configured:
        return _finding(
            check,
            target,
            Status.WARN,
            "no SELECT 1 check is configured for this target",
            fix="set probe: true (postgres) or probe.databases: auto (pgbouncer)",
            kind=kind,
        )
    ran = [p for p in probes if p.success is not None]
    if not ran:
        bouncer = next((b for b in facts.pgbouncers if b.target == target), None)
        if kind == "pgbouncer" and not probes and bouncer is not None and not bouncer.up:
            why = "the target is down, and probe.databases 'auto' needs its database list"
        elif kind == "pgbouncer" and not probes:
            why = "PgBouncer lists no database to check"
        else:
            why = "the SELECT 1 checks have not run yet"
        return _finding(check, target, Status.UNKNOWN, f"cannot judge: {why}", kind=kind)
    failing = {p.database: p.detail or "failed" for p in ran if p.success is False}
    evidence = {"checked": sorted(p.database for p in ran), "failing": failing}
    if failing:
        return _finding(
            check,
            target,
            Status.FAIL,
            f"SELECT 1 fails for {len(failing)} of {len(ran)} database(s): "
            + "; ".join(f"{db}: {why}" for db, why in failing.items()),
            evidence=evidence,
            value=len(failing),
            fix="see the reason; poolwatch_probe_success shows when it recovers",
            kind=kind,
        )
    where = "through PgBouncer" if kind == "pgbouncer" else "directly"
    return _finding(
        check,
        target,
        Status.OK,
        f"SELECT 1 passes {where} for {len(ran)} database(s): " + ", ".join(evidence["checked"]),
        evidence=evidence,
        value=0,
        kind=kind,
    )


# -- 8. graceful shutdown --------------------------------------------------------------------------
def _rate(
    history: list[PostgresFacts], now: PostgresFacts, attr: str, window: float
) -> tuple[float | None, float]:
    """Per-second rate of a counter between the oldest sample in the window and now; resets skipped."""
    current = getattr(now, attr)
    if current is None:
        return None, 0.0
    base = None
    for past in history:
        value = getattr(past, attr, None)
        if (
            value is not None
            and now.collected_at - past.collected_at <= window
            and past.collected_at < now.collected_at
        ):
            base = past
            break
    if base is None:
        return None, 0.0
    elapsed = now.collected_at - base.collected_at
    delta = current - getattr(base, attr)
    if delta < 0 or elapsed <= 0:  # counters reset (stats reset, restart): no judgement from this pair
        return None, elapsed
    return delta / elapsed, elapsed


def _needs_pg14(check: Check, pg: PostgresFacts) -> Finding | None:
    if pg.version_num is not None and pg.version_num < 140000:
        return _finding(
            check,
            pg.target,
            Status.UNKNOWN,
            f"cannot judge: PostgreSQL {pg.version_num // 10000} has no session counters "
            "(pg_stat_database.sessions needs 14+)",
        )
    return None


def graceful_shutdown(check: Check, pg: PostgresFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pg.up:
        return _down(check, pg.target, pg.down_detail)
    too_old = _needs_pg14(check, pg)
    if too_old is not None:
        return too_old
    rate, elapsed = _rate(facts.past_postgres(pg.target), pg, "sessions_abandoned", t.history_window)
    if rate is None:
        return _finding(
            check,
            pg.target,
            Status.UNKNOWN,
            "cannot judge yet: the rate of abandoned sessions needs two collections",
        )
    per_minute = rate * 60
    evidence = {
        "sessions_abandoned_per_minute": round(per_minute, 3),
        "limit_per_minute": t.abandoned_per_minute_max,
        "measured_over_seconds": round(elapsed, 1),
    }
    if per_minute > t.abandoned_per_minute_max:
        return _finding(
            check,
            pg.target,
            Status.WARN,
            f"{per_minute:.1f} sessions/min end with the client gone without saying goodbye (killed pods, "
            "crashes, no engine.dispose() on shutdown)",
            evidence=evidence,
            value=per_minute,
            fix="close pools on shutdown (await engine.dispose(), await pool.close()) and give pods a "
            "terminationGracePeriodSeconds long enough for it",
        )
    return _finding(
        check,
        pg.target,
        Status.OK,
        f"{per_minute:.2f} abandoned sessions/min (limit {t.abandoned_per_minute_max:g})",
        evidence=evidence,
        value=per_minute,
    )


# -- 9. sizing -------------------------------------------------------------------------------------
def _above(per_db: dict[str, int], ceiling: int) -> dict[str, int]:
    return {db: n for db, n in per_db.items() if n > ceiling}


def sizing(check: Check, pgb: PgBouncerFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pgb.up:
        return _down(check, pgb.target, pgb.down_detail)
    if not pgb.config_readable:
        return _no_config(check, pgb, "default_pool_size")
    total, per_db = _server_connections(pgb)
    pg = facts.postgres_named(facts.links.get(pgb.target))
    current = pg.client_backends if pg is not None and pg.up else None
    evidence: dict[str, Any] = {
        "max_server_connections": total,
        "max_server_connections_per_database": per_db,
        "efficient_max": t.efficient_connections_max,
        "memory_at_max_mb": f"{total * 5:g}–{total * t.memory_per_connection_mb:g}",
    }
    problems, status = [], Status.OK
    if t.cores is not None:
        rule = t.cores * 2 + t.spindles
        pool_size = min(t.cores * 4, 50)
        ceiling = pool_size + pool_size // 2
        evidence.update(
            {
                "cores": t.cores,
                "rule_of_thumb": rule,
                "async_pool_size": pool_size,
                "async_max_overflow": pool_size // 2,
                "per_database_ceiling": ceiling,
            }
        )
        big = _carried(pgb, "sizing_big", (per_db, ceiling), lambda: _above(per_db, ceiling))
        if big:
            status = Status.WARN
            problems.append(
                f"databases above min(cores×4, 50) + overflow = {ceiling} server connections: "
                + ", ".join(f"{db}: {n}" for db, n in big.items())
                + f" (cores×2+spindles = {rule})"
            )
    if total > t.efficient_connections_max:
        status = Status.WARN
        problems.append(
            f"up to {total} server connections, above the ~{t.efficient_connections_max} PostgreSQL "
            f"serves efficiently ({total * 5:g}–{total * t.memory_per_connection_mb:g} MB of backend memory)"
        )
    if current is not None:
        evidence["postgres_client_connections"] = current
        evidence["memory_now_mb"] = f"{current * 5:g}–{current * t.memory_per_connection_mb:g}"
    fix = "smaller pools win: size pools near cores×2+spindles and let PgBouncer queue the rest"
    if problems:
        return _finding(
            check, pgb.target, status, "; ".join(problems), evidence=evidence, value=total, fix=fix
        )
    if t.cores is None:
        return _finding(
            check,
            pgb.target,
            Status.UNKNOWN,
            f"at most {total} server connections (within ~{t.efficient_connections_max}), but the "
            "PostgreSQL server's core count is not configured, so pools cannot be compared with "
            "cores×2+spindles",
            evidence=evidence,
            value=total,
            fix="set doctor.defaults.cores (and spindles) to the PostgreSQL server's",
        )
    return _finding(
        check,
        pgb.target,
        Status.OK,
        f"at most {total} server connections; every database within {evidence['per_database_ceiling']} "
        f"(cores×2+spindles = {evidence['rule_of_thumb']})",
        evidence=evidence,
        value=total,
    )


# -- 10. anti-patterns -------------------------------------------------------------------------------
def connection_churn(check: Check, pg: PostgresFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pg.up:
        return _down(check, pg.target, pg.down_detail)
    too_old = _needs_pg14(check, pg)
    if too_old is not None:
        return too_old
    history = facts.past_postgres(pg.target)
    sessions, elapsed = _rate(history, pg, "sessions", t.history_window)
    xacts, _ = _rate(history, pg, "xacts", t.history_window)
    if sessions is None or xacts is None:
        return _finding(
            check, pg.target, Status.UNKNOWN, "cannot judge yet: session churn needs two collections"
        )
    ratio = sessions / xacts if xacts > 0 else float("inf") if sessions > 0 else 0.0
    evidence = {
        "new_sessions_per_second": round(sessions, 3),
        "transactions_per_second": round(xacts, 3),
        "sessions_per_transaction": round(ratio, 3) if ratio != float("inf") else "inf",
        "limits": f"≥ {t.churn_sessions_per_second_min:g} sessions/s and > "
        f"{t.churn_sessions_per_transaction_max:g} sessions per transaction",
        "measured_over_seconds": round(elapsed, 1),
    }
    if sessions >= t.churn_sessions_per_second_min and ratio > t.churn_sessions_per_transaction_max:
        return _finding(
            check,
            pg.target,
            Status.WARN,
            f"{sessions:.1f} new sessions/s for {xacts:.1f} transactions/s: connections are opened per "
            "request (an engine or pool created per request?)",
            evidence=evidence,
            value=sessions,
            fix="create one engine/pool per process at start-up and reuse it; put PgBouncer in front",
        )
    return _finding(
        check,
        pg.target,
        Status.OK,
        f"{sessions:.2f} new sessions/s for {xacts:.2f} transactions/s",
        evidence=evidence,
        value=sessions,
    )


def connection_growth(check: Check, pg: PostgresFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pg.up:
        return _down(check, pg.target, pg.down_detail)
    usable, used = pg.usable_connections, pg.client_backends
    if not pg.activity_readable or used is None:
        return _no_pg_monitor(check, pg, "other roles' connections")
    if usable is None or usable <= 0:
        return _finding(check, pg.target, Status.UNKNOWN, "cannot judge: max_connections is unknown")
    ratio = used / usable
    # per application: the last GROWTH_SAMPLES collections, each higher than the one before
    history = [p for p in facts.past_postgres(pg.target) if p.activity_readable] + [pg]
    recent = history[-GROWTH_SAMPLES:]
    by_sample = [sample.connections_by_application() for sample in recent]
    apps = {app for counts in by_sample for app in counts if not _own(app)}
    series = {app: [counts.get(app, 0) for counts in by_sample] for app in sorted(apps)}
    growing = {
        _app_label(app): counts
        for app, counts in series.items()
        if len(counts) >= GROWTH_SAMPLES and all(b > a for a, b in pairwise(counts))
    }
    evidence: dict[str, Any] = {
        "client_connections": used,
        "usable_connections": usable,
        "saturation": round(ratio, 3),
        "saturation_warn_fail": f"{t.saturation_warn:g} / {t.saturation_fail:g}",
        "trend_samples": f"{len(recent)} of {GROWTH_SAMPLES} needed",
    }
    if growing:
        evidence["growing_applications"] = growing
    fix = "bound every client pool (max_overflow, max_size) and route applications through PgBouncer"
    slots = f"{used} of {usable} usable connection slots in use ({ratio:.0%})"
    if ratio >= t.saturation_fail:
        return _finding(check, pg.target, Status.FAIL, slots, evidence=evidence, value=ratio, fix=fix)
    if ratio >= t.saturation_warn or growing:
        why = slots + (
            "; connections keep growing for "
            + ", ".join(f"{a} ({' → '.join(map(str, c))})" for a, c in growing.items())
            if growing
            else ""
        )
        return _finding(check, pg.target, Status.WARN, why, evidence=evidence, value=ratio, fix=fix)
    trend = (
        "no application keeps growing"
        if len(recent) >= GROWTH_SAMPLES
        else f"a growth trend needs {GROWTH_SAMPLES} collections (have {len(recent)}; the daemon keeps them)"
    )
    return _finding(check, pg.target, Status.OK, f"{slots}; {trend}", evidence=evidence, value=ratio)


def _where(row: ActivityRow) -> str:
    return f"{row.usename}@{row.datname}, {_app_label(row.application_name)}"


def long_transactions(check: Check, pg: PostgresFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pg.up:
        return _down(check, pg.target, pg.down_detail)
    if not pg.activity_readable:
        return _no_pg_monitor(check, pg, "other roles' transactions")
    oldest_xact, idle_tx = 0.0, 0.0
    where_xact, where_idle = "", ""
    idle_count = 0
    for row in _applications(pg):
        if row.oldest_xact_age is not None and row.oldest_xact_age > oldest_xact:
            oldest_xact, where_xact = row.oldest_xact_age, _where(row)
        if row.state.startswith("idle in transaction"):
            idle_count += row.count
            if row.max_state_age is not None and row.max_state_age > idle_tx:
                idle_tx, where_idle = row.max_state_age, _where(row)
    evidence = {
        "oldest_transaction_seconds": round(oldest_xact, 1),
        "oldest_transaction_by": where_xact or "-",
        "idle_in_transaction_sessions": idle_count,
        "longest_idle_in_transaction_seconds": round(idle_tx, 1),
        "idle_in_transaction_by": where_idle or "-",
        "limits_warn_fail": f"transaction {_seconds(t.long_transaction_warn)} / "
        f"{_seconds(t.long_transaction_fail)}; idle in transaction {_seconds(t.idle_in_transaction_warn)} / "
        f"{_seconds(t.idle_in_transaction_fail)}",
    }
    status, problems = Status.OK, []
    if oldest_xact > t.long_transaction_fail or idle_tx > t.idle_in_transaction_fail:
        status = Status.FAIL
    elif oldest_xact > t.long_transaction_warn or idle_tx > t.idle_in_transaction_warn:
        status = Status.WARN
    if oldest_xact > t.long_transaction_warn:
        problems.append(f"a transaction has been open for {_seconds(round(oldest_xact))} ({where_xact})")
    if idle_tx > t.idle_in_transaction_warn:
        problems.append(
            f"a session has been idle in transaction for {_seconds(round(idle_tx))} ({where_idle})"
        )
    if problems:
        return _finding(
            check,
            pg.target,
            status,
            "; ".join(problems),
            evidence=evidence,
            value=max(oldest_xact, idle_tx),
            fix="don't hold a transaction across external calls or user think time; set "
            "idle_in_transaction_session_timeout",
        )
    return _finding(
        check,
        pg.target,
        Status.OK,
        f"oldest transaction {_seconds(round(oldest_xact))}, longest idle in transaction "
        f"{_seconds(round(idle_tx))}",
        evidence=evidence,
        value=max(oldest_xact, idle_tx),
    )


# -- 11. PgBouncer traps from the field --------------------------------------------------------------
_TRUE = ("1", "on", "yes", "true")


def reuseport_peers(check: Check, pgb: PgBouncerFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pgb.up:
        return _down(check, pgb.target, pgb.down_detail)
    reuse = pgb.setting("so_reuseport")
    if reuse is None:
        return _no_config(check, pgb, "so_reuseport")
    siblings = [
        b.target
        for b in facts.pgbouncers
        if b.target != pgb.target and (b.host, b.port) == (pgb.host, pgb.port) and b.port
    ]
    peer_id = pgb.number("peer_id")
    evidence: dict[str, Any] = {
        "so_reuseport": reuse,
        "peer_id": peer_id if peer_id is not None else f"not supported by {pgb.version_text}",
        "peers": pgb.peers if pgb.peers is not None else "not reported",
        "same_address_targets": siblings,
    }
    if reuse.lower() not in _TRUE:
        return _finding(
            check, pgb.target, Status.OK, "so_reuseport is off: no port sharing", evidence=evidence, value=0
        )
    missing = []
    if not peer_id:
        missing.append("peer_id" if peer_id is not None else f"peering (PgBouncer {pgb.version_text})")
    if pgb.peers == 0:
        missing.append("[peers] entries")
    if missing:
        status = Status.FAIL if siblings else Status.WARN
        return _finding(
            check,
            pgb.target,
            status,
            f"so_reuseport = 1 without {' and '.join(missing)}: a cancel request can reach another "
            "process sharing the port and is lost"
            + (f" (shares its address with {', '.join(siblings)})" if siblings else ""),
            evidence=evidence,
            value=1,
            fix="give each process a unique peer_id and list all of them under [peers] (PgBouncer 1.19+)",
        )
    return _finding(
        check,
        pgb.target,
        Status.OK,
        f"so_reuseport with peering (peer_id {peer_id:g}, {pgb.peers} peers)"
        if pgb.peers is not None and peer_id is not None
        else "so_reuseport with peering",
        evidence=evidence,
        value=0,
    )


def _pool_modes(names: Sequence[Any], db_modes: Sequence[Any], mode: str) -> tuple[dict[str, str], bool]:
    """The global pool_mode and every database's own, if it has another one; whether any of them
    pools by transaction or statement."""
    modes = {"(global)": mode}
    if not set(db_modes) <= {None, "", mode}:  # a database with its own pool_mode
        for name, db_mode in zip(names, db_modes, strict=True):
            if isinstance(db_mode, str) and db_mode and name != "pgbouncer" and db_mode != mode:
                modes[str(name)] = db_mode
    return modes, any(v in ("transaction", "statement") for v in modes.values())


def prepared_statements(check: Check, pgb: PgBouncerFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pgb.up:
        return _down(check, pgb.target, pgb.down_detail)
    mode = pgb.setting("pool_mode")
    if mode is None:
        return _no_config(check, pgb, "pool_mode")
    names, db_modes = columns(pgb.databases, "name", "pool_mode")
    modes, pooled = _carried(
        pgb, "pool_modes", (names, db_modes, mode), lambda: _pool_modes(names, db_modes, mode)
    )
    evidence: dict[str, Any] = {"pool_mode": modes if len(modes) > 1 else mode, "version": pgb.version_text}
    if not pooled:
        return _finding(
            check,
            pgb.target,
            Status.OK,
            f"pool_mode {mode}: session state (prepared statements included) stays with the client",
            evidence=evidence,
            value=0,
        )
    if pgb.version is not None and pgb.version < (1, 21, 0):
        return _finding(
            check,
            pgb.target,
            Status.FAIL if t.expect_prepared_statements else Status.WARN,
            f"PgBouncer {pgb.version_text} cannot keep protocol-level prepared statements in "
            "transaction pooling: clients that prepare (asyncpg, psycopg prepare, JDBC) get "
            "'prepared statement does not exist'",
            evidence=evidence,
            value=1,
            fix="upgrade to PgBouncer 1.21+ and set max_prepared_statements, or turn prepares off in "
            "the clients (asyncpg statement_cache_size=0)",
        )
    limit = pgb.number("max_prepared_statements")
    if limit is None:
        return _no_config(check, pgb, "max_prepared_statements")
    evidence["max_prepared_statements"] = limit
    evidence["clients_prepare"] = (
        "unknown" if t.expect_prepared_statements is None else t.expect_prepared_statements
    )
    now_parses = pgb.totals.get("client_parse_count")
    prior = next(
        (
            h.totals["client_parse_count"]
            for h in facts.past_pgbouncer(pgb.target)
            if "client_parse_count" in h.totals and h.collected_at < pgb.collected_at
        ),
        None,
    )
    rising = now_parses is not None and prior is not None and now_parses > prior
    if now_parses is None:
        evidence["client_parse_count"] = f"not reported by {pgb.version_text} (1.24+)"
    else:
        evidence["client_parse_count"] = now_parses
        evidence["client_parses_rising"] = rising
    if limit > 0:
        summary = f"max_prepared_statements = {limit:g}: PgBouncer keeps clients' prepared statements"
        if rising and now_parses is not None and prior is not None:
            summary += f" ({now_parses - prior:g} prepares since the last collection)"
        return _finding(check, pgb.target, Status.OK, summary, evidence=evidence, value=0)
    fix = (
        "set max_prepared_statements (e.g. 200), or turn prepares off in the clients "
        "(asyncpg statement_cache_size=0, psycopg prepare_threshold=None)"
    )
    if rising or t.expect_prepared_statements:
        why = (
            "clients prepare statements (SHOW STATS client parses rising)"
            if rising
            else "clients prepare statements (doctor expect_prepared_statements: true)"
        )
        return _finding(
            check,
            pgb.target,
            Status.FAIL,
            f"{why} but max_prepared_statements = 0 in transaction pooling: they get "
            "'prepared statement does not exist' / 'already exists' errors",
            evidence=evidence,
            value=1,
            fix=fix,
        )
    if t.expect_prepared_statements is False:
        return _finding(
            check,
            pgb.target,
            Status.OK,
            "max_prepared_statements = 0, and the clients are declared not to prepare "
            "(doctor expect_prepared_statements: false)",
            evidence=evidence,
            value=0,
        )
    # measured on 1.24.1: with max_prepared_statements = 0 the parse counters stay 0 while clients
    # prepare, so silence proves nothing
    return _finding(
        check,
        pgb.target,
        Status.WARN,
        "transaction pooling with max_prepared_statements = 0: a client that prepares (asyncpg by "
        "default, psycopg prepare, JDBC) breaks, and PgBouncer does not count prepares in this mode, "
        "so poolwatch cannot see whether any client does",
        evidence=evidence,
        value=1,
        fix=fix + "; if no client prepares, say so with doctor expect_prepared_statements: false",
    )


def startup_parameters(check: Check, pgb: PgBouncerFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pgb.up:
        return _down(check, pgb.target, pgb.down_detail)
    ignored = pgb.setting("ignore_startup_parameters")
    if ignored is None:
        return _no_config(check, pgb, "ignore_startup_parameters")
    names = {p.strip() for p in ignored.split(",") if p.strip()}
    evidence = {
        "ignore_startup_parameters": sorted(names),
        "expect_extra_float_digits": t.expect_extra_float_digits,
    }
    if "extra_float_digits" not in names and t.expect_extra_float_digits:
        return _finding(
            check,
            pgb.target,
            Status.FAIL,
            "lib/pq and JDBC clients send extra_float_digits, which PgBouncer rejects with "
            "'unsupported startup parameter'",
            evidence=evidence,
            value=1,
            fix="ignore_startup_parameters = extra_float_digits",
        )
    summary = (
        "extra_float_digits is ignored: lib/pq and JDBC clients can connect"
        if "extra_float_digits" in names
        else "extra_float_digits is not ignored; fine unless lib/pq or JDBC clients connect (then set "
        "doctor expect_extra_float_digits: true)"
    )
    return _finding(check, pgb.target, Status.OK, summary, evidence=evidence, value=0)


PGBOUNCER_CHECKS: tuple[Check, ...] = (
    Check(
        "stale_connection_detection",
        "Stale-connection detection",
        "pgbouncer",
        f"{SEED}: pool_pre_ping ⇔ PgBouncer server_check_query/server_check_delay",
        stale_connections,
        1,
    ),
    Check(
        "recycling",
        "Connection recycling",
        "pgbouncer",
        f"{SEED}: pool_recycle set (1–4 hours) ⇔ server_lifetime",
        recycling,
        2,
    ),
    Check(
        "bounded_overflow",
        "Bounded overflow",
        "pgbouncer",
        f"{SEED}: max_overflow bounded (pool_size / 2) ⇔ reserve_pool_size; fits under max_connections",
        bounded_overflow,
        3,
    ),
    Check(
        "timeouts",
        "Client wait and connect timeouts",
        "pgbouncer",
        f"{SEED}: connection timeout configured ⇔ query_wait_timeout, server_connect_timeout",
        pgbouncer_timeouts,
        4,
    ),
    Check(
        "sizing",
        "Pool sizing",
        "pgbouncer",
        f"{SEED}: cores × 2 + spindles; min(cores × 4, 50) + pool_size / 2; ~300 connections; 5–10 MB each",
        sizing,
        9,
    ),
    Check(
        "reuseport_peers",
        "so_reuseport without peering",
        "pgbouncer",
        f"{NOTES}: one PgBouncer per core behind one port; cancel requests need peering",
        reuseport_peers,
        11,
    ),
    Check(
        "prepared_statements",
        "Prepared statements in transaction pooling",
        "pgbouncer",
        f"{NOTES} (a7): max_prepared_statements, PgBouncer 1.21+; parse counters 1.24+",
        prepared_statements,
        11,
    ),
    Check(
        "startup_parameters",
        "Startup parameters",
        "pgbouncer",
        f"{NOTES} (a4): unsupported startup parameter extra_float_digits",
        startup_parameters,
        11,
    ),
)

POSTGRES_CHECKS: tuple[Check, ...] = (
    Check(
        "connection_age",
        "Connections older than the recycle window",
        "postgres",
        f"{SEED}: pool_recycle set (1–4 hours)",
        connection_age,
        2,
    ),
    Check(
        "timeouts",
        "Statement and idle-in-transaction timeouts",
        "postgres",
        f"{SEED}: statement_timeout 30 s; connection timeout 30–60 s",
        postgres_timeouts,
        4,
    ),
    Check(
        "direct_connections",
        "Connections bypassing PgBouncer",
        "postgres",
        f"{SEED}: PgBouncer for high connection count (>100 concurrent)",
        direct_connections,
        5,
    ),
    Check(
        "graceful_shutdown",
        "Graceful shutdown",
        "postgres",
        f"{SEED}: graceful shutdown disposes connections properly (PG14+ sessions_abandoned)",
        graceful_shutdown,
        8,
    ),
    Check(
        "connection_churn",
        "Connection churn (engine per request)",
        "postgres",
        f"{SEED}: anti-pattern: creating engine per request",
        connection_churn,
        10,
    ),
    Check(
        "connection_growth",
        "Unbounded connection growth",
        "postgres",
        f"{SEED}: anti-pattern: unbounded connection growth (max_overflow=-1)",
        connection_growth,
        10,
    ),
    Check(
        "long_transactions",
        "Long-running transactions",
        "postgres",
        f"{SEED}: anti-pattern: long-running transactions",
        long_transactions,
        10,
    ),
)

TARGETS_UP = Check(
    "metrics_exported",
    "Pool utilisation metrics exported",
    "poolwatch",
    f"{SEED}: metrics exported for pool utilization",
    targets_up,
    6,
)
HEALTH = Check(
    "health_checks",
    "Health checks validate connectivity",
    "any",
    f"{SEED}: health check endpoint validates DB connectivity (SELECT 1)",
    health_checks,
    7,
)

ALL_CHECK_IDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        [c.id for c in PGBOUNCER_CHECKS] + [c.id for c in POSTGRES_CHECKS] + [TARGETS_UP.id, HEALTH.id]
    )
)


def evaluate(facts: Facts, thresholds: Callable[[str], DoctorThresholds]) -> list[Finding]:
    """Every check for every target; a crashing check becomes UNKNOWN rather than hiding the rest."""
    findings = [
        _safe(TARGETS_UP, "poolwatch", "poolwatch", targets_up, TARGETS_UP, facts, thresholds("poolwatch"))
    ]
    for pgb in facts.pgbouncers:
        t = thresholds(pgb.target)
        findings.extend(_safe(c, pgb.target, "pgbouncer", c.run, c, pgb, t, facts) for c in PGBOUNCER_CHECKS)
        findings.append(
            _safe(HEALTH, pgb.target, "pgbouncer", health_checks, HEALTH, pgb.target, "pgbouncer", facts)
        )
    for pg in facts.postgres:
        t = thresholds(pg.target)
        findings.extend(_safe(c, pg.target, "postgres", c.run, c, pg, t, facts) for c in POSTGRES_CHECKS)
        findings.append(
            _safe(HEALTH, pg.target, "postgres", health_checks, HEALTH, pg.target, "postgres", facts)
        )
    return findings


def _safe(check: Check, target: str, kind: str, run: Callable[..., Finding], *args: Any) -> Finding:
    try:
        return run(*args)
    except Exception as exc:  # a bug in one rule must not blank the report
        return _finding(
            check,
            target,
            Status.UNKNOWN,
            f"check failed to evaluate: {type(exc).__name__}: {exc}",
            kind=kind,
        )


def iter_checks() -> Iterable[Check]:
    yield from PGBOUNCER_CHECKS
    yield from POSTGRES_CHECKS
    yield TARGETS_UP
    yield HEALTH
