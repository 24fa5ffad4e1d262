"""One rule per checklist item. Each is a pure function of facts and thresholds returning a Finding.

A check whose data cannot be read says UNKNOWN and why; it never falls back to OK.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from poolwatch.config import DoctorThresholds
from poolwatch.doctor.facts import Facts, PgBouncerFacts, PostgresFacts
from poolwatch.doctor.model import Finding, Status

SEED = "seed-pooling-patterns.md"
POOLWATCH_APP = "poolwatch"


@dataclass(frozen=True)
class Check:
    id: str
    title: str
    scope: str  # "pgbouncer" | "postgres" | "poolwatch"
    reference: str
    run: Callable[..., Finding]


def _finding(
    check: Check,
    target: str,
    status: Status,
    summary: str,
    *,
    evidence: dict[str, Any] | None = None,
    fix: str | None = None,
    value: float | None = None,
) -> Finding:
    return Finding(
        check.id, check.title, target, status, summary, evidence or {}, fix, check.reference, value
    )


def _seconds(value: float | None) -> str:
    if value is None:
        return "unknown"
    if value >= 3600 and value % 3600 == 0:
        return f"{value / 3600:g} h"
    if value >= 60 and value % 60 == 0:
        return f"{value / 60:g} min"
    return f"{value:g} s"


def _down(check: Check, target: str, detail: str | None) -> Finding:
    return _finding(
        check, target, Status.UNKNOWN, f"cannot judge: the target is down ({detail or 'no answer'})"
    )


# -- 1. stale-connection detection -------------------------------------------------------------
def stale_connections(check: Check, pgb: PgBouncerFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pgb.up:
        return _down(check, pgb.target, pgb.down_detail)
    query, delay = pgb.setting("server_check_query"), pgb.number("server_check_delay")
    if query is None or delay is None:
        return _finding(
            check, pgb.target, Status.UNKNOWN, "SHOW CONFIG did not return server_check_query/delay"
        )
    evidence = {"server_check_query": query, "server_check_delay": delay}
    if query.strip() == "":
        return _finding(
            check,
            pgb.target,
            Status.FAIL,
            "server_check_query is empty: PgBouncer hands out server connections without checking them",
            evidence=evidence,
            value=delay,
            fix="set server_check_query = select 1 (or <empty> on 1.25+), the pooler's pool_pre_ping",
        )
    if delay > t.server_check_delay_max:
        return _finding(
            check,
            pgb.target,
            Status.WARN,
            f"server_check_delay is {_seconds(delay)}: idle server connections go unchecked longer than "
            f"{_seconds(t.server_check_delay_max)}",
            evidence=evidence,
            value=delay,
            fix=f"lower server_check_delay to {_seconds(t.server_check_delay_max)} or less (default 30 s)",
        )
    return _finding(
        check,
        pgb.target,
        Status.OK,
        f"idle server connections are checked with {query!r} after {_seconds(delay)}",
        evidence=evidence,
        value=delay,
    )


# -- 2. recycling -------------------------------------------------------------------------------
def recycling(check: Check, pgb: PgBouncerFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pgb.up:
        return _down(check, pgb.target, pgb.down_detail)
    lifetime = pgb.number("server_lifetime")
    if lifetime is None:
        return _finding(check, pgb.target, Status.UNKNOWN, "SHOW CONFIG did not return server_lifetime")
    # 1.23+ can override server_lifetime per database; a database row with 0 inherits the global one
    per_db = {
        str(d.get("name")): float(d["server_lifetime"])
        for d in pgb.databases
        if d.get("server_lifetime") not in (None, "", 0, "0") and d.get("name") != "pgbouncer"
    }
    effective = {"(global)": lifetime, **per_db}
    never = [name for name, value in effective.items() if value == 0]
    too_long = {name: value for name, value in effective.items() if value > t.recycle_max}
    too_short = {name: value for name, value in effective.items() if 0 < value < t.recycle_min}
    evidence: dict[str, Any] = {"server_lifetime": lifetime, **({"per_database": per_db} if per_db else {})}
    band = f"{_seconds(t.recycle_min)}–{_seconds(t.recycle_max)}"
    if never or too_long:
        worst_value = max(too_long.values(), default=0.0)
        what = ", ".join(
            [f"{n}: never" for n in never] + [f"{n}: {_seconds(v)}" for n, v in too_long.items()]
        )
        return _finding(
            check,
            pgb.target,
            Status.FAIL,
            f"server connections live too long ({what}); the recycle window is {band}",
            evidence=evidence,
            value=worst_value if not never else 0.0,
            fix=f"set server_lifetime within {band} (e.g. 3600), the pooler's pool_recycle",
        )
    if too_short:
        what = ", ".join(f"{n}: {_seconds(v)}" for n, v in too_short.items())
        return _finding(
            check,
            pgb.target,
            Status.WARN,
            f"server connections are recycled very often ({what}): connection churn on PostgreSQL",
            evidence=evidence,
            value=min(too_short.values()),
            fix=f"raise server_lifetime into {band}",
        )
    return _finding(
        check,
        pgb.target,
        Status.OK,
        f"server_lifetime {_seconds(lifetime)} is within {band}",
        evidence=evidence,
        value=lifetime,
    )


def connection_age(check: Check, pg: PostgresFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pg.up:
        return _down(check, pg.target, pg.down_detail)
    if not pg.activity_readable:
        return _finding(
            check,
            pg.target,
            Status.UNKNOWN,
            "pg_stat_activity is not readable for other roles' sessions",
            fix="grant pg_monitor to poolwatch's role",
        )
    oldest: dict[str, float] = {}
    for row in pg.activity:
        if row.application_name == POOLWATCH_APP or row.oldest_backend_age is None:
            continue
        app = row.application_name or "(no application_name)"
        oldest[app] = max(oldest.get(app, 0.0), row.oldest_backend_age)
    limit = t.recycle_max
    old = {app: age for app, age in oldest.items() if age > limit}
    top = max(oldest.values(), default=0.0)
    evidence = {"oldest_backend_age_by_application": {k: round(v) for k, v in sorted(oldest.items())}}
    if old:
        apps = ", ".join(f"{a} ({_seconds(round(v))})" for a, v in sorted(old.items(), key=lambda kv: -kv[1]))
        return _finding(
            check,
            pg.target,
            Status.WARN,
            f"connections older than the {_seconds(limit)} recycle window: {apps}",
            evidence=evidence,
            value=top,
            fix="set pool_recycle (SQLAlchemy) / server_lifetime (PgBouncer) / max lifetime in the "
            "client pool to 1–4 h",
        )
    return _finding(
        check,
        pg.target,
        Status.OK,
        f"no client connection is older than {_seconds(limit)} (oldest {_seconds(round(top))})",
        evidence=evidence,
        value=top,
    )


# -- 3. bounded overflow ------------------------------------------------------------------------
def _int(value: Any) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return 0


def max_server_connections(pgb: PgBouncerFacts) -> tuple[int, dict[str, int]]:
    """The most server connections PgBouncer could open, per database, from its limits."""
    default_pool = _int(pgb.setting("default_pool_size"))
    default_reserve = _int(pgb.setting("reserve_pool_size"))
    max_db = _int(pgb.setting("max_db_connections"))
    max_user = _int(pgb.setting("max_user_connections"))
    users_per_db: dict[str, set[str]] = {}
    for pool in pgb.pools:
        db = str(pool.get("database"))
        if db != "pgbouncer":
            users_per_db.setdefault(db, set()).add(str(pool.get("user")))
    per_db: dict[str, int] = {}
    for row in pgb.databases:
        name = str(row.get("name"))
        if name == "pgbouncer":
            continue
        size = _int(row.get("pool_size")) or default_pool
        reserve = _int(row.get("reserve_pool_size", row.get("reserve_pool", default_reserve)))
        users = max(1, len(users_per_db.get(name, ())))
        total = (size + reserve) * users
        db_cap = _int(row.get("max_connections")) or max_db
        if db_cap:
            total = min(total, db_cap)
        per_db[name] = total
    total = sum(per_db.values())
    if max_user:
        all_users = {str(p.get("user")) for p in pgb.pools if p.get("database") != "pgbouncer"}
        total = min(total, max_user * max(1, len(all_users)))
    return total, per_db


def bounded_overflow(check: Check, pgb: PgBouncerFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pgb.up:
        return _down(check, pgb.target, pgb.down_detail)
    if not pgb.config_readable:
        return _finding(check, pgb.target, Status.UNKNOWN, "SHOW CONFIG could not be read")
    pool, reserve = _int(pgb.setting("default_pool_size")), _int(pgb.setting("reserve_pool_size"))
    ratios: dict[str, float] = {}
    if pool:
        ratios["(default)"] = reserve / pool
    for row in pgb.databases:
        if row.get("name") == "pgbouncer":
            continue
        size = _int(row.get("pool_size")) or pool
        res = _int(row.get("reserve_pool_size", row.get("reserve_pool", reserve)))
        if size:
            ratios[str(row.get("name"))] = res / size
    over = {k: v for k, v in ratios.items() if v > t.reserve_ratio_max}
    total, per_db = max_server_connections(pgb)
    pg = facts.postgres_named(facts.links.get(pgb.target))
    usable = pg.usable_connections if pg is not None and pg.up else None
    evidence: dict[str, Any] = {
        "default_pool_size": pool,
        "reserve_pool_size": reserve,
        "max_server_connections": total,
        "per_database": per_db,
    }
    if usable is not None:
        evidence["postgres_usable_connections"] = usable
    problems, status = [], Status.OK
    if over:
        status = Status.FAIL
        problems.append(
            "reserve above half the pool (" + ", ".join(f"{k}: {v:.2f}" for k, v in over.items()) + ")"
        )
    if usable is not None and total > usable:
        status = Status.FAIL
        problems.append(
            f"PgBouncer may open {total} server connections but PostgreSQL has {usable} usable slots"
        )
    if problems:
        return _finding(
            check,
            pgb.target,
            status,
            "; ".join(problems),
            evidence=evidence,
            value=max(over.values(), default=0.0),
            fix=f"keep reserve_pool_size ≤ pool_size × {t.reserve_ratio_max:g} and the sum of "
            "(pool_size + reserve) over pools under max_connections − reserved slots "
            "(cap with max_db_connections)",
        )
    if usable is None:
        return _finding(
            check,
            pgb.target,
            Status.UNKNOWN,
            f"reserve within bounds; at most {total} server connections, but the PostgreSQL behind "
            "this PgBouncer is not configured or down, so the total cannot be compared",
            evidence=evidence,
            value=max(ratios.values(), default=0.0),
            fix="add the PostgreSQL behind it as a postgres target (pgbouncers[].postgres)",
        )
    return _finding(
        check,
        pgb.target,
        Status.OK,
        f"reserve ≤ {t.reserve_ratio_max:g} × pool; at most {total} server connections fit in "
        f"{usable} usable PostgreSQL slots",
        evidence=evidence,
        value=max(ratios.values(), default=0.0),
    )


# -- 4. timeouts --------------------------------------------------------------------------------
def postgres_timeouts(check: Check, pg: PostgresFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pg.up:
        return _down(check, pg.target, pg.down_detail)
    if pg.statement_timeout is None or pg.idle_in_transaction_timeout is None:
        return _finding(check, pg.target, Status.UNKNOWN, "timeout settings could not be read")
    band = f"{_seconds(t.statement_timeout_min)}–{_seconds(t.statement_timeout_max)}"
    overrides = {
        f"{role or '*'}@{db or '*'}": value
        for db, role, name, value in pg.role_settings
        if name == "statement_timeout"
    }
    evidence: dict[str, Any] = {
        "statement_timeout": pg.statement_timeout,
        "idle_in_transaction_session_timeout": pg.idle_in_transaction_timeout,
    }
    if overrides:
        evidence["statement_timeout_overrides"] = overrides
    effective = {"(server default)": pg.statement_timeout, **overrides}
    unset = [k for k, v in effective.items() if v == 0]
    outside = {
        k: v
        for k, v in effective.items()
        if v and not t.statement_timeout_min <= v <= t.statement_timeout_max
    }
    set_somewhere = any(v for v in effective.values())
    idle_unset = pg.idle_in_transaction_timeout == 0 and not any(
        v for _, _, name, v in pg.role_settings if name == "idle_in_transaction_session_timeout"
    )
    problems, status = [], Status.OK
    if not set_somewhere:
        status = Status.FAIL
        problems.append("statement_timeout is not set for the server nor any role/database")
    elif unset and "(server default)" not in unset:
        status = Status.WARN
        problems.append("statement_timeout is 0 for " + ", ".join(unset))
    if outside:
        status = max(status, Status.WARN)
        problems.append(
            f"statement_timeout outside {band}: "
            + ", ".join(f"{k}={_seconds(v)}" for k, v in outside.items())
        )
    if idle_unset:
        status = max(status, Status.WARN)
        problems.append("idle_in_transaction_session_timeout is not set")
    if problems:
        return _finding(
            check,
            pg.target,
            status,
            "; ".join(problems),
            evidence=evidence,
            value=pg.statement_timeout,
            fix=f"ALTER ROLE app_role SET statement_timeout = '30s' (band {band}) and set "
            "idle_in_transaction_session_timeout (e.g. 60s)",
        )
    return _finding(
        check,
        pg.target,
        Status.OK,
        f"statement_timeout within {band}; idle-in-transaction timeout set",
        evidence=evidence,
        value=pg.statement_timeout,
    )


def pgbouncer_timeouts(check: Check, pgb: PgBouncerFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pgb.up:
        return _down(check, pgb.target, pgb.down_detail)
    wait, connect = pgb.number("query_wait_timeout"), pgb.number("server_connect_timeout")
    if wait is None or connect is None:
        return _finding(check, pgb.target, Status.UNKNOWN, "SHOW CONFIG did not return the timeouts")
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
            ", ".join(unset) + " = 0: clients can wait forever",
            evidence=evidence,
            value=wait,
            fix="set query_wait_timeout (default 120) and server_connect_timeout (default 15)",
        )
    return _finding(
        check,
        pgb.target,
        Status.OK,
        f"query_wait_timeout {_seconds(wait)}, server_connect_timeout {_seconds(connect)}",
        evidence=evidence,
        value=wait,
    )


# -- 5. a pooler above 100 concurrent connections -------------------------------------------------
def direct_connections(check: Check, pg: PostgresFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pg.up:
        return _down(check, pg.target, pg.down_detail)
    if not pg.activity_readable:
        return _finding(
            check,
            pg.target,
            Status.UNKNOWN,
            "client addresses are hidden without pg_monitor",
            fix="grant pg_monitor to poolwatch's role",
        )
    pooled: set[tuple[str, int]] = set()
    watched = [b for b in facts.pgbouncers if facts.links.get(b.target) == pg.target]
    for pgb in watched:
        pooled |= pgb.server_endpoints
    bypass: dict[str, int] = {}
    for addr, port, app in pg.backends:
        if app.startswith(POOLWATCH_APP) or (addr, port) in pooled:
            continue
        key = f"{addr} {app or '(no application_name)'}"
        bypass[key] = bypass.get(key, 0) + 1
    count = sum(bypass.values())
    top = dict(sorted(bypass.items(), key=lambda kv: -kv[1])[:5])
    evidence: dict[str, Any] = {
        "direct_client_backends": count,
        "top_sources": top,
        "pgbouncers_matched": [b.target for b in watched],
    }
    if count > t.direct_connections_max:
        return _finding(
            check,
            pg.target,
            Status.FAIL,
            f"{count} client connections reach PostgreSQL without PgBouncer "
            f"(limit {t.direct_connections_max})",
            evidence=evidence,
            value=count,
            fix="route these applications through PgBouncer (transaction pooling) instead of "
            "connecting directly",
        )
    return _finding(
        check,
        pg.target,
        Status.OK,
        f"{count} direct client connections (limit {t.direct_connections_max})",
        evidence=evidence,
        value=count,
    )


# -- 6. metrics exported / targets up --------------------------------------------------------------
def targets_up(check: Check, facts: Facts, t: DoctorThresholds) -> Finding:
    everything = [(b.target, "pgbouncer", b.up, b.down_detail) for b in facts.pgbouncers] + [
        (p.target, "postgres", p.up, p.down_detail) for p in facts.postgres
    ]
    down = {f"{name} ({kind})": detail or "no answer" for name, kind, up, detail in everything if not up}
    evidence = {"targets": len(everything), "down": down}
    if not everything:
        return _finding(check, "poolwatch", Status.UNKNOWN, "no targets configured", evidence=evidence)
    if down:
        return _finding(
            check,
            "poolwatch",
            Status.FAIL,
            f"{len(down)} of {len(everything)} targets are down: " + ", ".join(down),
            evidence=evidence,
            value=len(down),
            fix="see /readyz for the reason of each",
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
            fix="enable probe (postgres) or probe.databases (pgbouncer)",
        )
    if not probes or all(p.success is None for p in probes):
        return _finding(check, target, Status.UNKNOWN, "SELECT 1 checks have not run yet")
    failing = {p.database: p.detail or "failed" for p in probes if p.success is False}
    evidence = {"checked": sorted(p.database for p in probes), "failing": failing}
    if failing:
        return _finding(
            check,
            target,
            Status.FAIL,
            f"SELECT 1 fails through {len(failing)} of {len(probes)}: "
            + ", ".join(f"{db}: {why}" for db, why in failing.items()),
            evidence=evidence,
            value=len(failing),
            fix="see the reason; poolwatch_probe_success shows when it recovers",
        )
    return _finding(
        check, target, Status.OK, f"SELECT 1 passes for {len(probes)} database(s)", evidence=evidence, value=0
    )


# -- 8. graceful shutdown --------------------------------------------------------------------------
def _rate(history: list[Any], now: PostgresFacts, attr: str, window: float) -> tuple[float | None, float]:
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


def graceful_shutdown(check: Check, pg: PostgresFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pg.up:
        return _down(check, pg.target, pg.down_detail)
    if pg.version_num is not None and pg.version_num < 140000:
        return _finding(
            check,
            pg.target,
            Status.UNKNOWN,
            f"PostgreSQL {pg.version_num // 10000} has no session counters (needs 14+)",
        )
    rate, elapsed = _rate(facts.past(pg.target), pg, "sessions_abandoned", t.history_window)
    if rate is None:
        return _finding(
            check,
            pg.target,
            Status.UNKNOWN,
            "needs two collections to measure the rate of abandoned sessions",
        )
    per_minute = rate * 60
    evidence = {"sessions_abandoned_per_minute": round(per_minute, 3), "over_seconds": round(elapsed)}
    if per_minute > t.abandoned_per_minute_max:
        return _finding(
            check,
            pg.target,
            Status.WARN,
            f"{per_minute:.2f} sessions/min end without closing (clients vanish: no engine.dispose() "
            "on shutdown, crashes or killed pods)",
            evidence=evidence,
            value=per_minute,
            fix="close pools on shutdown (engine.dispose(), pool.close()) and give pods a "
            "terminationGracePeriod",
        )
    return _finding(
        check,
        pg.target,
        Status.OK,
        f"{per_minute:.2f} abandoned sessions/min",
        evidence=evidence,
        value=per_minute,
    )


# -- 9. sizing -------------------------------------------------------------------------------------
def sizing(check: Check, pgb: PgBouncerFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pgb.up:
        return _down(check, pgb.target, pgb.down_detail)
    total, per_db = max_server_connections(pgb)
    pg = facts.postgres_named(facts.links.get(pgb.target))
    current = pg.client_backends if pg is not None and pg.up else None
    evidence: dict[str, Any] = {
        "max_server_connections": total,
        "per_database": per_db,
        "efficient_max": t.efficient_connections_max,
    }
    problems, status = [], Status.OK
    if t.cores is not None:
        rule = t.cores * 2 + t.spindles
        conservative = min(t.cores * 4, 50)
        evidence.update(
            {"rule_of_thumb": rule, "async_pool_size": conservative, "async_max_overflow": conservative // 2}
        )
        big = {db: n for db, n in per_db.items() if n > 2 * rule}
        if big:
            status = Status.WARN
            problems.append(
                f"pools far above cores×2+spindles = {rule}: "
                + ", ".join(f"{db}: {n}" for db, n in big.items())
            )
    if total > t.efficient_connections_max:
        status = Status.WARN
        problems.append(
            f"up to {total} server connections, above the ~{t.efficient_connections_max} PostgreSQL "
            "serves efficiently"
        )
    if current is not None:
        evidence["postgres_client_backends"] = current
        evidence["estimated_memory_mb"] = f"{current * 5}–{current * t.memory_per_connection_mb:g}"
    if problems:
        return _finding(
            check,
            pgb.target,
            status,
            "; ".join(problems),
            evidence=evidence,
            value=total,
            fix="smaller pools win: size pools near cores×2+spindles and queue in PgBouncer",
        )
    if t.cores is None:
        return _finding(
            check,
            pgb.target,
            Status.UNKNOWN,
            f"at most {total} server connections (within {t.efficient_connections_max}); set "
            "doctor.defaults.cores to compare with cores×2+spindles",
            evidence=evidence,
            value=total,
        )
    return _finding(
        check,
        pgb.target,
        Status.OK,
        f"at most {total} server connections, pools near the rule of thumb",
        evidence=evidence,
        value=total,
    )


# -- 10. anti-patterns -------------------------------------------------------------------------------
def connection_churn(check: Check, pg: PostgresFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pg.up:
        return _down(check, pg.target, pg.down_detail)
    if pg.version_num is not None and pg.version_num < 140000:
        return _finding(check, pg.target, Status.UNKNOWN, "session counters need PostgreSQL 14+")
    history = facts.past(pg.target)
    sessions, elapsed = _rate(history, pg, "sessions", t.history_window)
    xacts, _ = _rate(history, pg, "xacts", t.history_window)
    if sessions is None or xacts is None:
        return _finding(check, pg.target, Status.UNKNOWN, "needs two collections to measure session churn")
    ratio = sessions / xacts if xacts > 0 else float("inf") if sessions > 0 else 0.0
    evidence = {
        "new_sessions_per_second": round(sessions, 3),
        "transactions_per_second": round(xacts, 3),
        "sessions_per_transaction": round(ratio, 3) if ratio != float("inf") else "inf",
        "over_seconds": round(elapsed),
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
        f"{sessions:.2f} new sessions/s, {xacts:.2f} transactions/s",
        evidence=evidence,
        value=sessions,
    )


def connection_growth(check: Check, pg: PostgresFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pg.up:
        return _down(check, pg.target, pg.down_detail)
    usable, used = pg.usable_connections, pg.client_backends
    if usable is None or used is None or usable <= 0:
        return _finding(check, pg.target, Status.UNKNOWN, "max_connections or connection counts unavailable")
    ratio = used / usable
    samples = [p.client_backends for p in facts.past(pg.target) if p.client_backends is not None] + [used]
    growing = len(samples) >= 5 and all(b > a for a, b in zip(samples[-5:], samples[-4:], strict=False))
    evidence = {
        "client_backends": used,
        "usable_connections": usable,
        "saturation": round(ratio, 3),
        "recent": samples[-5:],
    }
    fix = "bound every client pool (max_overflow, max_size) and route applications through PgBouncer"
    if ratio >= t.saturation_fail:
        return _finding(
            check,
            pg.target,
            Status.FAIL,
            f"{used} of {usable} usable connection slots in use ({ratio:.0%})",
            evidence=evidence,
            value=ratio,
            fix=fix,
        )
    if ratio >= t.saturation_warn or growing:
        why = f"{used} of {usable} usable slots in use ({ratio:.0%})" + (
            "; connections keep growing" if growing else ""
        )
        return _finding(check, pg.target, Status.WARN, why, evidence=evidence, value=ratio, fix=fix)
    return _finding(
        check,
        pg.target,
        Status.OK,
        f"{used} of {usable} usable connection slots in use ({ratio:.0%})",
        evidence=evidence,
        value=ratio,
    )


def long_transactions(check: Check, pg: PostgresFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pg.up:
        return _down(check, pg.target, pg.down_detail)
    if not pg.activity_readable:
        return _finding(
            check,
            pg.target,
            Status.UNKNOWN,
            "other roles' transactions are hidden without pg_monitor",
            fix="grant pg_monitor to poolwatch's role",
        )
    oldest_xact, idle_tx = 0.0, 0.0
    where_xact, where_idle = "", ""
    idle_count = 0
    for row in pg.activity:
        if row.application_name == POOLWATCH_APP:
            continue
        label = f"{row.usename}@{row.datname} ({row.application_name or 'no application_name'})"
        if row.oldest_xact_age is not None and row.oldest_xact_age > oldest_xact:
            oldest_xact, where_xact = row.oldest_xact_age, label
        if row.state.startswith("idle in transaction"):
            idle_count += row.count
            if row.max_state_age is not None and row.max_state_age > idle_tx:
                idle_tx, where_idle = row.max_state_age, label
    evidence = {
        "oldest_transaction_seconds": round(oldest_xact, 1),
        "oldest_transaction_by": where_xact,
        "idle_in_transaction_sessions": idle_count,
        "longest_idle_in_transaction_seconds": round(idle_tx, 1),
        "idle_in_transaction_by": where_idle,
    }
    status, problems = Status.OK, []
    if oldest_xact > t.long_transaction_fail or idle_tx > t.idle_in_transaction_fail:
        status = Status.FAIL
    elif oldest_xact > t.long_transaction_warn or idle_tx > t.idle_in_transaction_warn:
        status = Status.WARN
    if oldest_xact > t.long_transaction_warn:
        problems.append(f"a transaction has been open {_seconds(round(oldest_xact))} ({where_xact})")
    if idle_tx > t.idle_in_transaction_warn:
        problems.append(f"a session is idle in transaction for {_seconds(round(idle_tx))} ({where_idle})")
    if problems:
        return _finding(
            check,
            pg.target,
            status,
            "; ".join(problems),
            evidence=evidence,
            value=max(oldest_xact, idle_tx),
            fix="don't hold transactions across external calls; set idle_in_transaction_session_timeout",
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
def reuseport_peers(check: Check, pgb: PgBouncerFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pgb.up:
        return _down(check, pgb.target, pgb.down_detail)
    reuse = pgb.setting("so_reuseport")
    if reuse is None:
        return _finding(check, pgb.target, Status.UNKNOWN, "SHOW CONFIG did not return so_reuseport")
    siblings = [
        b.target
        for b in facts.pgbouncers
        if b.target != pgb.target and (b.host, b.port) == (pgb.host, pgb.port)
    ]
    peer_id = pgb.number("peer_id")
    evidence = {
        "so_reuseport": reuse,
        "peer_id": peer_id if peer_id is not None else "unsupported",
        "same_port_targets": siblings,
    }
    if reuse in ("1", "on", "yes", "true") and not peer_id:
        status = Status.FAIL if siblings else Status.WARN
        return _finding(
            check,
            pgb.target,
            status,
            "so_reuseport is on without peering: a cancel request can land on another process and "
            "be lost" + (f" (shares its port with {', '.join(siblings)})" if siblings else ""),
            evidence=evidence,
            value=1,
            fix="give each process a unique peer_id and list all of them under [peers] (PgBouncer 1.21+)",
        )
    return _finding(
        check,
        pgb.target,
        Status.OK,
        "no port sharing without peering" if reuse not in ("1", "on") else "so_reuseport with peering",
        evidence=evidence,
        value=0,
    )


def prepared_statements(check: Check, pgb: PgBouncerFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pgb.up:
        return _down(check, pgb.target, pgb.down_detail)
    mode = pgb.setting("pool_mode")
    evidence: dict[str, Any] = {"pool_mode": mode, "version": ".".join(map(str, pgb.version or ()))}
    if mode not in ("transaction", "statement"):
        return _finding(
            check, pgb.target, Status.OK, f"pool_mode {mode}: session state survives", evidence=evidence
        )
    if pgb.version is not None and pgb.version < (1, 21, 0):
        return _finding(
            check,
            pgb.target,
            Status.WARN if mode == "transaction" else Status.OK,
            f"PgBouncer {evidence['version']} cannot track protocol-level prepared statements in "
            "transaction pooling; clients must not prepare",
            evidence=evidence,
            fix="upgrade to 1.21+ and set max_prepared_statements, or disable client prepares",
        )
    limit = pgb.number("max_prepared_statements")
    evidence["max_prepared_statements"] = limit
    history = [h for h in facts.past(pgb.target) if isinstance(h, PgBouncerFacts)]
    now_parses = pgb.totals.get("client_parse_count")
    prior = next(
        (
            h.totals.get("client_parse_count")
            for h in history
            if h.totals.get("client_parse_count") is not None and h.collected_at < pgb.collected_at
        ),
        None,
    )
    rising = now_parses is not None and prior is not None and now_parses > prior
    evidence["client_parses_rising"] = rising if now_parses is not None else "not reported (needs 1.24+)"
    if limit == 0:
        if rising:
            return _finding(
                check,
                pgb.target,
                Status.FAIL,
                "clients prepare statements but max_prepared_statements = 0 in transaction pooling: "
                "'prepared statement does not exist' errors follow",
                evidence=evidence,
                value=1,
                fix="set max_prepared_statements (e.g. 200)",
            )
        if now_parses is None:
            return _finding(
                check,
                pgb.target,
                Status.UNKNOWN,
                "max_prepared_statements = 0; this version does not report client parse counts",
                evidence=evidence,
            )
    return _finding(
        check,
        pgb.target,
        Status.OK,
        "prepared statements are tracked" if limit else "no client prepares seen",
        evidence=evidence,
        value=0,
    )


def startup_parameters(check: Check, pgb: PgBouncerFacts, t: DoctorThresholds, facts: Facts) -> Finding:
    if not pgb.up:
        return _down(check, pgb.target, pgb.down_detail)
    ignored = pgb.setting("ignore_startup_parameters")
    if ignored is None:
        return _finding(
            check, pgb.target, Status.UNKNOWN, "SHOW CONFIG did not return ignore_startup_parameters"
        )
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
            "lib/pq and JDBC clients send extra_float_digits, which PgBouncer rejects: "
            "'unsupported startup parameter'",
            evidence=evidence,
            value=1,
            fix="ignore_startup_parameters = extra_float_digits",
        )
    summary = (
        "extra_float_digits is ignored"
        if "extra_float_digits" in names
        else "extra_float_digits is not ignored (fine unless lib/pq or JDBC clients connect: set "
        "doctor expect_extra_float_digits: true for them)"
    )
    return _finding(check, pgb.target, Status.OK, summary, evidence=evidence, value=0)


PGBOUNCER_CHECKS: tuple[Check, ...] = (
    Check(
        "stale_connection_detection",
        "Stale-connection detection",
        "pgbouncer",
        f"{SEED}: pool_pre_ping ⇔ PgBouncer server_check_query/server_check_delay",
        stale_connections,
    ),
    Check(
        "recycling", "Connection recycling", "pgbouncer", f"{SEED}: pool_recycle set (1–4 hours)", recycling
    ),
    Check(
        "bounded_overflow",
        "Bounded overflow",
        "pgbouncer",
        f"{SEED}: max_overflow bounded (pool_size / 2); fits under max_connections",
        bounded_overflow,
    ),
    Check("timeouts", "Timeouts", "pgbouncer", f"{SEED}: connection timeout configured", pgbouncer_timeouts),
    Check(
        "sizing",
        "Pool sizing",
        "pgbouncer",
        f"{SEED}: cores × 2 + spindles; ~300 connections; 5–10 MB each",
        sizing,
    ),
    Check(
        "reuseport_peers",
        "so_reuseport without peering",
        "pgbouncer",
        "field-notes.md: cancel requests across so_reuseport processes",
        reuseport_peers,
    ),
    Check(
        "prepared_statements",
        "Prepared statements in transaction pooling",
        "pgbouncer",
        "field-notes.md: max_prepared_statements (1.21+)",
        prepared_statements,
    ),
    Check(
        "startup_parameters",
        "Startup parameters",
        "pgbouncer",
        "field-notes.md: unsupported startup parameter extra_float_digits",
        startup_parameters,
    ),
)

POSTGRES_CHECKS: tuple[Check, ...] = (
    Check(
        "connection_age",
        "Connections older than the recycle window",
        "postgres",
        f"{SEED}: pool_recycle set (1–4 hours)",
        connection_age,
    ),
    Check(
        "timeouts",
        "Timeouts",
        "postgres",
        f"{SEED}: statement_timeout 30 s; timeouts 30–60 s",
        postgres_timeouts,
    ),
    Check(
        "direct_connections",
        "PgBouncer above 100 concurrent connections",
        "postgres",
        f"{SEED}: PgBouncer for high connection count (>100 concurrent)",
        direct_connections,
    ),
    Check(
        "graceful_shutdown",
        "Graceful shutdown",
        "postgres",
        f"{SEED}: graceful shutdown disposes connections properly",
        graceful_shutdown,
    ),
    Check(
        "connection_churn",
        "Connection churn (engine per request)",
        "postgres",
        f"{SEED}: anti-pattern: creating engine per request",
        connection_churn,
    ),
    Check(
        "connection_growth",
        "Unbounded connection growth",
        "postgres",
        f"{SEED}: anti-pattern: unbounded connection growth",
        connection_growth,
    ),
    Check(
        "long_transactions",
        "Long-running transactions",
        "postgres",
        f"{SEED}: anti-pattern: long-running transactions",
        long_transactions,
    ),
)

TARGETS_UP = Check(
    "metrics_exported",
    "Pool utilisation metrics exported",
    "poolwatch",
    f"{SEED}: metrics exported for pool utilization",
    targets_up,
)
HEALTH = Check(
    "health_checks",
    "Health checks validate connectivity",
    "any",
    f"{SEED}: health check endpoint validates DB connectivity",
    health_checks,
)

ALL_CHECK_IDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        [c.id for c in PGBOUNCER_CHECKS] + [c.id for c in POSTGRES_CHECKS] + [TARGETS_UP.id, HEALTH.id]
    )
)


def evaluate(facts: Facts, thresholds: Callable[[str], DoctorThresholds]) -> list[Finding]:
    """Every check for every target; a crashing check becomes UNKNOWN rather than hiding the rest."""
    findings = [_safe(TARGETS_UP, "poolwatch", targets_up, TARGETS_UP, facts, thresholds("poolwatch"))]
    for pgb in facts.pgbouncers:
        t = thresholds(pgb.target)
        findings.extend(_safe(c, pgb.target, c.run, c, pgb, t, facts) for c in PGBOUNCER_CHECKS)
        findings.append(_safe(HEALTH, pgb.target, health_checks, HEALTH, pgb.target, "pgbouncer", facts))
    for pg in facts.postgres:
        t = thresholds(pg.target)
        findings.extend(_safe(c, pg.target, c.run, c, pg, t, facts) for c in POSTGRES_CHECKS)
        findings.append(_safe(HEALTH, pg.target, health_checks, HEALTH, pg.target, "postgres", facts))
    return findings


def _safe(check: Check, target: str, run: Callable[..., Finding], *args: Any) -> Finding:
    try:
        return run(*args)
    except Exception as exc:  # a bug in one rule must not blank the report
        return _finding(
            check, target, Status.UNKNOWN, f"check failed to evaluate: {type(exc).__name__}: {exc}"
        )


def iter_checks() -> Iterable[Check]:
    yield from PGBOUNCER_CHECKS
    yield from POSTGRES_CHECKS
    yield TARGETS_UP
    yield HEALTH
