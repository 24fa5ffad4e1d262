"""Results the doctor carries from one collection to the next are the ones it would compute afresh.

At thousands of pools the limit checks (bounded_overflow, sizing) reuse what they derived from SHOW
DATABASES, SHOW CONFIG and the pool list while those are unchanged (``PgBouncerFacts.memo``). Here
a runner-like sequence of collections, each changing one input, is evaluated twice: with the memo
carried along, and from fresh facts. Every finding must be identical, evidence included.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from poolwatch.config import DoctorThresholds
from poolwatch.doctor.checks import POSTGRES_CHECKS, direct_connections, evaluate, max_server_connections
from poolwatch.doctor.facts import Facts, PgBouncerFacts, PostgresFacts

from .test_doctor_checks import BASE_CONFIG
from .test_doctor_totals import _Table

Rows = list[dict[str, Any]]


def _databases(n: int) -> Rows:
    rng = random.Random(n)
    rows: Rows = [
        {
            "name": f"db{i:05d}",
            "pool_size": rng.choice([0, 1, 2, 5, 20]),
            "reserve_pool_size": rng.choice([None, 0, 1, 2]),
            "max_connections": rng.choice([0, 0, 0, 3, 50]),
            "pool_mode": rng.choice([None, "", "transaction", "transaction", "session"]),
            "server_lifetime": rng.choice([3600, 3600, 3600, 600, 0]),
        }
        for i in range(n)
    ]
    rows.append(
        {
            "name": "pgbouncer",
            "pool_size": 2,
            "reserve_pool_size": 0,
            "max_connections": 0,
            "pool_mode": "statement",
            "server_lifetime": 0,
        }
    )
    return rows


def _pools(n: int) -> Rows:
    rows = [{"database": f"db{i:05d}", "user": f"u{i % 7}"} for i in range(n)]
    rows += [{"database": f"db{i:05d}", "user": "extra"} for i in range(0, n, 3)]
    rows.append({"database": "pgbouncer", "user": "pgbouncer"})
    return rows


def _facts(config: Mapping[str, str], databases: Rows, pools: Rows, table: bool) -> PgBouncerFacts:
    return PgBouncerFacts(
        target="pgb",
        up=True,
        collected_at=1000.0,
        host="127.0.0.1",
        port=6432,
        version=(1, 24, 1),
        config=dict(config),
        # new row objects each time, as each collection parses new ones
        databases=_Table([dict(r) for r in databases]) if table else [dict(r) for r in databases],
        pools=_Table([dict(r) for r in pools]) if table else [dict(r) for r in pools],
    )


def _edit(rows: Rows, at: int, **changes: Any) -> Rows:
    out = [dict(r) for r in rows]
    out[at].update(changes)
    return out


Step = tuple[str, dict[str, str], Rows, Rows, DoctorThresholds]


def _steps(n: int) -> list[Step]:
    config = {**BASE_CONFIG, "pool_mode": "session"}
    dbs, pools = _databases(n), _pools(n)
    t = DoctorThresholds(cores=4)
    return [
        ("first", config, dbs, pools, t),
        ("unchanged", config, dbs, pools, t),
        ("pool_size", config, _edit(dbs, 5, pool_size=40), pools, t),
        ("reserve above the ratio", config, _edit(dbs, 6, reserve_pool_size=30), pools, t),
        ("max_connections cap", config, _edit(dbs, 7, max_connections=1), pools, t),
        ("pool_size as a float", config, _edit(dbs, 5, pool_size=40.0), pools, t),
        ("default_pool_size", {**config, "default_pool_size": "3"}, dbs, pools, t),
        ("reserve_pool_size", {**config, "reserve_pool_size": "9"}, dbs, pools, t),
        ("max_db_connections", {**config, "max_db_connections": "4"}, dbs, pools, t),
        ("max_user_connections", {**config, "max_user_connections": "2"}, dbs, pools, t),
        ("a new user", config, dbs, [*pools, {"database": "db00001", "user": "new"}], t),
        ("pools gone", config, dbs, pools[: n // 2], t),
        ("a database's pool_mode", config, _edit(dbs, 8, pool_mode="statement"), pools, t),
        ("global pool_mode", {**config, "pool_mode": "transaction"}, dbs, pools, t),
        ("a database's server_lifetime", config, _edit(dbs, 9, server_lifetime=99999), pools, t),
        ("global server_lifetime", {**config, "server_lifetime": "600"}, dbs, pools, t),
        ("reserve_ratio_max", config, dbs, pools, t.model_copy(update={"reserve_ratio_max": 0.05})),
        ("cores", config, dbs, pools, t.model_copy(update={"cores": 64})),
        ("back to the first", config, dbs, pools, t),
        ("a database gone", config, dbs[1:], pools, t),
    ]


def _json(findings: Sequence[Any]) -> list[dict[str, Any]]:
    return [f.to_json() for f in findings]


# rows as the source's Table (what a collection hands over) at every size; as plain dicts (the
# tests' own path) up to 2,000 rows, where it is already covered
@pytest.mark.parametrize(
    ("n", "table"),
    [(50, True), (2000, True), (10000, True), (50, False), (2000, False)],
    ids=["50-table", "2000-table", "10000-table", "50-dicts", "2000-dicts"],
)
def test_carried_results_equal_fresh_ones(n: int, table: bool) -> None:
    pg = PostgresFacts("db", up=True, collected_at=1000.0, max_connections=500)
    memo: dict[str, tuple[Any, Any]] = {}
    previous: PgBouncerFacts | None = None
    for label, config, dbs, pools, t in _steps(n):

        def thresholds(_: str, t: DoctorThresholds = t) -> DoctorThresholds:
            return t

        carried = _facts(config, dbs, pools, table)
        carried.memo = memo  # what DoctorRunner does: one memo per target, across collections
        fresh = _facts(config, dbs, pools, table)
        got = evaluate(Facts(pgbouncers=[carried], postgres=[pg], links={"pgb": "db"}), thresholds)
        want = evaluate(Facts(pgbouncers=[fresh], postgres=[pg], links={"pgb": "db"}), thresholds)
        assert _json(got) == _json(want), label
        assert max_server_connections(carried) == max_server_connections(fresh), label
        if label == "unchanged" and previous is not None:
            # the per-database dict (10,000 entries at 10,000 pools) is reused, not rebuilt
            assert carried.derived["max_server_connections"] is previous.derived["max_server_connections"]
        previous = carried
    assert {"database_limits", "max_server_connections", "reserve_ratios", "pool_modes"} <= set(memo)


def test_max_server_connections_hands_out_a_copy() -> None:
    facts = _facts(BASE_CONFIG, _databases(5), _pools(5), table=True)
    total, per_db = max_server_connections(facts)
    per_db["db00000"] = -1
    assert max_server_connections(facts)[1]["db00000"] != -1
    assert max_server_connections(facts)[0] == total


# -- direct_connections: counted per (address, application) in C, as one backend at a time -------
def _reference_bypass(
    backends: list[tuple[str, int, str]], pooled: set[tuple[str, int]]
) -> tuple[dict[str, int], int]:
    """The check's count before it counted in C: one backend at a time."""
    bypass: dict[str, int] = {}
    through = 0
    for addr, port, app in backends:
        if app.startswith("poolwatch"):
            continue
        if (addr, port) in pooled:
            through += 1
            continue
        key = f"{addr} {app or 'no application_name'}"
        bypass[key] = bypass.get(key, 0) + 1
    return bypass, through


@pytest.mark.parametrize("seed", range(8))
def test_direct_connections_count_like_one_backend_at_a_time(seed: int) -> None:
    rng = random.Random(seed)
    addrs = ["10.0.0.1", "10.0.0.2", "local", "10.0.0.1 x"]
    # "" and "no application_name" share a label; "x web" and "web" with "10.0.0.1 x" collide too
    apps = ["web", "batch", "", "no application_name", "poolwatch", "poolwatch-probe", "x web"]
    backends = [
        (addr := rng.choice(addrs), -1 if addr == "local" else rng.randrange(5000, 5400), rng.choice(apps))
        for _ in range(rng.randrange(0, 1500))
    ]
    endpoints = {("10.0.0.1", p) for p in range(5000, 5400, rng.choice([1, 2, 7]))} if seed % 4 else set()
    bouncer = PgBouncerFacts("pgb", up=True, collected_at=1000.0, server_endpoints=endpoints)
    pg = PostgresFacts("db", up=True, collected_at=1000.0, backends=backends)
    facts = Facts(pgbouncers=[bouncer], postgres=[pg], links={"pgb": "db"})
    t = DoctorThresholds()
    check = next(c for c in POSTGRES_CHECKS if c.id == "direct_connections")
    finding = direct_connections(check, pg, t, facts)
    bypass, through = _reference_bypass(backends, endpoints)
    top = dict(sorted(bypass.items(), key=lambda kv: -kv[1])[:5])
    assert finding.evidence["direct_client_connections"] == sum(bypass.values()) == finding.value
    assert finding.evidence["through_pgbouncer"] == through
    assert list(finding.evidence["top_direct_sources"].items()) == list(top.items())
