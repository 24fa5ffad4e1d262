"""End to end: real Prometheus and Alertmanager on top of the real poolwatch, PgBouncer and PostgreSQL.

Prometheus (Debian ``prometheus``) scrapes the running poolwatch every second and evaluates
deploy/prometheus/alerts.yml, with ``for:`` cut to 1s and the 1-minute peak windows cut to 5s in a copy
in the test's directory (the shipped file is never changed). Alertmanager (Debian
``prometheus-alertmanager``, gossip off) receives the alerts, routed and inhibited by the compose
example's configuration. Under a steady load through PgBouncer and directly:

* every dashboard query, with its variables filled in, parses, and each one the load should light up
  returns data; every variable query finds values;
* every rule expression parses (recording rules return data), and so does every query inside an
  alert's description;
* a saturated pool raises PgBouncerPoolSaturated (critical, the warning inhibited), PgBouncerMaxWaitHigh
  and PgBouncerProbeFailing in Alertmanager, which resolve when the load ends;
* a stopped PgBouncer raises PgBouncerDown and not PgBouncerProbeFailing (one incident, one alert), and
  it resolves when PgBouncer is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml

from poolwatch import metrics
from poolwatch.localcluster import Load, PostgresServer, free_port
from tests.conftest import MakePgBouncer, unavailable
from tests.daemon import make_config, pgbouncer_target, postgres_target, running_daemon, secret_env
from tests.promql_names import REPO_ROOT, known_metric_names, template_queries

pytestmark = pytest.mark.slow

RULES = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = REPO_ROOT / "grafana" / "dashboards" / "poolwatch.json"
ALERTMANAGER_CONFIG = REPO_ROOT / "deploy" / "compose" / "alertmanager" / "alertmanager.yml"
POOL_SIZE = 4
RATE_INTERVAL = "5s"

#: dashboard queries (panel title, refId) that rightly return nothing under this test's load
MAY_BE_EMPTY = {
    ("Collection errors", "B"): "no collector fails",
    ("Server connections ÷ max_db_connections / max_user_connections", "A"): "max_db_connections = 0",
    ("Server connections ÷ max_db_connections / max_user_connections", "B"): "max_user_connections = 0",
    ("Backends waiting on locks", "A"): "nobody waits on a lock",
    ("SELECT 1 failures by reason", "A"): "no check has failed yet",
}
#: recording rules that need more than this test's history (none today)
RECORDS_MAY_BE_EMPTY: set[str] = set()
#: tests/rules/metric_names.txt entries a PgBouncer 1.18 without failures does not produce
NAMES_MAY_BE_ABSENT = {
    "pgbouncer_stats_client_parses_total",  # PgBouncer 1.24+
    "pgbouncer_stats_server_parses_total",
    "pgbouncer_stats_binds_total",
    "poolwatch_probe_failures_total",  # once a check has failed
}

T = TypeVar("T")


def _binary(name: str) -> str:
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if found is None:
        message = (
            f"{name} is missing: apt-get install -y prometheus prometheus-alertmanager (scripts/test does)"
        )
        unavailable(message)
    return found


def fast_rules(text: str) -> str:
    """The shipped rules with every ``for:`` at 1s and the 1-minute peak windows at 5s."""
    text = re.sub(r"^(\s*)for: \S+\s*$", r"\g<1>for: 1s", text, flags=re.MULTILINE)
    return text.replace("[1m]", "[5s]")


def fill_variables(expr: str) -> str:
    """A dashboard query as Grafana sends it with every variable on "All"."""
    expr = re.sub(r"\$(instance|target|database|user)\b", ".*", expr)
    return expr.replace("$__rate_interval", RATE_INTERVAL)


@contextlib.contextmanager
def started(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server process for the block; it and its children are stopped at the end."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


async def eventually(check: Callable[[], Awaitable[T]], what: str, timeout: float = 30.0) -> T:
    """Call ``check`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")
        await asyncio.sleep(0.25)


class Api:
    def __init__(self, http: aiohttp.ClientSession, prometheus: str, alertmanager: str) -> None:
        self.http, self.prometheus, self.alertmanager = http, prometheus, alertmanager

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; an expression Prometheus cannot parse or evaluate fails the test."""
        async with self.http.post(f"{self.prometheus}/api/v1/query", data={"query": expr}) as response:
            body = await response.json()
        assert body.get("status") == "success", f"{expr}\n-> {body.get('errorType')}: {body.get('error')}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def label_values(self, label: str, match: str) -> list[str]:
        url = f"{self.prometheus}/api/v1/label/{label}/values"
        async with self.http.get(url, params={"match[]": match}) as response:
            body = await response.json()
        assert body.get("status") == "success", f"label_values({match}, {label}): {body}"
        values: list[str] = body["data"]
        return values

    async def rule_errors(self) -> list[str]:
        """Rules whose last evaluation failed (e.g. a join that matches many-to-many on real data)."""
        async with self.http.get(f"{self.prometheus}/api/v1/rules") as response:
            body = await response.json()
        assert body.get("status") == "success", body
        return [
            f"{rule['name']}: {rule.get('lastError')}"
            for group in body["data"]["groups"]
            for rule in group["rules"]
            if rule.get("health") != "ok"
        ]

    async def alerts(self) -> list[dict[str, Any]]:
        """Alertmanager's active (firing, possibly inhibited) alerts."""
        async with self.http.get(f"{self.alertmanager}/api/v2/alerts") as response:
            assert response.status == 200, await response.text()
            alerts: list[dict[str, Any]] = await response.json()
        return alerts

    async def firing(self, alertname: str, **labels: str) -> list[dict[str, Any]]:
        return [
            alert
            for alert in await self.alerts()
            if alert["labels"].get("alertname") == alertname
            and all(alert["labels"].get(k) == v for k, v in labels.items())
        ]


def _prometheus_config(path: Path, poolwatch: str, alertmanager: str, rules: Path) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules)],
                "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
                "scrape_configs": [{"job_name": "poolwatch", "static_configs": [{"targets": [poolwatch]}]}],
            }
        )
    )


def _alertmanager_config(path: Path) -> None:
    """The compose example's routing and inhibition, with no waiting for a group's first notification."""
    if ALERTMANAGER_CONFIG.exists():
        config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    else:
        config = {
            "route": {"receiver": "null", "group_by": ["alertname", "target"]},
            "receivers": [{"name": "null"}],
            "inhibit_rules": [
                {
                    "source_matchers": ['severity="critical"'],
                    "target_matchers": ['severity="warning"'],
                    "equal": ["alertname", "target"],
                }
            ],
        }
    config["route"].update({"group_wait": "1s", "group_interval": "1s"})
    path.write_text(yaml.safe_dump(config))


def _dashboard_queries() -> list[tuple[str, str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["refId"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def _dashboard_variables() -> list[tuple[str, str, str]]:
    """(variable, label, series selector) of every label_values() variable."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["definition"])
            assert match, variable["definition"]
            out.append((variable["name"], match.group(2), match.group(1)))
    return out


def _rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


async def test_prometheus_scrapes_poolwatch_and_alerts_reach_alertmanager(
    pg: PostgresServer, make_pgbouncer: MakePgBouncer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prometheus_bin, alertmanager_bin = _binary("prometheus"), _binary("prometheus-alertmanager")
    # Prometheus (Go's gzip reader) reads the body as a large PgBouncer's is served: families
    # compressed one by one and put together into one gzip member (Snapshot.packed)
    monkeypatch.setattr(metrics, "PACK_ALONE_SERIES", 2)
    pgb = make_pgbouncer(default_pool_size=POOL_SIZE, max_client_conn=100, query_wait_timeout=120)
    # SELECT 1 through the application's own pool (app/app): it queues when that pool is saturated
    probe = {"user": pgb.app_user, "password_env": secret_env(pgb.app_password)}
    config = make_config(
        pgbouncers=[pgbouncer_target(pgb, "pgb", probe=probe)],
        postgres=[postgres_target(pg, "db")],
        collection={"cached_body_max_series": 1},
    )

    rules = tmp_path / "alerts.yml"
    rules.write_text(fast_rules(RULES.read_text()))
    prometheus_port, alertmanager_port = free_port(), free_port()
    prometheus_url = f"http://127.0.0.1:{prometheus_port}"
    alertmanager_url = f"http://127.0.0.1:{alertmanager_port}"
    _alertmanager_config(tmp_path / "alertmanager.yml")

    async with running_daemon(config) as daemon, Load() as load:
        poolwatch = daemon.url.removeprefix("http://").rstrip("/")
        _prometheus_config(tmp_path / "prometheus.yml", poolwatch, f"127.0.0.1:{alertmanager_port}", rules)
        alertmanager_args = [
            alertmanager_bin,
            f"--config.file={tmp_path / 'alertmanager.yml'}",
            f"--storage.path={tmp_path / 'alertmanager-data'}",
            f"--web.listen-address=127.0.0.1:{alertmanager_port}",
            "--cluster.listen-address=",
            "--log.level=warn",
        ]
        prometheus_args = [
            prometheus_bin,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
            "--rules.alert.resend-delay=1s",
            "--log.level=warn",
        ]
        with (
            started(alertmanager_args, tmp_path / "alertmanager.log"),
            started(prometheus_args, tmp_path / "prometheus.log"),
        ):
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
                api = Api(http, prometheus_url, alertmanager_url)
                await _wait_ready(http, prometheus_url, alertmanager_url, tmp_path)

                # A steady load: queries through PgBouncer, queries directly, one idle-in-transaction session.
                load.trickle(pgb.app_dsn(), pgb.app_password, interval=0.05, name="through-pgbouncer")
                load.trickle(pg.app_dsn(), pg.app_password, interval=0.2, name="direct")
                await load.idle_in_transaction(pg.app_dsn(), pg.app_password)
                await eventually(
                    lambda: api.query('up{job="poolwatch"} == 1'), "Prometheus scraping poolwatch"
                )
                await eventually(
                    lambda: api.query(
                        f'sum(rate(pgbouncer_stats_sql_transactions_pooled_total{{database="app"}}'
                        f"[{RATE_INTERVAL}])) > 0"
                    ),
                    "transactions through PgBouncer in Prometheus",
                )
                await eventually(
                    lambda: api.query(f"rate(poolwatch_probe_duration_seconds_count[{RATE_INTERVAL}]) > 0"),
                    "SELECT 1 probes in Prometheus",
                )

                await _check_metric_names(api)
                await _check_dashboard(api)
                await _check_rules(api)
                steady = {a["labels"]["alertname"] for a in await api.alerts()}
                print(f"firing under the steady load: {sorted(steady)}")
                assert not steady & {"PgBouncerPoolSaturated", "PgBouncerMaxWaitHigh", "PgBouncerDown"}, (
                    steady
                )
                assert not await api.rule_errors()

                await _saturate_the_pool(api, pgb.app_dsn(), pgb.app_password)
                await _stop_pgbouncer(api, pgb)
                assert not await api.rule_errors()


async def _wait_ready(http: aiohttp.ClientSession, prometheus: str, alertmanager: str, logs: Path) -> None:
    async def ready(url: str) -> bool:
        try:
            async with http.get(url) as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    for url, log in (
        (f"{prometheus}/-/ready", "prometheus.log"),
        (f"{alertmanager}/-/ready", "alertmanager.log"),
    ):
        deadline = time.monotonic() + 30
        while not await ready(url):
            if time.monotonic() > deadline:
                pytest.fail(f"{url} not ready; {log}:\n{(logs / log).read_text(errors='replace')[-3000:]}")
            await asyncio.sleep(0.2)


async def _check_metric_names(api: Api) -> None:
    """tests/rules/metric_names.txt, which the rule and dashboard tests trust, is what poolwatch exports."""
    scraped = {
        name
        for name in await api.label_values("__name__", '{job="poolwatch"}')
        if not name.startswith("scrape_")  # Prometheus' own per-scrape series
    }
    listed = known_metric_names()
    assert scraped - listed == set(), "exported but missing from tests/rules/metric_names.txt"
    assert listed - scraped - NAMES_MAY_BE_ABSENT == set(), "in tests/rules/metric_names.txt but not exported"


async def _check_dashboard(api: Api) -> None:
    """Every dashboard query parses, and each the load lights up returns data."""
    for variable, label, selector in _dashboard_variables():
        values = await api.label_values(label, fill_variables(selector))
        assert values, f"variable {variable}: label_values({selector}, {label}) found nothing"
    empty = []
    for title, ref, expr in _dashboard_queries():
        query = fill_variables(expr)
        result = await api.query(query)
        if not result and (title, ref) not in MAY_BE_EMPTY:
            # rates need two samples in their window: give them a few scrapes
            deadline = time.monotonic() + 5
            while not result and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                result = await api.query(query)
            if not result:
                empty.append(f"{title} [{ref}]: {query}")
    assert not empty, "dashboard queries without data under load:\n" + "\n".join(empty)


async def _check_rules(api: Api) -> None:
    """Every shipped rule expression and every query in a description parses; recording rules have data."""
    for rule in _rules():
        await api.query(rule["expr"])
        for text in rule.get("annotations", {}).values():
            for query in template_queries(text):
                await api.query(query)
        record = rule.get("record")
        if record and record not in RECORDS_MAY_BE_EMPTY:

            async def recorded(record: str = record) -> list[dict[str, Any]]:
                return await api.query(record)

            await eventually(recorded, f"data for recording rule {record}", timeout=10)


async def _saturate_the_pool(api: Api, dsn: str, password: str) -> None:
    """All POOL_SIZE server connections held in open transactions, as many clients queued behind them."""
    async with Load() as holders:
        await holders.hold_transactions(dsn, password, 2 * POOL_SIZE, wait_holding=POOL_SIZE, name="saturate")
        saturated = await eventually(
            lambda: api.firing("PgBouncerPoolSaturated", target="pgb", severity="critical"),
            "PgBouncerPoolSaturated (critical) in Alertmanager",
        )
        assert "app/app (100%)" in saturated[0]["annotations"]["description"], saturated[0]["annotations"]
        capacity = await eventually(
            lambda: api.firing("PgBouncerPoolSaturated", target="pgb", severity="warning"),
            "PgBouncerPoolSaturated (warning) in Alertmanager",
        )
        assert capacity[0]["status"]["state"] == "suppressed", "the critical alert should inhibit the warning"
        assert capacity[0]["status"]["inhibitedBy"], capacity[0]["status"]
        assert saturated[0]["status"]["state"] == "active", saturated[0]["status"]
        await eventually(
            lambda: api.firing("PgBouncerMaxWaitHigh", target="pgb", severity="warning"),
            "PgBouncerMaxWaitHigh in Alertmanager",
        )
        await eventually(
            lambda: api.firing("PgBouncerProbeFailing", target="pgb"), "PgBouncerProbeFailing in Alertmanager"
        )
    for alertname in ("PgBouncerPoolSaturated", "PgBouncerMaxWaitHigh", "PgBouncerProbeFailing"):

        async def resolved(alertname: str = alertname) -> bool:
            return not await api.firing(alertname, target="pgb")

        await eventually(resolved, f"{alertname} to resolve after the load ended")


async def _stop_pgbouncer(api: Api, pgb: Any) -> None:
    await asyncio.to_thread(pgb.stop)
    try:
        down = await eventually(
            lambda: api.firing("PgBouncerDown", target="pgb"), "PgBouncerDown in Alertmanager"
        )
        assert down[0]["labels"]["severity"] == "critical"
        assert "reason: connect" in down[0]["annotations"]["description"], down[0]["annotations"]
        # The probes fail too, but the down PgBouncer is the one incident to report.
        await asyncio.sleep(3)
        assert not await api.firing("PgBouncerProbeFailing", target="pgb")
    finally:
        await asyncio.to_thread(pgb.start)

    async def resolved() -> bool:
        return not await api.firing("PgBouncerDown", target="pgb")

    await eventually(resolved, "PgBouncerDown to resolve once PgBouncer is back")
