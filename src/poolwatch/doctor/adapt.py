"""Source observations → doctor facts. The only place that knows both vocabularies."""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence
from itertools import repeat
from typing import Any

from poolwatch.doctor.facts import ActivityRow, PgBouncerFacts, PostgresFacts, ProbeFacts, columns
from poolwatch.metrics import SourceResult
from poolwatch.probes import ProbeState
from poolwatch.sources.pgbouncer import PgBouncerObservation


def _epoch(value: Any) -> float:
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    return float(value)


def postgres_facts(result: SourceResult) -> PostgresFacts:
    from poolwatch.sources.postgres import PostgresObservation  # only with PostgreSQL targets

    obs = result.observation
    if not isinstance(obs, PostgresObservation):
        return PostgresFacts(result.target, up=False, collected_at=0.0, down_detail=result.detail)
    facts = PostgresFacts(
        target=result.target,
        up=result.up,
        collected_at=_epoch(obs.collected_at),
        down_detail=result.detail,
        version_num=obs.server_version_num,
        max_connections=obs.max_connections,
        superuser_reserved=obs.superuser_reserved_connections or 0,
        reserved=obs.reserved_connections or 0,
        statement_timeout=obs.statement_timeout_seconds,
        idle_in_transaction_timeout=obs.idle_in_transaction_session_timeout_seconds,
        role_settings_readable=obs.setting_overrides is not None,
        client_backends=obs.total_client_backends,
        # the source leaves activity None when the role cannot see other roles' sessions
        activity_readable=obs.activity is not None and obs.can_read_all_stats is not False,
        backends_readable=obs.clients is not None and obs.can_read_all_stats is not False,
        role=obs.role,
    )
    for override in obs.setting_overrides or []:
        if override.value_seconds is not None:
            facts.role_settings.append(
                (override.database or "", override.role or "", override.setting, override.value_seconds)
            )
    for group in obs.activity or []:
        facts.activity.append(
            ActivityRow(
                datname=group.datname or "",
                usename=group.usename or "",
                application_name=group.application_name or "",
                state=group.state or "",
                count=group.connections,
                oldest_xact_age=group.oldest_xact_age_seconds,
                max_state_age=group.max_state_age_seconds,
                oldest_backend_age=group.oldest_backend_age_seconds,
            )
        )
    # pg_stat_activity grouped by (client_addr, application_name) with the client ports: one backend
    # per port; backends without a port (Unix socket) are "local"
    backends = facts.backends
    for client in obs.clients or []:
        addr = client.client_addr or "local"
        app = client.application_name or ""
        ports: Sequence[Any] = client.client_ports
        if not set(map(type, ports)) <= {int}:  # as the driver hands them over they already are
            ports = [int(p) for p in ports if p is not None]
        backends.extend(zip(repeat(addr), ports, repeat(app)))
        backends.extend(repeat(("local", -1, app), max(0, client.connections - len(ports))))
    if obs.databases is not None and obs.session_counters_supported:
        facts.sessions = float(sum(d.sessions or 0 for d in obs.databases))
        facts.sessions_abandoned = float(sum(d.sessions_abandoned or 0 for d in obs.databases))
    if obs.databases is not None:
        facts.xacts = float(sum(d.xact_commit + d.xact_rollback for d in obs.databases))
    return facts


def _stats_totals(stats: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """SHOW STATS ``total_*`` columns summed over the databases, the admin console's own left out.

    Column by column: every numeric value added as a float in row order (the same sums as adding
    row by row); a column with no number in it is left out.
    """
    if not stats:
        return {}
    names = getattr(stats, "columns", None)
    if names is None:
        names = list(dict.fromkeys(key for row in stats for key in row))
    names = [n for n in names if n.startswith("total_")]
    if not names:
        return {}
    database, *values = columns(stats, "database", *names)
    admin = _positions(database, "pgbouncer")
    totals: dict[str, float] = {}
    for name, column in zip(names, values, strict=True):
        total = _integer_total(column, admin)
        if total is None:
            total = _float_total(column, admin)
        if total is not None:
            totals[name.removeprefix("total_")] = total
    return totals


def _positions(values: Sequence[Any], wanted: str) -> list[int]:
    """Where ``wanted`` is in ``values`` (searched in C: usually once, near the end)."""
    found: list[int] = []
    for _ in range(values.count(wanted)):
        found.append(values.index(wanted, found[-1] + 1 if found else 0))
    return found


#: below this every partial sum of non-negative integers is exact as a float
_EXACT_FLOAT_INTEGERS = 2**53


def _integer_total(column: Sequence[Any], skip: list[int]) -> float | None:
    """The float sum of an all-integer column without the rows at ``skip``, in two C-level passes;
    None when that would not be exactly what adding the floats one by one gives.

    SHOW STATS totals are non-negative integers (counts, bytes, microseconds). Then every partial
    sum is an integer no larger than the whole, and below 2**53 each float addition is exact: the
    sum added as floats in row order equals the integer sum, converted once.
    """
    if len(column) <= len(skip):
        return None
    try:
        # one C pass that refuses anything but integers from 0 to 2**64 - 1 (NULL, text, floats,
        # negative numbers); then the exact sum, in a second one
        array("Q", column)
        exact = sum(column)
    except (TypeError, OverflowError):
        return None
    if type(exact) is not int:  # integer-like types that are not int: the general path
        return None
    kept = exact - sum(column[i] for i in skip)
    return float(kept) if kept < _EXACT_FLOAT_INTEGERS else None


_PLAIN_NUMBERS = {int, float}


def _float_total(column: Sequence[Any], skip: list[int]) -> float | None:
    if skip:
        dropped = set(skip)
        column = [v for i, v in enumerate(column) if i not in dropped]
    if not set(map(type, column)) <= _PLAIN_NUMBERS:
        column = [v for v in column if isinstance(v, int | float)]
    return sum(map(float, column), 0.0) if column else None


def pgbouncer_facts(result: SourceResult, host: str, port: int) -> PgBouncerFacts:
    obs = result.observation
    if not isinstance(obs, PgBouncerObservation):
        return PgBouncerFacts(
            result.target, up=False, collected_at=0.0, host=host, port=port, down_detail=result.detail
        )
    totals = _stats_totals(obs.stats or [])
    # SHOW CONFIG as printed: the source's ``config`` turns 1.25's "<empty>" (an empty query is the
    # server check) into "" (the check is disabled); the doctor must tell them apart
    config = obs.config_raw or obs.config
    peers = obs.lists.get("peers") if "lists" in obs.collected else None
    return PgBouncerFacts(
        target=result.target,
        up=result.up,
        collected_at=_epoch(obs.collected_at),
        host=host,
        port=port,
        down_detail=result.detail,
        version=obs.version_tuple,
        config={k: str(v) for k, v in config.items()},
        config_readable="config" in obs.collected or bool(config),
        # the source's rows as they are (a Table is read column by column, never copied)
        databases=obs.databases or [],
        pools=obs.pools or [],
        totals=totals,
        server_endpoints=obs.server_endpoints,
        servers_readable="servers" in obs.collected,
        peers=int(peers) if peers is not None else None,
    )


def probe_facts(state: ProbeState) -> ProbeFacts:
    return ProbeFacts(
        state.target, state.kind, state.database, state.success, state.detail, state.last_duration
    )
