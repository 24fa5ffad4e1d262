"""What /metrics serves is one valid exposition however it is produced.

* Two PgBouncer and two PostgreSQL targets: each metric is one group under one HELP/TYPE header
  with every target's series in it (a second header for a name is a parse error to ``promtool
  check metrics`` and to Prometheus's OpenMetrics parser).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections import Counter

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from poolwatch.localcluster import PgBouncerServer, PostgresServer
from tests.daemon import make_config, pgbouncer_target, postgres_target, running_daemon

OPENMETRICS = {"Accept": "application/openmetrics-text; version=1.0.0"}


def _headers(text: str) -> Counter[str]:
    """How many ``# TYPE`` lines each metric name has."""
    return Counter(line.split()[2] for line in text.splitlines() if line.startswith("# TYPE "))


async def _promtool(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    done = await asyncio.to_thread(
        subprocess.run, [promtool, "check", "metrics"], input=text.encode(), capture_output=True, check=False
    )
    # 3: lint warnings only (naming advice); 1 would be a parse error
    assert done.returncode in (0, 3), done.stderr.decode()
    assert b"error" not in done.stderr.lower(), done.stderr.decode()


async def test_two_targets_of_each_kind_share_one_header_per_metric(
    pgb: PgBouncerServer, pg: PostgresServer
) -> None:
    config = make_config(
        pgbouncers=[pgbouncer_target(pgb, "pgb-a"), pgbouncer_target(pgb, "pgb-b")],
        postgres=[postgres_target(pg, "db-a"), postgres_target(pg, "db-b")],
        collection={"interval": 3600},
        probes={"interval": 3600},
    )
    async with running_daemon(config) as daemon:
        status, text = await daemon.get("/metrics")
        assert status == 200
        status, om = await daemon.get("/metrics", headers=OPENMETRICS)
        assert status == 200
    headers = _headers(text)
    assert headers and max(headers.values()) == 1, [name for name, n in headers.items() if n > 1]
    assert max(_headers(om).values()) == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("pgbouncer_pools_client_active_connections", "pgbouncer_up"):
        targets = Counter(s.labels["target"] for s in families[name].samples)
        assert set(targets) == {"pgb-a", "pgb-b"} and targets["pgb-a"] == targets["pgb-b"], targets
    assert {s.labels["target"] for s in families["pg_up"].samples} == {"db-a", "db-b"}
    om_families = {f.name for f in parse_openmetrics(om)}  # type: ignore[no-untyped-call]
    assert {"pgbouncer_up", "pg_up"} <= om_families
    await _promtool(text)
