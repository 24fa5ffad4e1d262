"""The README's promises: generated sections current, the two commands real, grants as documented."""

from __future__ import annotations

import os
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from poolwatch.localcluster import PgBouncerServer, PostgresServer
from poolwatch.reference import metrics_reference, render
from tests.conftest import MakePgBouncer
from tests.daemon import make_config, pgbouncer_target, postgres_target, running_daemon

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_generated_sections_are_current() -> None:
    assert render(README) == README, "run: python -m poolwatch.reference --write README.md"
    assert "<!-- BEGIN GENERATED: metrics -->" in README


def test_readme_opens_with_the_two_commands() -> None:
    first_block = re.search(r"```sh\n(.*?)```", README, re.DOTALL)
    assert first_block is not None and README.index("```sh") < README.index("\n## ")
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert commands == ["scripts/demo", "scripts/test"]
    for command in commands:
        assert os.access(REPO / command, os.X_OK)
    ci = (REPO / ".ci" / "run").read_text()
    assert "scripts/test" in ci


def _block_after(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\n```\w+\n(.*?)```", README, re.DOTALL)
    assert match is not None, marker
    return match.group(1)


def test_least_privilege_grants_are_what_the_fixtures_use(pg: PostgresServer, pgb: PgBouncerServer) -> None:
    sql = _block_after("least-privilege-sql")
    assert f"CREATE ROLE {pg.monitor_user} LOGIN" in sql
    assert f"GRANT pg_monitor TO {pg.monitor_user};" in sql
    role = pg.execute(
        "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls,"
        " array(SELECT b.rolname FROM pg_auth_members m JOIN pg_roles b ON b.oid = m.roleid"
        "       WHERE m.member = r.oid ORDER BY 1)"
        " FROM pg_roles r WHERE rolname = %s",
        (pg.monitor_user,),
    )
    assert role == [(False, False, False, False, False, ["pg_monitor"])]
    ini = _block_after("least-privilege-pgbouncer")
    assert f"stats_users = {pgb.stats_user}" in ini
    settings = {row["key"]: row["value"] for row in pgb.show("CONFIG")}
    assert pgb.stats_user in settings["stats_users"].split(",")
    assert pgb.stats_user not in settings["admin_users"].split(",")


async def test_metrics_reference_matches_a_real_scrape(
    pg: PostgresServer, make_pgbouncer: MakePgBouncer
) -> None:
    """Every family a real collection exposes is documented, and nothing documented is invented.

    Regenerate with ``POOLWATCH_WRITE_README=1 scripts/test tests/test_readme.py``.
    """
    pgb = make_pgbouncer(version="1.24")
    config = make_config(
        pgbouncers=[pgbouncer_target(pgb, probe={"databases": ["app"]})],
        postgres=[postgres_target(pg)],
        probes={"interval": 0.3},
    )
    async with running_daemon(config) as daemon:
        await daemon.wait_for("poolwatch_probe_success", 1, target="pgb", kind="pgbouncer", database="app")
        _, text = await daemon.get("/metrics")
    families = list(text_string_to_metric_families(text))
    expected = render(README, {"metrics": metrics_reference(families)})
    if os.environ.get("POOLWATCH_WRITE_README") == "1":
        (REPO / "README.md").write_text(expected, encoding="utf-8")
    assert expected == README, "run: POOLWATCH_WRITE_README=1 scripts/test tests/test_readme.py"
