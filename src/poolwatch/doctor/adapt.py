"""Source observations → doctor facts. The only place that knows both vocabularies."""

from __future__ import annotations

from typing import Any

from poolwatch.doctor.facts import ActivityRow, PgBouncerFacts, PostgresFacts, ProbeFacts
from poolwatch.metrics import SourceResult
from poolwatch.probes import ProbeState
from poolwatch.sources.pgbouncer import PgBouncerObservation
from poolwatch.sources.postgres import PostgresObservation


def _epoch(value: Any) -> float:
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    return float(value)


def postgres_facts(result: SourceResult) -> PostgresFacts:
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
        client_backends=obs.total_client_backends,
        activity_readable=obs.activity is not None and obs.can_read_all_stats is not False,
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
    for backend in getattr(obs, "backends", None) or []:
        facts.backends.append(
            (backend.client_addr or "local", backend.client_port or -1, backend.application_name or "")
        )
    if obs.databases is not None and obs.session_counters_supported:
        facts.sessions = float(sum(d.sessions or 0 for d in obs.databases))
        facts.sessions_abandoned = float(sum(d.sessions_abandoned or 0 for d in obs.databases))
    if obs.databases is not None:
        facts.xacts = float(sum(d.xact_commit + d.xact_rollback for d in obs.databases))
    return facts


def pgbouncer_facts(result: SourceResult, host: str, port: int) -> PgBouncerFacts:
    obs = result.observation
    if not isinstance(obs, PgBouncerObservation):
        return PgBouncerFacts(
            result.target, up=False, collected_at=0.0, host=host, port=port, down_detail=result.detail
        )
    totals: dict[str, float] = {}
    for row in obs.stats or []:
        if row.get("database") == "pgbouncer":
            continue
        for key, value in row.items():
            if key.startswith("total_") and isinstance(value, int | float):
                name = key.removeprefix("total_")
                totals[name] = totals.get(name, 0.0) + float(value)
    return PgBouncerFacts(
        target=result.target,
        up=result.up,
        collected_at=_epoch(obs.collected_at),
        host=host,
        port=port,
        down_detail=result.detail,
        version=obs.version_tuple,
        config={k: str(v) for k, v in (obs.config or {}).items()},
        config_readable=bool(obs.config),
        databases=list(obs.databases or []),
        pools=list(obs.pools or []),
        totals=totals,
        server_endpoints=set(getattr(obs, "server_endpoints", None) or ()),
    )


def probe_facts(state: ProbeState) -> ProbeFacts:
    return ProbeFacts(
        state.target, state.kind, state.database, state.success, state.detail, state.last_duration
    )
