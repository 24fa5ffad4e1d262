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
    empty = run("stale_connection_detection", pgb({"server_check_query": "<empty>"}, version=(1, 25, 2)))
    assert empty.status is Status.OK and "an empty query" in empty.summary
    # before 1.25 the same text is sent literally (measured on 1.18 and 1.24: a syntax error per check)
    literal = run("stale_connection_detection", pgb({"server_check_query": "<empty>"}))
    assert literal.status is Status.WARN and "literally" in literal.summary


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
    assert finding.evidence["oldest_connection_seconds_by_application"] == {"web": 20000}
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
    assert "125 server connections but PostgreSQL db has only 97 usable slots" in over.summary
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
    assert bad.evidence["top_direct_sources"] == {"127.0.0.1 batch": 110}
    assert bad.evidence["through_pgbouncer"] == 20
    # a PgBouncer in front whose SHOW SERVERS failed: pooled and direct cannot be told apart
    blind = pgb(servers_readable=False)
    facts = Facts(pgbouncers=[blind], postgres=[db_many], links={"pgb": "db"})
    assert run("direct_connections", db_many, facts).status is Status.UNKNOWN
    assert run("direct_connections", pg(backends_readable=False)).status is Status.UNKNOWN
    # PgBouncer reports server connections but none matches a backend (NAT): unknown, not a false fail
    natted = pgb(server_endpoints={("10.9.9.9", 7000 + i) for i in range(20)})
    facts = Facts(pgbouncers=[natted], postgres=[db_many], links={"pgb": "db"})
    assert run("direct_connections", db_many, facts).status is Status.UNKNOWN


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
    old = run("graceful_shutdown", pg(version_num=130000))
    assert old.status is Status.UNKNOWN and "PostgreSQL 13 has no session counters" in old.summary
    assert run("connection_churn", pg(version_num=130000)).status is Status.UNKNOWN


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

    def sample(i: int) -> PostgresFacts:
        rows = [ActivityRow("app", "app", "web", "idle", 10), ActivityRow("app", "app", "leaky", "idle", i)]
        return pg(collected_at=1000.0 + i, client_backends=10 + i, activity=rows)

    history = deque(sample(i) for i in range(1, 5))
    growing = run("connection_growth", sample(5), Facts(history={"db": history}))
    assert growing.status is Status.WARN and "keep growing for leaky (1 → 2 → 3 → 4 → 5)" in growing.summary
    assert growing.evidence["growing_applications"] == {"leaky": [1, 2, 3, 4, 5]}
    short = run("connection_growth", sample(5), Facts(history={"db": deque([sample(4)])}))
    assert short.status is Status.OK and "a growth trend needs 5 collections (have 2" in short.summary


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
    # 1.24 does not count parses while max_prepared_statements = 0: silence proves nothing
    unknown = run("prepared_statements", quiet, Facts(history={"pgb": deque([before])}))
    assert unknown.status is Status.WARN and unknown.evidence["clients_prepare"] == "unknown"
    declared = run("prepared_statements", quiet, expect_prepared_statements=True)
    assert declared.status is Status.FAIL
    assert run("prepared_statements", quiet, expect_prepared_statements=False).status is Status.OK
    session = pgb({"max_prepared_statements": "0", "pool_mode": "session"})
    assert run("prepared_statements", session, expect_prepared_statements=True).status is Status.OK
    per_db = pgb(
        {"max_prepared_statements": "0", "pool_mode": "session"},
        databases=[{"name": "app", "pool_size": 20, "pool_mode": "transaction"}],
    )
    assert run("prepared_statements", per_db, expect_prepared_statements=True).status is Status.FAIL
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
    assert "  FAIL    #2   Connection recycling\n" in text and "\x1b[" not in text
    assert "seen: server_lifetime = 86400" in text and "fix:  set server_lifetime within 1 h–4 h" in text
    # problems first within a target, then the passes
    pgb_block = text.split("PgBouncer pgb ")[1].split("\n\n")[0]
    assert (
        pgb_block.index("FAIL")
        < pgb_block.index("WARN")
        < pgb_block.index("UNKNOWN")
        < pgb_block.index("OK ")
    )
    assert "\x1b[31m" in report.to_terminal(findings, colour=True)
    html = report.to_html(findings)
    assert "data-check='recycling' data-status='fail'" in html and "<script" not in html


# -- PgBouncer 1.25 server_check_query: the capture through the real parsing path ------------------
@pytest.mark.parametrize("version", ["1.18", "1.24.1", "1.25.0", "1.25.2"])
def test_capture_server_check_query_reaches_the_doctor(version: str) -> None:
    from poolwatch.doctor.adapt import pgbouncer_facts
    from poolwatch.metrics import SourceResult
    from poolwatch.sources.pgbouncer import PgBouncerObservation, PgBouncerSource, ShowResult
    from tests.test_pgbouncer_parsing import load

    captured = load(version)
    source = PgBouncerSource("pgb", "host=127.0.0.1 port=1 dbname=pgbouncer", None, connect_timeout=1)
    obs = PgBouncerObservation(collected_at=1000.0)
    for name, command in [
        ("version", "VERSION"),
        ("pools", "POOLS"),
        ("stats", "STATS"),
        ("databases", "DATABASES"),
        ("lists", "LISTS"),
        ("config", "CONFIG"),
        ("servers", "SERVERS"),
    ]:
        result = captured[command]
        source._absorb(obs, name, ShowResult.from_rows(result.columns, result.rows))  # what a collection runs
        obs.collected.add(name)
    facts = pgbouncer_facts(SourceResult("pgb", "pgbouncer", True, observation=obs), "127.0.0.1", 6432)
    finding = run("stale_connection_detection", facts)
    assert finding.status is Status.OK, finding
    if version.startswith("1.25"):
        # the metric label keeps its old reading ("" for <empty>); the doctor sees what PgBouncer printed
        assert obs.config["server_check_query"] == ""
        assert facts.config["server_check_query"] == "<empty>"
        assert finding.evidence["server_check_query"] == "<empty>" and "an empty query" in finding.summary
    else:
        assert finding.evidence["server_check_query"] == "select 1"
    # the same 1.25 release with the check really disabled (server_check_query = '')
    disabled = dict(facts.config, server_check_query="")
    facts.config = disabled
    assert run("stale_connection_detection", facts).status is Status.FAIL
    # peers (SHOW LISTS, 1.19+) and the pooled endpoints (SHOW SERVERS local_addr/local_port) arrive
    assert (facts.peers is None) == (version == "1.18")
    assert facts.server_endpoints and facts.servers_readable


def test_recycling_zero_means_one_use() -> None:
    # measured on PgBouncer 1.18 and 1.24: server_lifetime = 0 closes a server connection after one use
    finding = run("recycling", pgb({"server_lifetime": "0"}))
    assert finding.status is Status.FAIL and finding.value == 0.0
    assert "closed after one use" in finding.summary
    # 1.23+ lists the effective lifetime per database: only the ones that differ are evidence
    same = pgb(databases=[{"name": "app", "pool_size": 20, "server_lifetime": 3600}])
    assert "server_lifetime_per_database" not in run("recycling", same).evidence


def test_postgres_timeouts_effective_per_session() -> None:
    sessions = [
        ActivityRow("app", "app", "web", "idle", 3),
        ActivityRow("app", "mon", "poolwatch", "idle", 1),
    ]
    # server default unset, the app role has its own: the app's sessions are covered
    covered = pg(
        statement_timeout=0.0,
        idle_in_transaction_timeout=0.0,
        activity=sessions,
        role="mon",
        role_settings=[
            ("", "app", "statement_timeout", 45.0),
            ("", "app", "idle_in_transaction_session_timeout", 60.0),
        ],
    )
    ok = run("timeouts", covered)
    assert ok.status is Status.OK, ok.summary
    assert ok.evidence["effective_statement_timeout"] == {"app@app": 45.0}
    # database-and-role beats role beats database beats ALL beats the server default
    layered = pg(
        statement_timeout=40.0,
        activity=sessions,
        role="mon",
        role_settings=[
            ("", "", "statement_timeout", 50.0),
            ("app", "", "statement_timeout", 55.0),
            ("", "app", "statement_timeout", 0.0),
            ("app", "app", "statement_timeout", 30.0),
        ],
    )
    assert run("timeouts", layered).evidence["effective_statement_timeout"] == {"app@app": 30.0}
    # ALTER ROLE app SET statement_timeout = 0 while the server has one: warn, not fail
    opted_out = pg(
        statement_timeout=40.0,
        activity=sessions,
        role="mon",
        role_settings=[("", "app", "statement_timeout", 0.0)],
    )
    finding = run("timeouts", opted_out)
    assert finding.status is Status.WARN and "explicitly 0 for app@app" in finding.summary
    assert "ALTER ROLE app SET statement_timeout" in (finding.recommendation or "")
    # nothing anywhere: fail
    bare = run("timeouts", pg(statement_timeout=0.0, activity=sessions, role="mon"))
    assert bare.status is Status.FAIL and bare.value == 0.0
    # an override on poolwatch's own role hides the server default: unknown, never ok
    hidden = run(
        "timeouts",
        pg(statement_timeout=None, idle_in_transaction_timeout=None, activity=sessions, role="mon"),
    )
    assert hidden.status is Status.UNKNOWN and "hides the server default" in hidden.summary
    assert run("timeouts", pg(role_settings_readable=False)).status is Status.UNKNOWN


def test_adapter_reads_backends_from_client_counts() -> None:
    from datetime import UTC, datetime

    from poolwatch.doctor.adapt import postgres_facts
    from poolwatch.metrics import SourceResult
    from poolwatch.sources.postgres import ClientCount, PostgresObservation

    obs = PostgresObservation(
        target="db",
        collected_at=datetime.fromtimestamp(1000.0, UTC),
        can_read_all_stats=True,
        clients=[
            ClientCount("10.0.0.5", "web", 3, (5001, 5002, 5003)),
            ClientCount("10.0.0.6", "batch", 3, (6001, None)),  # a NULL port: counted as local
            ClientCount(None, "psql", 2, ()),  # Unix socket: no address, no port
        ],
    )
    facts = postgres_facts(SourceResult("db", "postgres", True, observation=obs))
    assert facts.backends == [
        ("10.0.0.5", 5001, "web"),
        ("10.0.0.5", 5002, "web"),
        ("10.0.0.5", 5003, "web"),
        ("10.0.0.6", 6001, "batch"),
        ("local", -1, "batch"),
        ("local", -1, "batch"),
        ("local", -1, "psql"),
        ("local", -1, "psql"),
    ]
    hidden = PostgresObservation(target="db", collected_at=obs.collected_at, can_read_all_stats=False)
    assert postgres_facts(SourceResult("db", "postgres", True, observation=hidden)).backends_readable is False


def test_reuseport_needs_peer_id_and_peers() -> None:
    no_peers = pgb({"so_reuseport": "1", "peer_id": "1"}, peers=0)
    finding = run("reuseport_peers", no_peers)
    assert finding.status is Status.WARN and "[peers] entries" in finding.summary
    assert run("reuseport_peers", pgb({"so_reuseport": "1", "peer_id": "1"}, peers=2)).status is Status.OK
    old = pgb({"so_reuseport": "1"}, version=(1, 18, 0))
    del old.config["peer_id"]
    assert "peering (PgBouncer 1.18.0)" in run("reuseport_peers", old).summary


def test_same_name_pgbouncer_and_postgres_stay_apart() -> None:
    from poolwatch.config import Config
    from poolwatch.doctor.runner import DoctorRunner

    bouncer, db = pgb(), pg()
    bouncer.target = db.target = "main"
    findings = evaluate(Facts(pgbouncers=[bouncer], postgres=[db], links={"main": "main"}), lambda _: T)
    doc = report.to_document(findings)
    assert [(g["target"], g["kind"]) for g in doc["targets"]] == [
        ("poolwatch", "poolwatch"),
        ("main", "pgbouncer"),
        ("main", "postgres"),
    ]
    runner = DoctorRunner(Config())
    runner.findings = findings
    status = next(f for f in runner.families() if f.name == "poolwatch_check_status")
    timeouts = [s for s in status.samples if s.labels == {"target": "main", "check": "timeouts"}]
    worst_timeouts = max(
        (f for f in findings if f.check == "timeouts"), key=lambda f: {-1: 1, 0: 0, 1: 2, 2: 3}[int(f.status)]
    )
    assert [s.value for s in timeouts] == [int(worst_timeouts.status)]


def test_json_document_schema() -> None:
    findings = evaluate(Facts(pgbouncers=[pgb()], postgres=[pg()], links={"pgb": "db"}), lambda _: T)
    doc = report.to_document(findings, generated_at=1_800_000_000.0)
    assert set(doc) == {"schema_version", "generated_at", "overall", "counts", "targets"}
    assert doc["generated_at"] == "2027-01-15T08:00:00+00:00"
    assert set(doc["counts"]) == {"ok", "warn", "fail", "unknown"}
    for group in doc["targets"]:
        assert set(group) == {"target", "kind", "status", "findings"}
        for finding in group["findings"]:
            assert set(finding) == {
                "check",
                "title",
                "target",
                "kind",
                "item",
                "status",
                "summary",
                "evidence",
                "recommendation",
                "reference",
                "value",
            }
            assert finding["status"] in ("ok", "warn", "fail", "unknown")
            assert 1 <= finding["item"] <= 11
            assert finding["recommendation"] is None or finding["status"] != "ok"
    # nothing evaluated yet is unknown, not ok
    assert report.to_document([])["overall"] == "unknown"
