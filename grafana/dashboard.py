"""poolwatch's Grafana dashboard as code: the source of grafana/dashboards/poolwatch.json.

    python grafana/dashboard.py            # rewrite grafana/dashboards/poolwatch.json
    python grafana/dashboard.py --check    # exit 1 when the committed JSON differs from this output

A plain generator (standard library only) emitting Grafana's dashboard JSON (schemaVersion 39; Grafana
10.4+). tests/test_dashboard.py checks the two agree, checks the JSON's structure, checks that every
metric it queries is one poolwatch exports, and checks that the threshold lines below equal the alert
thresholds in deploy/prometheus/alerts.yml.

Rows: overview, PgBouncer pools, throughput and latency (SHOW STATS), PostgreSQL connections,
transaction ages, SELECT 1 probes. Variables: datasource, instance (the poolwatch), target (the
PgBouncer or PostgreSQL), database and user (the pool's; PostgreSQL panels match them to datname and
usename).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "dashboards" / "poolwatch.json"

UID = "poolwatch"
TITLE = "poolwatch: PgBouncer and PostgreSQL connection pooling"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
#: the provisioned Prometheus datasource (grafana/provisioning/datasources/poolwatch.yml)
DEFAULT_DATASOURCE_UID = "prometheus"

# Label selectors. Multi-value variables expand to regexes, "All" to .*
T = 'instance=~"$instance", target=~"$target"'
POOL = T + ', database=~"$database", database!="pgbouncer", user=~"$user"'
STATS = T + ', database=~"$database", database!="pgbouncer"'
DB_ROWS = T + ', name=~"$database", name!="pgbouncer"'
PG_DB = T + ', datname=~"$database"'
PG_USER = PG_DB + ', usename=~"$user"'
POOL_SIZE = f'label_replace(pgbouncer_databases_pool_size{{{DB_ROWS}}}, "database", "$1", "name", "(.+)")'
RATE = "$__rate_interval"
IDLE_IN_TX = ', state=~"idle in transaction.*"'
NOT_IDLE_IN_TX = ', state!~"idle in transaction.*"'
NOT_POOLWATCH = ', application_name!="poolwatch"'
LOCK_WAIT = ', wait_event_type="Lock"'
WAITING = ', wait_event_type!=""'


@dataclass(frozen=True)
class Threshold:
    """Dashed lines on a panel, equal to the thresholds of the alerts named (tests/test_dashboard.py)."""

    alerts: tuple[str, ...]
    warning: float
    critical: float | None = None

    def describe(self) -> str:
        values = f"warning {self.warning:g}" + (f", critical {self.critical:g}" if self.critical else "")
        return f"Dashed lines: {' / '.join(self.alerts)} ({values})."


THRESHOLDS: dict[str, Threshold] = {
    "clients_waiting": Threshold(("PgBouncerClientsWaiting",), 20),
    "maxwait": Threshold(("PgBouncerMaxWaitHigh",), 5, 30),
    "pool_saturation": Threshold(("PgBouncerPoolSaturated",), 0.85, 0.95),
    "client_connections": Threshold(("PgBouncerClientConnectionsNearLimit",), 0.8, 0.9),
    "server_connections": Threshold(("PgBouncerServerConnectionsNearLimit",), 0.8, 0.9),
    "query_latency": Threshold(("PgBouncerQueryLatencyHigh",), 0.1),
    "server_age": Threshold(("PgBouncerServerConnectionTooOld",), 14400),
    "pg_connections": Threshold(("PostgresConnectionsNearMax",), 0.75, 0.9),
    "idle_in_transaction": Threshold(("PostgresIdleInTransaction",), 300, 900),
    "long_transaction": Threshold(("PostgresLongTransaction",), 300, 1800),
    "lock_waits": Threshold(("PostgresLockWaits",), 10),
    "churn": Threshold(("PostgresConnectionChurn",), 0.5),
    "abnormal_sessions": Threshold(("PostgresSessionsEndingAbnormally",), 1),
    "backend_age": Threshold(("PostgresConnectionTooOld",), 14400),
    "probe_latency": Threshold(("PgBouncerProbeSlow", "PostgresProbeSlow"), 0.5),
}

#: panel title → THRESHOLDS key, filled as panels are built (the test reads it)
PANEL_THRESHOLDS: dict[str, str] = {}

UP_MAPPINGS = [
    {
        "type": "value",
        "options": {
            "0": {"text": "DOWN", "color": "red", "index": 0},
            "1": {"text": "UP", "color": "green", "index": 1},
        },
    }
]
READY_MAPPINGS = [
    {
        "type": "value",
        "options": {
            "0": {"text": "NOT READY", "color": "red", "index": 0},
            "1": {"text": "READY", "color": "green", "index": 1},
        },
    }
]
PROBE_MAPPINGS = [
    {
        "type": "value",
        "options": {
            "0": {"text": "FAIL", "color": "red", "index": 0},
            "1": {"text": "OK", "color": "green", "index": 1},
        },
    }
]
VERDICT_MAPPINGS = [
    {
        "type": "value",
        "options": {
            "-1": {"text": "UNKNOWN", "color": "text", "index": 0},
            "0": {"text": "OK", "color": "green", "index": 1},
            "1": {"text": "WARN", "color": "orange", "index": 2},
            "2": {"text": "FAIL", "color": "red", "index": 3},
        },
    }
]


def query(expr: str, legend: str = "__auto", *, instant: bool = False, table: bool = False) -> dict[str, Any]:
    """One Prometheus query of a panel (refIds are assigned by the panel)."""
    return {
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": " ".join(expr.split()),
        "legendFormat": legend,
        "range": not instant,
        "instant": instant,
        **({"format": "table"} if table else {}),
    }


def _steps(threshold: Threshold | None) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    if threshold is not None:
        steps.append({"color": "orange", "value": threshold.warning})
        if threshold.critical is not None:
            steps.append({"color": "red", "value": threshold.critical})
    return {"mode": "absolute", "steps": steps}


def _panel(kind: str, title: str, description: str, targets: list[dict[str, Any]]) -> dict[str, Any]:
    for index, target in enumerate(targets):
        target["refId"] = chr(ord("A") + index)
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": targets,
    }


def timeseries(
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    *,
    unit: str = "short",
    threshold: str | None = None,
    stack: bool = False,
    minimum: float | None = 0,
    maximum: float | None = None,
    lines_matching: str | None = None,
) -> dict[str, Any]:
    """A time series panel; ``threshold`` draws the alert thresholds as dashed lines.

    ``lines_matching``: a regex of series names (limits such as pool_size) drawn as dashed, unstacked lines.
    """
    limits = THRESHOLDS[threshold] if threshold else None
    if limits is not None:
        PANEL_THRESHOLDS[title] = threshold  # type: ignore[assignment]
        description = f"{description} {limits.describe()}"
    custom: dict[str, Any] = {
        "drawStyle": "line",
        "lineWidth": 1,
        "fillOpacity": 20 if stack else 0,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        "thresholdsStyle": {"mode": "dashed" if limits else "off"},
    }
    defaults: dict[str, Any] = {
        "unit": unit,
        "color": {"mode": "palette-classic"},
        "custom": custom,
        "thresholds": _steps(limits),
    }
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    overrides: list[dict[str, Any]] = []
    if lines_matching:
        overrides.append(
            {
                "matcher": {"id": "byRegexp", "options": lines_matching},
                "properties": [
                    {"id": "custom.stacking", "value": {"mode": "none", "group": "A"}},
                    {"id": "custom.fillOpacity", "value": 0},
                    {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                    {"id": "custom.lineWidth", "value": 2},
                ],
            }
        )
    panel = _panel("timeseries", title, description, targets)
    panel["fieldConfig"] = {"defaults": defaults, "overrides": overrides}
    panel["options"] = {
        "legend": {
            "displayMode": "table",
            "placement": "bottom",
            "showLegend": True,
            "calcs": ["lastNotNull", "max"],
        },
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return panel


def stat(
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    *,
    unit: str = "short",
    mappings: list[dict[str, Any]] | None = None,
    red_below: float | None = None,
) -> dict[str, Any]:
    """A stat panel; ``red_below`` colours values under it red (1/0 up gauges)."""
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    if red_below is not None:
        steps = [{"color": "red", "value": None}, {"color": "green", "value": red_below}]
    panel = _panel("stat", title, description, targets)
    panel["fieldConfig"] = {
        "defaults": {
            "unit": unit,
            "mappings": mappings or [],
            "thresholds": {"mode": "absolute", "steps": steps},
            "color": {"mode": "thresholds"},
        },
        "overrides": [],
    }
    panel["options"] = {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": "background",
        "graphMode": "none",
        "justifyMode": "auto",
        "orientation": "auto",
        "textMode": "auto",
        "wideLayout": True,
    }
    return panel


def table(
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    *,
    mappings: list[dict[str, Any]],
    value_name: str,
) -> dict[str, Any]:
    panel = _panel("table", title, description, targets)
    panel["fieldConfig"] = {
        "defaults": {
            "mappings": mappings,
            "custom": {"align": "auto", "cellOptions": {"type": "auto"}},
            "thresholds": {"mode": "absolute", "steps": [{"color": "text", "value": None}]},
        },
        "overrides": [
            {
                "matcher": {"id": "byName", "options": value_name},
                "properties": [{"id": "custom.cellOptions", "value": {"type": "color-background"}}],
            }
        ],
    }
    panel["transformations"] = [
        {
            "id": "organize",
            "options": {"excludeByName": {"Time": True}, "renameByName": {"Value": value_name}},
        }
    ]
    panel["options"] = {"showHeader": True, "sortBy": [{"displayName": value_name, "desc": True}]}
    return panel


def state_timeline(
    title: str, description: str, targets: list[dict[str, Any]], mappings: list[dict[str, Any]]
) -> dict[str, Any]:
    panel = _panel("state-timeline", title, description, targets)
    panel["fieldConfig"] = {
        "defaults": {
            "mappings": mappings,
            "color": {"mode": "thresholds"},
            "thresholds": {
                "mode": "absolute",
                "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}],
            },
            "custom": {"fillOpacity": 70, "lineWidth": 0},
        },
        "overrides": [],
    }
    panel["options"] = {
        "showValue": "never",
        "mergeValues": True,
        "rowHeight": 0.9,
        "alignValue": "left",
        "legend": {"showLegend": False, "displayMode": "list", "placement": "bottom"},
    }
    return panel


class Layout:
    """Places panels left to right on Grafana's 24-column grid, rows full width."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self._x = self._y = self._line_height = 0

    def _next_id(self) -> int:
        return len(self.panels) + 1

    def _newline(self) -> None:
        self._y += self._line_height
        self._x = self._line_height = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "id": self._next_id(),
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y},
                "panels": [],
            }
        )
        self._y += 1

    def add(self, panel: dict[str, Any], width: int, height: int = 8) -> None:
        if self._x + width > 24:
            self._newline()
        panel["id"] = self._next_id()
        panel["gridPos"] = {"h": height, "w": width, "x": self._x, "y": self._y}
        self.panels.append(panel)
        self._x += width
        self._line_height = max(self._line_height, height)


def m(name: str, selector: str = T) -> str:
    """A selector: ``name{selector}``."""
    return f"{name}{{{selector}}}"


def rate(name: str, selector: str) -> str:
    return f"rate({m(name, selector)}[{RATE}])"


def all_servers(selector: str = POOL) -> str:
    """Every server connection of a pool: active + idle + used + tested + login."""
    states = ("active", "idle", "used", "testing", "login")
    return " + ".join(m(f"pgbouncer_pools_server_{state}_connections", selector) for state in states)


def usable_slots() -> str:
    """max_connections − superuser_reserved_connections − reserved_connections."""
    return (
        f"{m('pg_settings_max_connections')} - {m('pg_settings_superuser_reserved_connections')} "
        f"- {m('pg_settings_reserved_connections')}"
    )


def overview(grid: Layout) -> None:
    grid.row("Overview")
    grid.add(
        stat(
            "Targets up",
            "poolwatch's last collection of each target (poolwatch_target_up).",
            [query(f"min by (target, kind) ({m('poolwatch_target_up')})", "{{target}} ({{kind}})")],
            mappings=UP_MAPPINGS,
            red_below=1,
        ),
        8,
        5,
    )
    ready = 'instance=~"$instance"'
    grid.add(
        stat(
            "Ready",
            "What /readyz says: every target answered and every SELECT 1 check passed.",
            [
                query(
                    f"min by (instance) ({m('poolwatch_target_up', ready)} "
                    f"or {m('poolwatch_probe_success', ready)})",
                    "{{instance}}",
                )
            ],
            mappings=READY_MAPPINGS,
            red_below=1,
        ),
        4,
        5,
    )
    grid.add(
        stat(
            "PgBouncer up",
            "pgbouncer_up: the admin console answers poolwatch.",
            [query(f"max by (target) ({m('pgbouncer_up')})", "{{target}}")],
            mappings=UP_MAPPINGS,
            red_below=1,
        ),
        6,
        5,
    )
    grid.add(
        stat(
            "PostgreSQL up",
            "pg_up: PostgreSQL answers poolwatch's monitoring connection.",
            [query(f"max by (target) ({m('pg_up')})", "{{target}}")],
            mappings=UP_MAPPINGS,
            red_below=1,
        ),
        6,
        5,
    )
    grid.add(
        table(
            "Pool doctor verdicts",
            "The production checklist, judged on live data (poolwatch_check_status). poolwatch's /checklist "
            "shows the evidence and the fix; PoolwatchCheckFailing fires on FAIL.",
            [query(f"max by (target, check) ({m('poolwatch_check_status')})", instant=True, table=True)],
            mappings=VERDICT_MAPPINGS,
            value_name="verdict",
        ),
        12,
        10,
    )
    grid.add(
        timeseries(
            "Collection duration",
            "How long poolwatch's last collection of each target took.",
            [
                query(
                    f"max by (target, kind) ({m('poolwatch_collection_duration_seconds')})",
                    "{{target}} ({{kind}})",
                )
            ],
            unit="s",
        ),
        6,
        10,
    )
    grid.add(
        timeseries(
            "Collection errors",
            "Failed collections per second by reason, and collectors (queries) failing "
            "(PoolwatchCollectionErrors, PoolwatchCollectorFailing).",
            [
                query(
                    f"sum by (target, reason) ({rate('poolwatch_errors_total', T)})", "{{target}} {{reason}}"
                ),
                query(
                    f"count by (target) "
                    f"(max by (target, collector) ({m('poolwatch_collector_success')}) == 0)",
                    "{{target}} failing collectors",
                ),
            ],
        ),
        6,
        10,
    )


def pools(grid: Layout) -> None:
    grid.row("PgBouncer pools")
    pool = "{{target}} {{database}}/{{user}}"
    by_pool = "sum by (target, database, user)"
    grid.add(
        timeseries(
            "Client connections: active and waiting",
            "SHOW POOLS cl_active and cl_waiting per pool (database/user).",
            [
                query(
                    f"{by_pool} ({m('pgbouncer_pools_client_active_connections', POOL)})", f"{pool} active"
                ),
                query(
                    f"{by_pool} ({m('pgbouncer_pools_client_waiting_connections', POOL)})", f"{pool} waiting"
                ),
            ],
        ),
        8,
    )
    grid.add(
        timeseries(
            "Clients waiting for a server connection",
            "cl_waiting summed over the selected pools, peak over 1m, as PgBouncerClientsWaiting sees it.",
            [
                query(
                    f"sum by (target) "
                    f"(max_over_time({m('pgbouncer_pools_client_waiting_connections', POOL)}[1m]))",
                    "{{target}}",
                )
            ],
            threshold="clients_waiting",
        ),
        8,
    )
    grid.add(
        timeseries(
            "Max wait (oldest waiting client)",
            "SHOW POOLS maxwait + maxwait_us: how long the oldest waiting client has waited.",
            [
                query(
                    f"max by (target, database, user) ({m('pgbouncer_pools_client_maxwait_seconds', POOL)})",
                    pool,
                )
            ],
            unit="s",
            threshold="maxwait",
        ),
        8,
    )
    busy = " + ".join(
        f"max_over_time({m(f'pgbouncer_pools_server_{state}_connections', POOL)}[1m])"
        for state in ("active", "testing", "login")
    )
    grid.add(
        timeseries(
            "Pool saturation (busy ÷ pool_size)",
            "(sv_active + sv_tested + sv_login, peak over 1m) ÷ the database's pool_size, per pool. Idle and "
            "used server connections are spare capacity.",
            [
                query(
                    f"clamp_max(max by (target, database, user) ({busy}) "
                    f"/ on (target, database) group_left () "
                    f"clamp_min(max by (target, database) ({POOL_SIZE}), 1), 1)",
                    pool,
                )
            ],
            unit="percentunit",
            threshold="pool_saturation",
            maximum=1,
        ),
        8,
    )
    grid.add(
        timeseries(
            "Server connections by state",
            "SHOW POOLS sv_active, sv_idle, sv_used, sv_tested and sv_login summed over the selected pools.",
            [
                query(
                    f"sum by (target) ({m(f'pgbouncer_pools_server_{state}_connections', POOL)})",
                    f"{{{{target}}}} {state}",
                )
                for state in ("active", "idle", "used", "testing", "login")
            ],
            stack=True,
        ),
        8,
    )
    grid.add(
        timeseries(
            "Server connections per pool vs pool_size",
            "All server connections of a pool (active + idle + used + tested + login) against its database's "
            "pool_size (dashed). Above pool_size the reserve pool is in use (PgBouncerReservePoolInUse).",
            [
                query(f"{by_pool} ({all_servers()})", pool),
                query(f"max by (target, database) ({POOL_SIZE})", "{{target}} {{database}} pool_size"),
            ],
            lines_matching=".*pool_size$",
        ),
        8,
    )
    grid.add(
        timeseries(
            "Client connections ÷ max_client_conn",
            "SHOW LISTS used_clients (peak over 1m) ÷ max_client_conn. At 100% PgBouncer refuses new "
            "clients.",
            [
                query(
                    f"max by (target) (max_over_time({m('pgbouncer_used_clients')}[1m])) / on (target) "
                    f"clamp_min(max by (target) ({m('pgbouncer_config_max_client_connections')}), 1)",
                    "{{target}}",
                )
            ],
            unit="percentunit",
            threshold="client_connections",
            maximum=1,
        ),
        8,
    )
    grid.add(
        timeseries(
            "Server connections ÷ max_db_connections / max_user_connections",
            "Per database: current_connections ÷ its max_connections; per user: server connections ÷ "
            "max_user_connections. Limits of 0 (unlimited) are left out.",
            [
                query(
                    f"max by (target, name) ({m('pgbouncer_databases_current_connections', DB_ROWS)}) "
                    f"/ on (target, name) "
                    f"(max by (target, name) ({m('pgbouncer_databases_max_connections', DB_ROWS)}) > 0)",
                    "{{target}} database {{name}}",
                ),
                query(
                    f"sum by (target, user) ({all_servers()}) / on (target) group_left () "
                    f"(max by (target) ({m('pgbouncer_config_max_user_connections')}) > 0)",
                    "{{target}} user {{user}}",
                ),
            ],
            unit="percentunit",
            threshold="server_connections",
        ),
        8,
    )
    grid.add(
        timeseries(
            "Clients by state (SHOW CLIENTS)",
            "Client connections by state, over the selected pools.",
            [query(f"sum by (target, state) ({m('pgbouncer_clients', POOL)})", "{{target}} {{state}}")],
            stack=True,
        ),
        8,
    )
    grid.add(
        timeseries(
            "Servers by state (SHOW SERVERS)",
            "Server connections by state, over the selected pools.",
            [query(f"sum by (target, state) ({m('pgbouncer_servers', POOL)})", "{{target}} {{state}}")],
            stack=True,
        ),
        8,
    )
    grid.add(
        timeseries(
            "Oldest server connection",
            "Age of each pool's oldest server connection: recycling (server_lifetime) keeps it within the "
            "1–4 h window.",
            [
                query(
                    f"max by (target, database, user) "
                    f"({m('pgbouncer_servers_oldest_connection_age_seconds', POOL)})",
                    pool,
                )
            ],
            unit="s",
            threshold="server_age",
        ),
        8,
    )
    grid.add(
        timeseries(
            "Paused or disabled databases",
            "Databases PAUSEd or DISABLEd in PgBouncer (PgBouncerDatabasePausedOrDisabled).",
            [
                query(f"sum by (target) ({m('pgbouncer_databases_paused', DB_ROWS)})", "{{target}} paused"),
                query(
                    f"sum by (target) ({m('pgbouncer_databases_disabled', DB_ROWS)})", "{{target}} disabled"
                ),
            ],
        ),
        8,
    )


def throughput(grid: Layout) -> None:
    grid.row("Throughput and latency (SHOW STATS)")
    per_db = "sum by (target, database)"
    legend = "{{target}} {{database}}"
    queries = rate("pgbouncer_stats_queries_pooled_total", STATS)
    xacts = rate("pgbouncer_stats_sql_transactions_pooled_total", STATS)
    wait = rate("pgbouncer_stats_client_wait_seconds_total", STATS)
    grid.add(
        timeseries(
            "Queries per second",
            "rate(pgbouncer_stats_queries_pooled_total) per database.",
            [query(f"{per_db} ({queries})", legend)],
            unit="reqps",
        ),
        8,
    )
    grid.add(
        timeseries(
            "Transactions per second",
            "rate(pgbouncer_stats_sql_transactions_pooled_total) per database.",
            [query(f"{per_db} ({xacts})", legend)],
            unit="reqps",
        ),
        8,
    )
    grid.add(
        timeseries(
            "Average query time",
            "rate(query time) ÷ rate(queries): from counters, so every query counts.",
            [
                query(
                    f"{per_db} ({rate('pgbouncer_stats_queries_duration_seconds_total', STATS)}) "
                    f"/ {per_db} ({queries} > 0)",
                    legend,
                )
            ],
            unit="s",
            threshold="query_latency",
        ),
        8,
    )
    grid.add(
        timeseries(
            "Average transaction time",
            "rate(time in transaction) ÷ rate(transactions): how long a server connection is held.",
            [
                query(
                    f"{per_db} ({rate('pgbouncer_stats_server_in_transaction_seconds_total', STATS)}) "
                    f"/ {per_db} ({xacts} > 0)",
                    legend,
                )
            ],
            unit="s",
        ),
        8,
    )
    grid.add(
        timeseries(
            "Average wait per transaction",
            "rate(client wait time) ÷ rate(transactions): time clients queue for a server connection.",
            [query(f"{per_db} ({wait}) / {per_db} ({xacts} > 0)", legend)],
            unit="s",
        ),
        8,
    )
    grid.add(
        timeseries(
            "Average waiting clients (from wait time)",
            "rate(client wait seconds): the mean number of clients waiting, from a counter, so queues "
            "shorter than a scrape interval count too.",
            [query(f"{per_db} ({wait})", legend)],
        ),
        8,
    )
    grid.add(
        timeseries(
            "Network traffic",
            "Bytes received from and sent to clients per second.",
            [
                query(
                    f"sum by (target) ({rate('pgbouncer_stats_received_bytes_total', STATS)})",
                    "{{target}} received",
                ),
                query(
                    f"sum by (target) ({rate('pgbouncer_stats_sent_bytes_total', STATS)})", "{{target}} sent"
                ),
            ],
            unit="Bps",
        ),
        8,
    )


def postgres(grid: Layout) -> None:
    grid.row("PostgreSQL connections")
    sessions = rate("pg_stat_database_sessions_total", PG_DB)
    commits = rate("pg_stat_database_xact_commit_total", PG_DB)
    xacts = f"{commits} + {rate('pg_stat_database_xact_rollback_total', PG_DB)}"
    grid.add(
        timeseries(
            "Connections by state vs max_connections",
            "Client backends by state (pg_stat_activity), against max_connections and the usable slots "
            "(max_connections − superuser_reserved − reserved), dashed.",
            [
                query(
                    f"sum by (target, state) ({m('pg_stat_activity_count', PG_DB)})", "{{target}} {{state}}"
                ),
                query(f"max by (target) ({m('pg_settings_max_connections')})", "{{target}} max_connections"),
                query(f"max by (target) ({usable_slots()})", "{{target}} usable slots"),
            ],
            stack=True,
            lines_matching=".*(max_connections|usable slots)$",
        ),
        8,
    )
    grid.add(
        timeseries(
            "Connections by application",
            "Client backends per application_name (poolwatch's own included).",
            [
                query(
                    f"sum by (target, application_name) ({m('pg_stat_activity_connections', PG_USER)})",
                    "{{target}} {{application_name}}",
                )
            ],
            stack=True,
        ),
        8,
    )
    grid.add(
        timeseries(
            "Connection slots used",
            "pg_connections_used (peak over 1m) ÷ usable slots. At 100% ordinary roles cannot log in.",
            [
                query(
                    f"max by (target) (max_over_time({m('pg_connections_used')}[1m])) / on (target) "
                    f"clamp_min(max by (target) ({usable_slots()}), 1)",
                    "{{target}}",
                )
            ],
            unit="percentunit",
            threshold="pg_connections",
            maximum=1,
        ),
        8,
    )
    grid.add(
        timeseries(
            "Available connection slots",
            "pg_connections_available: further logins an ordinary role can make.",
            [query(f"min by (target) ({m('pg_connections_available')})", "{{target}}")],
            minimum=None,
        ),
        8,
    )
    grid.add(
        timeseries(
            "Connection churn: sessions vs transactions",
            "New sessions per second and transactions per second (pg_stat_database, PostgreSQL 14+).",
            [
                query(f"sum by (target) ({sessions})", "{{target}} sessions/s"),
                query(f"sum by (target) ({xacts})", "{{target}} transactions/s"),
            ],
            unit="reqps",
        ),
        8,
    )
    grid.add(
        timeseries(
            "New sessions per transaction",
            "Sessions ÷ transactions. Pooled clients stay near 0; a connection per request is near 1.",
            [query(f"sum by (target) ({sessions}) / sum by (target) ({xacts} > 0)", "{{target}}")],
            threshold="churn",
        ),
        8,
    )
    abnormal = {
        end: rate(f"pg_stat_database_sessions_{end}_total", PG_DB) for end in ("abandoned", "fatal", "killed")
    }
    grid.add(
        timeseries(
            "Sessions ending abnormally",
            "Sessions per minute that ended abandoned, by a FATAL error or killed (PostgreSQL 14+); the "
            "alert adds the three up.",
            [
                query(f"sum by (target) ({abnormal[end]}) * 60", f"{{{{target}}}} {end}")
                for end in ("abandoned", "fatal", "killed")
            ]
            + [query(f"sum by (target) ({' + '.join(abnormal.values())}) * 60", "{{target}} total")],
            threshold="abnormal_sessions",
        ),
        8,
    )
    waits = "pg_stat_activity_wait_event_type_count"
    grid.add(
        timeseries(
            "Backends waiting on locks",
            "Client backends whose wait_event_type is Lock.",
            [
                query(
                    f"sum by (target) ({m(waits, PG_DB + LOCK_WAIT)})",
                    "{{target}}",
                )
            ],
            threshold="lock_waits",
        ),
        8,
    )
    grid.add(
        timeseries(
            "Backends by wait event type",
            "Client backends per wait_event_type (those not waiting left out).",
            [
                query(
                    f"sum by (target, wait_event_type) ({m(waits, PG_DB + WAITING)})",
                    "{{target}} {{wait_event_type}}",
                )
            ],
            stack=True,
        ),
        8,
    )


def transactions(grid: Layout) -> None:
    grid.row("Transaction and connection ages")
    legend = "{{target}} {{datname}} {{application_name}}"
    by_app = "max by (target, datname, application_name)"
    grid.add(
        timeseries(
            "Oldest running transaction",
            "pg_stat_activity_max_tx_duration of sessions not idle in transaction.",
            [
                query(
                    f"{by_app} ({m('pg_stat_activity_max_tx_duration', PG_USER + NOT_IDLE_IN_TX)})",
                    legend,
                )
            ],
            unit="s",
            threshold="long_transaction",
        ),
        8,
    )
    grid.add(
        timeseries(
            "Longest idle in transaction",
            "Time the longest idle-in-transaction session has been idle (aborted ones included).",
            [
                query(
                    f"{by_app} ({m('pg_stat_activity_max_state_duration_seconds', PG_USER + IDLE_IN_TX)})",
                    legend,
                )
            ],
            unit="s",
            threshold="idle_in_transaction",
        ),
        8,
    )
    grid.add(
        timeseries(
            "Oldest connection by application",
            "Age of the oldest client connection per application_name (poolwatch's own aside).",
            [
                query(
                    f"max by (target, application_name) "
                    f"({m('pg_stat_activity_oldest_backend_age_seconds', PG_USER + NOT_POOLWATCH)})",
                    "{{target}} {{application_name}}",
                )
            ],
            unit="s",
            threshold="backend_age",
        ),
        8,
    )
    grid.add(
        stat(
            "Timeouts",
            "Server defaults of statement_timeout and idle_in_transaction_session_timeout (0 = off), and "
            "PgBouncer's query_wait_timeout.",
            [
                query(
                    f"max by (target) ({m('pg_settings_statement_timeout_seconds')})",
                    "{{target}} statement_timeout",
                ),
                query(
                    f"max by (target) ({m('pg_settings_idle_in_transaction_session_timeout_seconds')})",
                    "{{target}} idle_in_transaction_session_timeout",
                ),
                query(
                    f"max by (target) ({m('pgbouncer_config_query_wait_timeout_seconds')})",
                    "{{target}} query_wait_timeout",
                ),
            ],
            unit="s",
        ),
        24,
        4,
    )


def probes(grid: Layout) -> None:
    grid.row("SELECT 1 probes")
    probe = T + ', database=~"$database"'
    legend = "{{target}} {{kind}} {{database}}"
    grid.add(
        state_timeline(
            "SELECT 1 result",
            "Each SELECT 1 check: through PgBouncer (kind pgbouncer) and direct (kind postgres).",
            [query(f"min by (target, kind, database) ({m('poolwatch_probe_success', probe)})", legend)],
            PROBE_MAPPINGS,
        ),
        12,
    )
    grid.add(
        timeseries(
            "SELECT 1 latency (p50, p90, p99)",
            "From the poolwatch_probe_duration_seconds histogram, connect and pool wait included.",
            [
                query(
                    f"histogram_quantile({q}, sum by (target, kind, le) "
                    f"({rate('poolwatch_probe_duration_seconds_bucket', probe)}))",
                    f"{{{{target}}}} {{{{kind}}}} p{round(q * 100)}",
                )
                for q in (0.5, 0.9, 0.99)
            ],
            unit="s",
            threshold="probe_latency",
        ),
        12,
    )
    grid.add(
        timeseries(
            "Last SELECT 1 duration",
            "Duration of the most recent check per database.",
            [
                query(
                    f"max by (target, kind, database) ({m('poolwatch_probe_last_duration_seconds', probe)})",
                    legend,
                )
            ],
            unit="s",
        ),
        8,
    )
    grid.add(
        timeseries(
            "SELECT 1 failures by reason",
            "Failed checks per second, by reason.",
            [
                query(
                    f"sum by (target, kind, reason) ({rate('poolwatch_probe_failures_total', probe)})",
                    "{{target}} {{kind}} {{reason}}",
                )
            ],
        ),
        8,
    )
    grid.add(
        timeseries(
            "Time since the last successful SELECT 1",
            "Grows while checks fail.",
            [
                query(
                    f"time() - max by (target, kind, database) "
                    f"({m('poolwatch_probe_last_success_timestamp_seconds', probe)})",
                    legend,
                )
            ],
            unit="s",
        ),
        8,
    )


def _query_variable(name: str, label: str, definition: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": definition,
        "query": {"qryType": 1, "query": definition, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "refresh": 2,
        "regex": "",
        "sort": 1,
        "hide": 0,
        "skipUrlSync": False,
    }


def variables() -> list[dict[str, Any]]:
    return [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {"selected": False, "text": "Prometheus", "value": DEFAULT_DATASOURCE_UID},
            "options": [],
            "refresh": 1,
            "regex": "",
            "hide": 0,
            "includeAll": False,
            "multi": False,
            "skipUrlSync": False,
        },
        _query_variable("instance", "poolwatch", "label_values(poolwatch_build_info, instance)"),
        _query_variable(
            "target", "Target", 'label_values(poolwatch_target_up{instance=~"$instance"}, target)'
        ),
        _query_variable(
            "database",
            "Database",
            "label_values(pgbouncer_pools_client_active_connections"
            '{instance=~"$instance", target=~"$target"}, database)',
        ),
        _query_variable(
            "user",
            "User",
            "label_values(pgbouncer_pools_client_active_connections"
            '{instance=~"$instance", target=~"$target", database=~"$database"}, user)',
        ),
    ]


def build() -> dict[str, Any]:
    PANEL_THRESHOLDS.clear()
    grid = Layout()
    for section in (overview, pools, throughput, postgres, transactions, probes):
        section(grid)
    return {
        "__comment": "GENERATED by grafana/dashboard.py: edit that file and run it, not this one.",
        "uid": UID,
        "title": TITLE,
        "description": "PgBouncer pools, PostgreSQL connections and SELECT 1 probes as poolwatch exports "
        "them; threshold lines are the alert thresholds of deploy/prometheus/alerts.yml.",
        "tags": ["poolwatch", "pgbouncer", "postgresql"],
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-3h", "to": "now"},
        "refresh": "30s",
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "links": [],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {"list": variables()},
        "panels": grid.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is stale")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.output.exists() or args.output.read_text() != text:
            print(f"{args.output} is stale: run python grafana/dashboard.py", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
