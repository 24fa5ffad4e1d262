"""``SELECT 1`` checks through each PgBouncer database and directly against each PostgreSQL.

A check through PgBouncer opens a fresh client connection each time: that is the path an
application's new connection takes (login, pool assignment, query), a saturated pool shows up as
latency or a timeout instead of being hidden behind an already-assigned server, and no idle
client is left behind to hold a PgBouncer 1.23+ shutdown open. The direct PostgreSQL check runs on
the source's own small pool so poolwatch never holds more connections than configured.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from prometheus_client.metrics_core import Metric

from poolwatch.errors import classify
from poolwatch.metrics import ErrorReason, counter, gauge

#: Buckets from a healthy local round trip (sub-millisecond) up to a client stuck in a queue.
BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Check = Callable[[float], Awaitable[None]]


@dataclass
class ProbeState:
    """Outcome history of one check: what the metrics and /readyz report."""

    target: str
    kind: str  # "pgbouncer" (through a pool) or "postgres" (direct)
    database: str
    success: bool | None = None
    last_success: float | None = None
    last_duration: float | None = None
    reason: ErrorReason | None = None
    detail: str | None = None
    bucket_counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total_count: int = 0
    total_sum: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)

    def record(self, seconds: float, reason: ErrorReason | None, detail: str | None) -> None:
        self.last_duration = seconds
        self.total_count += 1
        self.total_sum += seconds
        for index, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.bucket_counts[index] += 1
                break
        else:
            self.bucket_counts[-1] += 1
        self.success = reason is None
        self.reason, self.detail = reason, detail
        if reason is None:
            self.last_success = time.time()
        else:
            self.failures[reason] = self.failures.get(reason, 0) + 1


async def run_check(state: ProbeState, check: Check, timeout: float) -> None:
    """Run one check within ``timeout`` and record it; a timeout counts its full duration."""
    started = time.perf_counter()
    reason: ErrorReason | None = None
    detail: str | None = None
    try:
        async with asyncio.timeout(timeout):
            await check(timeout)
    except TimeoutError:
        reason, detail = "timeout", f"SELECT 1 did not complete within {timeout:g}s"
    except Exception as exc:
        reason, detail = classify(exc)
    state.record(time.perf_counter() - started, reason, detail)


def pgbouncer_check(params: Mapping[str, str], database: str, password: str | None) -> Check:
    """A check that logs in through PgBouncer to ``database`` and runs ``SELECT 1``."""
    conninfo = psycopg.conninfo.make_conninfo("", **{**params, "dbname": database})

    async def check(timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        conn = await psycopg.AsyncConnection.connect(
            conninfo,
            password=password,
            autocommit=True,
            prepare_threshold=None,
            application_name="poolwatch-probe",
            connect_timeout=max(1, round(timeout)),
        )
        # Cancelled mid-query (a paused or saturated pool, PostgreSQL down behind PgBouncer),
        # psycopg sends a CancelRequest and waits up to 10 s for it: the probe would outlive its
        # timeout many times over. Shutting the socket down just before the deadline ends the
        # pending read at once instead, and the check reports a timeout.
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            _shutdown_socket(conn)

        handle = loop.call_at(deadline - min(0.1, timeout / 10), expire)
        try:
            await conn.execute("SELECT 1", prepare=False)
        except psycopg.Error:
            if expired:
                raise TimeoutError from None
            raise
        finally:
            handle.cancel()
            await conn.close()

    return check


def _shutdown_socket(conn: psycopg.AsyncConnection[Any]) -> None:
    """Make a pending read on ``conn`` fail now; the descriptor stays psycopg's to close."""
    if conn.closed:
        return
    try:
        with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, psycopg.Error):
        pass


def probe_families(states: list[ProbeState]) -> list[Metric]:
    labels = ("target", "kind", "database")
    success = gauge("poolwatch_probe_success", "1 if the last SELECT 1 check succeeded, else 0", labels)
    last_ok = gauge(
        "poolwatch_probe_last_success_timestamp_seconds",
        "Unix time of the last successful SELECT 1 check",
        labels,
    )
    last_duration = gauge(
        "poolwatch_probe_last_duration_seconds",
        "Duration of the last SELECT 1 check, connect included",
        labels,
    )
    failures = counter(
        "poolwatch_probe_failures_total", "SELECT 1 checks that failed, by reason", (*labels, "reason")
    )
    histogram = Metric(
        "poolwatch_probe_duration_seconds",
        "Duration of SELECT 1 checks, connect and pool wait included",
        "histogram",
    )
    for state in states:
        key = (state.target, state.kind, state.database)
        if state.success is not None:
            success.add(key, 1.0 if state.success else 0.0)
            last_duration.add(key, state.last_duration)
        if state.last_success is not None:
            last_ok.add(key, state.last_success)
        for reason, count in state.failures.items():
            failures.add((*key, reason), count)
        if state.total_count:
            base = dict(zip(labels, key, strict=True))
            cumulative = 0
            for bound, count in zip((*BUCKETS, float("inf")), state.bucket_counts, strict=True):
                cumulative += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                histogram.add_sample(f"{histogram.name}_bucket", {**base, "le": le}, cumulative)
            histogram.add_sample(f"{histogram.name}_count", base, state.total_count)
            histogram.add_sample(f"{histogram.name}_sum", base, state.total_sum)
    out = [b.build() for b in (success, last_ok, last_duration, failures) if len(b)]
    if histogram.samples:
        out.append(histogram)
    return out
