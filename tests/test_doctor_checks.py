"""Each doctor check flipped both ways on hand-built facts, with the evidence values asserted."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest

from poolwatch.config import DoctorThresholds
from poolwatch.doctor import report
from poolwatch.doctor.checks import (
    HEALTH,
    PGBOUNCER_CHECKS,
    POSTGRES_CHECKS,
    TARGETS_UP,
    evaluate,
    health_checks,
    max_server_connections,
    targets_up,
)
from poolwatch.doctor.facts import ActivityRow, Facts, PgBouncerFacts, PostgresFacts, ProbeFacts
from poolwatch.doctor.model import Finding, Status

T = DoctorThresholds()
BASE_CONFIG = {
    "server_check_query": "select 1",
    "server_check_delay": "30",
    "server_lifetime": "3600",
    "default_pool_size": "20",
    "reserve_pool_size": "5",
    "max_db_connections": "0",
    "max_user_connections": "0",
    "query_wait_timeout": "120",
    "server_connect_timeout": "15",
    "query_timeout": "0",
    "idle_transaction_timeout": "0",
    "so_reuseport": "0",
    "peer_id": "0",
    "pool_mode": "transaction",
    "max_prepared_statements": "200",
    "ignore_startup_parameters": "extra_float_digits",
}


def pgb(config: dict[str, str] | None = None, **kw: Any) -> PgBouncerFacts:
    facts = PgBouncerFacts(
        target="pgb",
        up=True,
        collected_at=1000.0,
        host="127.0.0.1",
        port=6432,
        version=(1, 24, 1),
        config={**BASE_CONFIG, **(config or {})},
        databases=[{"name": "app", "pool_size": 20, "reserve_pool_size": 5, "max_connections": 0}],
        pools=[{"database": "app", "user": "app"}],
    )
    for key, value in kw.items():
        setattr(facts, key, value)
    return facts


def pg(**kw: Any) -> PostgresFacts:
    facts = PostgresFacts(
        target="db",
        up=True,
        collected_at=1000.0,
        version_num=150000,
        max_connections=100,
        superuser_reserved=3,
        statement_timeout=30.0,
        idle_in_transaction_timeout=60.0,
        client_backends=10,
        sessions=100.0,
        sessions_abandoned=0.0,
        xacts=1000.0,
    )
    for key, value in kw.items():
        setattr(facts, key, value)
    return facts


def run(
    check_id: str, target: PgBouncerFacts | PostgresFacts, facts: Facts | None = None, **t: Any
) -> Finding:
    facts = facts or Facts(
        pgbouncers=[target] if isinstance(target, PgBouncerFacts) else [],
        postgres=[target] if isinstance(target, PostgresFacts) else [],
    )
    checks = PGBOUNCER_CHECKS if isinstance(target, PgBouncerFacts) else POSTGRES_CHECKS
    check = next(c for c in checks if c.id == check_id)
    return check.run(check, target, DoctorThresholds(**t), facts)


def test_stale_connection_detection_flips() -> None:
    assert run("stale_connection_detection", pgb()).status is Status.OK
    bad = run("stale_connection_detection", pgb({"server_check_query": ""}))
    assert bad.status is Status.FAIL
    assert bad.evidence == {"server_check_query": "", "server_check_delay": 30.0}
    slow = run("stale_connection_detection", pgb({"server_check_delay": "300"}))
    assert slow.status is Status.WARN and slow.value == 300.0
    # PgBouncer 1.25's default: '<empty>' sends an empty query, which is a check
    assert run("stale_connection_detection", pgb({"server_check_query": "<empty>"})).status is Status.OK


def test_recycling_flips() -> None:
    ok = run("recycling", pgb())
    assert ok.status is Status.OK and ok.value == 3600.0
    day = run("recycling", pgb({"server_lifetime": "86400"}))
    assert day.status is Status.FAIL and day.value == 86400.0
    assert "24 h" in day.summary
    assert run("recycling", pgb({"server_lifetime": "0"})).status is Status.FAIL
    assert run("recycling", pgb({"server_lifetime": "60"})).status is Status.WARN
    per_db = pgb(databases=[{"name": "app", "pool_size": 20, "server_lifetime": 90000}])
    assert run("recycling", per_db).status is Status.FAIL


def test_connection_age_flips() -> None:
    young = pg(activity=[ActivityRow("app", "app", "web", "idle", 3, oldest_backend_age=600.0)])
    assert run("connection_age", young).status is Status.OK
    old = pg(
        activity=[
            ActivityRow("app", "app", "web", "idle", 3, oldest_backend_age=20000.0),
            ActivityRow("app", "mon", "poolwatch", "idle", 1, oldest_backend_age=99999.0),
        ]
    )
    finding = run("connection_age", old)
    assert finding.status is Status.WARN
    assert finding.evidence["oldest_backend_age_by_application"] == {"web": 20000}
    assert run("connection_age", pg(activity_readable=False)).status is Status.UNKNOWN


def test_bounded_overflow_flips() -> None:
    db = pg()
    bouncer = pgb()
    facts = Facts(pgbouncers=[bouncer], postgres=[db], links={"pgb": "db"})
    ok = run("bounded_overflow", bouncer, facts)
    assert ok.status is Status.OK
    assert ok.evidence["max_server_connections"] == 25
    assert ok.evidence["postgres_usable_connections"] == 97
    greedy = pgb(
        {"reserve_pool_size": "15"}, databases=[{"name": "app", "pool_size": 20, "reserve_pool_size": 15}]
    )
    finding = run("bounded_overflow", greedy, Facts(pgbouncers=[greedy], postgres=[db], links={"pgb": "db"}))
    assert finding.status is Status.FAIL and finding.value == pytest.approx(0.75)
    many = pgb(
        databases=[{"name": f"d{i}", "pool_size": 20, "reserve_pool_size": 5} for i in range(5)],
        pools=[{"database": f"d{i}", "user": "app"} for i in range(5)],
    )
    over = run("bounded_overflow", many, Facts(pgbouncers=[many], postgres=[db], links={"pgb": "db"}))
    assert over.status is Status.FAIL
    assert "125 server connections but PostgreSQL has 97" in over.summary
    # no PostgreSQL to compare with: unknown, never a false ok
    assert run("bounded_overflow", pgb()).status is Status.UNKNOWN


def test_max_server_connections_caps() -> None:
    facts = pgb(
        {"max_db_connections": "10"},
        databases=[{"name": "a", "pool_size": 20, "reserve_pool_size": 5, "max_connections": 0}],
    )
    assert max_server_connections(facts) == (10, {"a": 10})
    two_users = pgb(
        databases=[{"name": "a", "pool_size": 4, "reserve_pool": 1}],
        pools=[{"database": "a", "user": "u1"}, {"database": "a", "user": "u2"}],
    )
    assert max_server_connections(two_users) == (10, {"a": 10})


def test_postgres_timeouts_flip() -> None:
    assert run("timeouts", pg()).status is Status.OK
    unset = run("timeouts", pg(statement_timeout=0.0))
    assert unset.status is Status.FAIL
    role_only = run(
        "timeouts", pg(statement_timeout=0.0, role_settings=[("", "app", "statement_timeout", 45.0)])
    )
    assert role_only.status is Status.OK
    long = run("timeouts", pg(statement_timeout=300.0))
    assert long.status is Status.WARN and "5 min" in long.summary
    no_idle = run("timeouts", pg(idle_in_transaction_timeout=0.0))
    assert no_idle.status is Status.WARN


def test_pgbouncer_timeouts_flip() -> None:
    assert run("timeouts", pgb()).status is Status.OK
    assert run("timeouts", pgb({"query_wait_timeout": "0"})).status is Status.WARN


def test_direct_connections_flip() -> None:
    bouncer = pgb(server_endpoints={("127.0.0.1", 5000 + i) for i in range(20)})
    pooled = [("127.0.0.1", 5000 + i, "web") for i in range(20)]
    direct = [("127.0.0.1", 6000 + i, "batch") for i in range(110)]
    db = pg(backends=pooled + direct[:50])
    facts = Facts(pgbouncers=[bouncer], postgres=[db], links={"pgb": "db"})
    ok = run("direct_connections", db, facts)
    assert ok.status is Status.OK and ok.value == 50
    db_many = pg(backends=pooled + direct)
    facts = Facts(pgbouncers=[bouncer], postgres=[db_many], links={"pgb": "db"})
    bad = run("direct_connections", db_many, facts)
    assert bad.status is Status.FAIL and bad.value == 110
    assert bad.evidence["top_sources"] == {"127.0.0.1 batch": 110}


def test_graceful_shutdown_flips() -> None:
    before = pg(collected_at=1000.0, sessions_abandoned=10.0)
    calm = pg(collected_at=1060.0, sessions_abandoned=10.0)
    facts = Facts(postgres=[calm], history={"db": deque([before])})
    assert run("graceful_shutdown", calm, facts).status is Status.OK
    stormy = pg(collected_at=1060.0, sessions_abandoned=20.0)
    facts = Facts(postgres=[stormy], history={"db": deque([before])})
    finding = run("graceful_shutdown", stormy, facts)
    assert finding.status is Status.WARN and finding.value == pytest.approx(10.0)
    assert run("graceful_shutdown", calm).status is Status.UNKNOWN  # one sample only
    assert run("graceful_shutdown", pg(version_num=130000)).status is Status.UNKNOWN


def test_sizing_flips() -> None:
    assert run("sizing", pgb()).status is Status.UNKNOWN  # no core count configured
    assert run("sizing", pgb(), cores=8).status is Status.OK  # 25 ≤ 2 × 17
    big = pgb(databases=[{"name": "app", "pool_size": 100, "reserve_pool_size": 0}])
    finding = run("sizing", big, cores=8)
    assert finding.status is Status.WARN
    assert finding.evidence["rule_of_thumb"] == 17
    assert finding.evidence["async_pool_size"] == 32 and finding.evidence["async_max_overflow"] == 16


def test_connection_churn_flips() -> None:
    before = pg(collected_at=1000.0, sessions=100.0, xacts=1000.0)
    steady = pg(collected_at=1010.0, sessions=101.0, xacts=2000.0)
    assert run("connection_churn", steady, Facts(history={"db": deque([before])})).status is Status.OK
    churny = pg(collected_at=1010.0, sessions=300.0, xacts=1200.0)
    finding = run("connection_churn", churny, Facts(history={"db": deque([before])}))
    assert finding.status is Status.WARN
    assert finding.evidence["new_sessions_per_second"] == 20.0
    assert finding.evidence["transactions_per_second"] == 20.0
    # a counter reset (stats reset, restart) is not judged
    reset = pg(collected_at=1010.0, sessions=5.0, xacts=10.0)
    assert run("connection_churn", reset, Facts(history={"db": deque([before])})).status is Status.UNKNOWN


def test_connection_growth_flips() -> None:
    assert run("connection_growth", pg(client_backends=10)).status is Status.OK
    assert run("connection_growth", pg(client_backends=80)).status is Status.WARN
    full = run("connection_growth", pg(client_backends=95))
    assert full.status is Status.FAIL and full.value == pytest.approx(95 / 97)
    history = deque(pg(collected_at=1000.0 + i, client_backends=10 + i) for i in range(5))
    growing = run(
        "connection_growth", pg(collected_at=1010.0, client_backends=20), Facts(history={"db": history})
    )
    assert growing.status is Status.WARN and "keep growing" in growing.summary


def test_long_transactions_flip() -> None:
    calm = pg(
        activity=[ActivityRow("app", "app", "web", "active", 2, oldest_xact_age=1.0, max_state_age=1.0)]
    )
    assert run("long_transactions", calm).status is Status.OK
    idle = pg(activity=[ActivityRow("app", "app", "web", "idle in transaction", 1, 40.0, 40.0)])
    finding = run("long_transactions", idle)
    assert finding.status is Status.WARN
    assert finding.evidence["idle_in_transaction_sessions"] == 1
    assert finding.evidence["longest_idle_in_transaction_seconds"] == 40.0
    assert run("long_transactions", idle, idle_in_transaction_warn=5, idle_in_transaction_fail=10).status is (
        Status.FAIL
    )


def test_reuseport_flips() -> None:
    assert run("reuseport_peers", pgb()).status is Status.OK
    shared = pgb({"so_reuseport": "1", "peer_id": "0"})
    sibling = pgb({"so_reuseport": "1"})
    sibling.target = "pgb-2"
    assert run("reuseport_peers", shared).status is Status.WARN
    facts = Facts(pgbouncers=[shared, sibling])
    assert run("reuseport_peers", shared, facts).status is Status.FAIL
    assert run("reuseport_peers", pgb({"so_reuseport": "1", "peer_id": "1"})).status is Status.OK


def test_prepared_statements_flip() -> None:
    before = pgb({"max_prepared_statements": "0"}, collected_at=900.0, totals={"client_parse_count": 10.0})
    now = pgb({"max_prepared_statements": "0"}, totals={"client_parse_count": 50.0})
    finding = run("prepared_statements", now, Facts(pgbouncers=[now], history={"pgb": deque([before])}))
    assert finding.status is Status.FAIL
    quiet = pgb({"max_prepared_statements": "0"}, totals={"client_parse_count": 10.0})
    assert run("prepared_statements", quiet, Facts(history={"pgb": deque([before])})).status is Status.OK
    assert run("prepared_statements", pgb()).status is Status.OK
    old = pgb(version=(1, 18, 0))
    assert run("prepared_statements", old).status is Status.WARN


def test_startup_parameters_flip() -> None:
    assert run("startup_parameters", pgb({"ignore_startup_parameters": ""})).status is Status.OK
    finding = run(
        "startup_parameters", pgb({"ignore_startup_parameters": ""}), expect_extra_float_digits=True
    )
    assert finding.status is Status.FAIL
    assert run("startup_parameters", pgb(), expect_extra_float_digits=True).status is Status.OK


def test_targets_up_and_health_checks() -> None:
    facts = Facts(pgbouncers=[pgb()], postgres=[pg(up=False, down_detail="connection refused")])
    finding = targets_up(TARGETS_UP, facts, T)
    assert finding.status is Status.FAIL and finding.evidence["down"] == {
        "db (postgres)": "connection refused"
    }
    facts.postgres[0].up = True
    assert targets_up(TARGETS_UP, facts, T).status is Status.OK
    facts.probes_configured = {"pgb": True}
    facts.probes = [ProbeFacts("pgb", "pgbouncer", "app", True)]
    assert health_checks(HEALTH, "pgb", "pgbouncer", facts).status is Status.OK
    facts.probes = [ProbeFacts("pgb", "pgbouncer", "app", False, "timeout")]
    assert health_checks(HEALTH, "pgb", "pgbouncer", facts).status is Status.FAIL
    facts.probes_configured = {"pgb": False}
    assert health_checks(HEALTH, "pgb", "pgbouncer", facts).status is Status.WARN


def test_down_target_is_unknown_never_ok() -> None:
    facts = Facts(
        pgbouncers=[PgBouncerFacts("pgb", up=False, collected_at=0.0, down_detail="refused")],
        postgres=[PostgresFacts("db", up=False, collected_at=0.0)],
    )
    findings = evaluate(facts, lambda _: T)
    per_target = [f for f in findings if f.target != "poolwatch" and f.check != "health_checks"]
    assert per_target and all(f.status is Status.UNKNOWN for f in per_target)


def test_reports_render() -> None:
    findings = evaluate(Facts(pgbouncers=[pgb({"server_lifetime": "86400"})], postgres=[pg()]), lambda _: T)
    doc = report.to_document(findings)
    assert doc["schema_version"] == 1 and doc["overall"] == "fail"
    assert sum(doc["counts"].values()) == len(findings)
    text = report.to_terminal(findings, colour=False)
    assert "[FAIL   ] Connection recycling" in text and "\x1b[" not in text
    assert "\x1b[31m" in report.to_terminal(findings, colour=True)
    html = report.to_html(findings)
    assert "data-check='recycling' data-status='fail'" in html and "<script" not in html
