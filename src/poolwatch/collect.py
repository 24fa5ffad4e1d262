"""The scheduler: collections per target with deadlines, probes on their own clock, one snapshot.

Every target is collected concurrently and bounded by the collection timeout, so a hung or dead
target costs the others nothing. Concurrent scrapes share one in-flight collection, and a scrape
that arrives within ``collection.max_age`` of the last one is served the rendered bytes of that
snapshot: the PgBouncer console sees one round of SHOW commands however many scrapers there are.
"""

from __future__ import annotations

import asyncio
import contextlib
import platform
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from prometheus_client.metrics_core import Metric

from poolwatch import __version__
from poolwatch.config import Config, PgBouncerTarget, PostgresTarget
from poolwatch.doctor.runner import DoctorRunner
from poolwatch.logs import get_logger
from poolwatch.metrics import (
    ERROR_REASONS,
    Exposition,
    Fragment,
    SourceResult,
    counter,
    exposition,
    family_size,
    gauge,
    gzip_chunks,
    gzip_fragments,
    packed_exposition,
    unpack,
    unpacked_pieces,
    unpacked_series,
    unrendered_series,
)
from poolwatch.probes import ProbeState, pgbouncer_check, probe_families, run_check
from poolwatch.sources.pgbouncer import PgBouncerObservation, PgBouncerSource, PoolFilter

if TYPE_CHECKING:  # imported when a PostgreSQL target exists: asyncpg costs ~6 MB of memory
    from poolwatch.sources.postgres import PostgresSource

log = get_logger("poolwatch.collect")

#: Hook run after every collection (the pool doctor subscribes here); gets the snapshot.
AfterCollect = Callable[["Snapshot"], Awaitable[None] | None]


class Source(Protocol):
    target: str

    async def collect(self, timeout: float) -> SourceResult: ...

    async def close(self) -> None: ...


@dataclass
class TargetRuntime:
    """A configured target with its source and the book-keeping its self-metrics need."""

    name: str
    kind: str  # "pgbouncer" | "postgres"
    source: Source
    last: SourceResult | None = None
    errors: dict[str, int] = field(default_factory=dict)
    collections: int = 0


#: Above this many series a snapshot is rendered in a worker thread, so the event loop (other
#: scrapes, /healthz, the listener watcher) keeps getting turns; below it the hop costs more.
RENDER_IN_THREAD_SERIES = 20_000
#: Rendered families under SMALL_CHUNK bytes are grouped into pieces of about WRITE_BLOCK bytes
#: (larger ones are written as they are): measured on loopback, writes of 64 KiB to 1 MiB serve
#: a body equally fast, while a write per small family or a copy of the body costs more.
SMALL_CHUNK = 64 << 10
WRITE_BLOCK = 256 << 10
#: A packed snapshot's text is decompressed for a text scrape this many bytes at a time (ISA-L:
#: about 0.3 ms), so a text scrape holds about two pieces however large a family is.
TEXT_PIECE = 512 << 10

_T = TypeVar("_T")


@dataclass
class Snapshot:
    """One complete collection: families from every target plus poolwatch's own metrics.

    The scrape body is rendered once per snapshot and format (``metrics.exposition``; sources
    pre-render their large families while their next query is in flight) and served as the same
    chunks to every scrape until the next collection. A ``packed`` snapshot (more series than
    ``collection.cached_body_max_series``) never holds its text: its families keep their sample
    lines compressed (``metrics.packed_exposition``, about 1/30 of the text), a gzip scrape gets
    them assembled into one gzip member, and a text scrape decompresses them piece by piece as
    the socket takes them (``pieces``).
    """

    families: list[Metric]
    results: dict[str, SourceResult]
    taken_at: float
    monotonic: float
    packed: bool = False
    _rendered: dict[str, Exposition] = field(default_factory=dict)
    _fragments: dict[str, list[Fragment]] = field(default_factory=dict)
    _gzipped: dict[str, bytes] = field(default_factory=dict)
    _pending: dict[str, asyncio.Future[Any]] = field(default_factory=dict)

    def body(self, openmetrics: bool = False) -> Exposition:
        """The scrape body as chunks, rendered once per format and snapshot (a packed one's:
        decompressed whole at every call, never kept)."""
        if self.packed:
            text = Exposition(series=self.series())
            for fragment in self.fragments(openmetrics):
                text.append(unpack(fragment))
            return text
        key = _format_key(openmetrics)
        cached = self._rendered.get(key)
        if cached is None:
            cached = exposition(self.families, openmetrics=openmetrics)
            # the body holds the families' pre-rendered bytes themselves (no copy; a family reused
            # by the next collection keeps them); tiny families are grouped so a scrape is one
            # write per ~100 KiB or more, never a copy of the body
            cached.coalesce(SMALL_CHUNK, WRITE_BLOCK)
            self._rendered[key] = cached
        return cached

    def render(self, openmetrics: bool = False) -> bytes:
        """The scrape body as one ``bytes`` (tests, small bodies)."""
        return self.body(openmetrics).join()

    async def body_async(self, openmetrics: bool = False) -> Exposition:
        """``body``, in a worker thread when much is left to render; concurrent callers share one
        rendering."""
        key = _format_key(openmetrics)
        cached = self._rendered.get(key)
        if cached is not None:
            return cached
        in_thread = unrendered_series(self.families, openmetrics=openmetrics) > RENDER_IN_THREAD_SERIES
        return await self._shared(key, lambda: self.body(openmetrics), in_thread=in_thread)

    def fragments(self, openmetrics: bool = False) -> list[Fragment]:
        """A packed snapshot's body as compressed fragments, made once per format and snapshot
        (families unchanged since the last collection bring theirs along)."""
        key = _format_key(openmetrics)
        cached = self._fragments.get(key)
        if cached is None:
            cached = self._fragments[key] = packed_exposition(self.families, openmetrics=openmetrics)
        return cached

    async def fragments_async(self, openmetrics: bool = False) -> list[Fragment]:
        """``fragments``, in a worker thread when much is left to render and compress."""
        key = _format_key(openmetrics)
        cached = self._fragments.get(key)
        if cached is not None:
            return cached
        in_thread = unpacked_series(self.families) > RENDER_IN_THREAD_SERIES
        return await self._shared(f"packed-{key}", lambda: self.fragments(openmetrics), in_thread=in_thread)

    async def gzip_async(self, openmetrics: bool = False) -> bytes:
        """The body gzip-compressed (what Prometheus asks for), made once per snapshot and format
        and then served as these bytes to every gzip scrape: a kept text body is compressed in a
        worker thread; a packed snapshot's fragments are only put together."""
        key = _format_key(openmetrics)
        cached = self._gzipped.get(key)
        if cached is not None:
            return cached
        make: Callable[[], bytes]
        if self.packed:
            fragments = await self.fragments_async(openmetrics)
            make, in_thread = partial(gzip_fragments, fragments), False  # a join: ~1 ms per MB
        else:
            body = await self.body_async(openmetrics)
            make, in_thread = partial(gzip_chunks, body.chunks), True

        def compress() -> bytes:
            packed = self._gzipped[key] = make()
            return packed

        return await self._shared(f"gzip-{key}", compress, in_thread=in_thread)

    async def _shared(self, key: str, make: Callable[[], _T], *, in_thread: bool) -> _T:
        """``make()``'s result; concurrent callers with the same ``key`` share one call."""
        pending = self._pending.get(key)
        if pending is None:
            if in_thread:
                pending = asyncio.ensure_future(asyncio.to_thread(make))
            else:
                pending = asyncio.get_running_loop().create_future()
                try:
                    pending.set_result(make())
                except Exception as exc:
                    pending.set_exception(exc)
            self._pending[key] = pending
            pending.add_done_callback(lambda _: self._pending.pop(key, None))
        # shield: a scraper that goes away must not cancel the work others wait for
        return cast(_T, await asyncio.shield(pending))

    async def render_async(self, openmetrics: bool = False) -> bytes:
        return (await self.body_async(openmetrics)).join()

    async def pieces(self, openmetrics: bool = False) -> AsyncIterator[bytes]:
        """A packed snapshot's text in pieces of ``TEXT_PIECE`` bytes, each decompressed in a
        worker thread when the previous one is being written."""
        texts = unpacked_pieces(await self.fragments_async(openmetrics), TEXT_PIECE)
        while (piece := await asyncio.to_thread(next, texts, None)) is not None:
            yield piece

    def series(self) -> int:
        return sum(family_size(f) for f in self.families)

    def release_rendering(self) -> None:
        """Drop the rendered bodies (a new collection is coming); ``body`` makes them again.

        Pre-rendered family bytes stay with their families: the next collection reuses the
        families it would make again the same way, and drops the others' bytes as it replaces
        them (``metrics.BuildCache``), so two bodies are never held at once."""
        self._rendered.clear()
        self._gzipped.clear()
        self._fragments.clear()


def _format_key(openmetrics: bool) -> str:
    """The key of a snapshot's rendered or compressed body in one format."""
    return "om" if openmetrics else "text"


class Engine:
    """Owns the sources of one configuration; replaced whole on a config reload."""

    def __init__(self, config: Config, *, after_collect: Sequence[AfterCollect] = ()) -> None:
        self.config = config
        self.targets: list[TargetRuntime] = []
        self.probes: dict[tuple[str, str, str], ProbeState] = {}
        self._after_collect = list(after_collect)
        self._snapshot: Snapshot | None = None
        #: the format the last scrape asked for: each new snapshot is rendered in it before it is
        #: published, so the scrapes waiting for it (and the next ones) are served at once
        self.prefer_openmetrics = False
        #: whether the last scrape took gzip: each new snapshot is then compressed before it is
        #: published, as it is rendered in the preferred format
        self.prefer_gzip = False
        self._inflight: asyncio.Task[Snapshot] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started = time.time()
        self.collections_started = 0
        self.doctor: DoctorRunner | None = DoctorRunner(config) if config.doctor.enabled else None
        for pgb in config.pgbouncers:
            self.targets.append(TargetRuntime(pgb.name, "pgbouncer", _pgbouncer_source(pgb)))
        for pg in config.postgres:
            self.targets.append(TargetRuntime(pg.name, "postgres", _postgres_source(pg)))

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._collect_loop(), name="collect-loop"))
        self._tasks.append(asyncio.create_task(self._probe_loop(), name="probe-loop"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._inflight is not None:
            self._inflight.cancel()
        pending: list[asyncio.Task[Any]] = [*self._tasks, *([self._inflight] if self._inflight else [])]
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await asyncio.gather(*(t.source.close() for t in self.targets), return_exceptions=True)

    # -- collection ------------------------------------------------------------------------------
    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    async def current(self, max_age: float | None = None) -> Snapshot:
        """A snapshot no older than ``max_age`` (default: the configured one), sharing in-flight work."""
        max_age = self.config.collection.max_age if max_age is None else max_age
        snap = self._snapshot
        if snap is not None and time.monotonic() - snap.monotonic <= max_age:
            return snap
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.create_task(self._collect_once(), name="collection")
        # shield: a scraper that goes away must not cancel the collection other scrapers await
        return await asyncio.shield(self._inflight)

    async def _collect_once(self) -> Snapshot:
        self.collections_started += 1
        if self._snapshot is not None:
            # its body is only needed again if this collection times out (stale fallback): no
            # reason to hold two large bodies at once
            self._snapshot.release_rendering()
        timeout = self.config.collection.timeout
        cache_limit = self.config.collection.cached_body_max_series
        for runtime in self.targets:
            if isinstance(runtime.source, PgBouncerSource):
                runtime.source.render_openmetrics = self.prefer_openmetrics
                runtime.source.prerender_series_max = cache_limit
        results = await asyncio.gather(*(self._collect_target(t, timeout) for t in self.targets))
        snap = Snapshot(
            families=[],
            results={r.target + "/" + r.kind: r for r in results},
            taken_at=time.time(),
            monotonic=time.monotonic(),
        )
        for result in results:
            snap.families.extend(result.families)
        snap.families.extend(probe_families(list(self.probes.values())))
        if self.doctor is not None:
            try:
                self.doctor.observe(results, self.probes.values())
                snap.families.extend(self.doctor.families())
            except Exception:  # the doctor must never cost the metrics
                log.exception("pool doctor failed")
        snap.families.extend(self._self_families())
        snap.packed = cache_limit > 0 and snap.series() > cache_limit
        try:
            if snap.packed:  # families pre-rendered as text before the total was known: compressed now
                await snap.fragments_async(self.prefer_openmetrics)
            else:
                await snap.body_async(self.prefer_openmetrics)
            if self.prefer_gzip:
                await snap.gzip_async(self.prefer_openmetrics)
        except Exception:  # rendered again (and the error seen) by the scrape
            log.exception("rendering the snapshot failed")
        self._snapshot = snap
        for hook in self._after_collect:
            try:
                maybe = hook(snap)
                if maybe is not None:
                    await maybe
            except Exception:
                log.exception("after-collect hook failed")
        return snap

    async def _collect_target(self, runtime: TargetRuntime, timeout: float) -> SourceResult:
        started = time.perf_counter()
        try:
            # the source enforces the deadline itself; this outer one is the safety net
            async with asyncio.timeout(timeout + 1.0):
                result = await runtime.source.collect(timeout)
        except TimeoutError:
            result = SourceResult(
                runtime.name,
                runtime.kind,
                up=False,
                reason="timeout",
                detail=f"no answer within {timeout:g}s",
            )
        except Exception as exc:  # a bug in a source must not take the daemon down
            log.exception("collection crashed", target=runtime.name, kind=runtime.kind)
            result = SourceResult(runtime.name, runtime.kind, up=False, reason="query", detail=repr(exc))
        result.seconds = time.perf_counter() - started
        was_up = runtime.last.up if runtime.last else None
        runtime.last = result
        runtime.collections += 1
        if not result.up and result.reason:
            runtime.errors[result.reason] = runtime.errors.get(result.reason, 0) + 1
        if was_up is not False and not result.up:
            log.warning(
                "target down",
                target=runtime.name,
                kind=runtime.kind,
                reason=result.reason,
                detail=result.detail,
            )
        elif was_up is False and result.up:
            log.info("target recovered", target=runtime.name, kind=runtime.kind)
        for outcome in result.outcomes:
            if not outcome.ok:
                log.debug(
                    "collector failed",
                    target=runtime.name,
                    collector=outcome.collector,
                    reason=outcome.reason,
                    detail=outcome.detail,
                )
        return result

    async def _collect_loop(self) -> None:
        while True:
            try:
                await self.current(max_age=0.0)
            except Exception:
                log.exception("background collection failed")
            await asyncio.sleep(self.config.collection.interval)

    # -- probes ----------------------------------------------------------------------------------
    def _probe_plan(self) -> list[tuple[ProbeState, Callable[[float], Awaitable[None]]]]:
        plan: list[tuple[ProbeState, Callable[[float], Awaitable[None]]]] = []
        by_name = {t.name: t for t in self.targets}
        for pgb in self.config.pgbouncers:
            runtime = by_name[pgb.name]
            databases = _probe_databases(pgb, runtime.last)
            params = pgb.connection_params(6432, "pgbouncer")
            if pgb.probe.user:
                params["user"] = pgb.probe.user
            password = pgb.probe.resolve_password() or pgb.password()
            for database in databases:
                state = self._probe_state(pgb.name, "pgbouncer", database)
                plan.append((state, pgbouncer_check(params, database, password)))
        for pg in self.config.postgres:
            if not pg.probe:
                continue
            from poolwatch.sources.postgres import PostgresSource

            source = by_name[pg.name].source
            if isinstance(source, PostgresSource):
                params = pg.connection_params(5432, None)
                state = self._probe_state(pg.name, "postgres", params.get("dbname", params.get("user", "")))
                plan.append((state, source.select1))
        return plan

    def _probe_state(self, target: str, kind: str, database: str) -> ProbeState:
        key = (target, kind, database)
        if key not in self.probes:
            self.probes[key] = ProbeState(target, kind, database)
        return self.probes[key]

    async def run_probes(self) -> None:
        timeout = self.config.probes.timeout
        plan = self._probe_plan()
        await asyncio.gather(*(run_check(state, check, timeout) for state, check in plan))

    async def _probe_loop(self) -> None:
        # the first probes wait for the first collection: 'auto' needs PgBouncer's database list
        with contextlib.suppress(Exception):
            await self.current()
        while True:
            try:
                await self.run_probes()
            except Exception:
                log.exception("probe round failed")
            await asyncio.sleep(self.config.probes.interval)

    # -- readiness and self-metrics ------------------------------------------------------------
    def readiness(self) -> tuple[bool, dict[str, Any]]:
        failing: list[dict[str, Any]] = []
        for runtime in self.targets:
            last = runtime.last
            if last is None:
                failing.append(
                    {
                        "target": runtime.name,
                        "kind": runtime.kind,
                        "reason": "pending",
                        "detail": "no collection has finished yet",
                    }
                )
            elif not last.up:
                failing.append(
                    {
                        "target": runtime.name,
                        "kind": runtime.kind,
                        "reason": last.reason,
                        "detail": last.detail,
                    }
                )
        for state in self.probes.values():
            if state.success is False:
                failing.append(
                    {
                        "target": state.target,
                        "kind": f"{state.kind}-probe",
                        "database": state.database,
                        "reason": state.reason,
                        "detail": state.detail,
                    }
                )
        ready = not failing and bool(self.targets)
        body: dict[str, Any] = {"ready": ready, "targets": len(self.targets), "failing": failing}
        if not self.targets:
            body["detail"] = "no targets configured"
        return ready, body

    def _self_families(self) -> list[Metric]:
        tk = ("target", "kind")
        up = gauge("poolwatch_target_up", "1 if the last collection of the target succeeded", tk)
        down_reason = gauge(
            "poolwatch_target_down_reason",
            "1 for the reason the last collection of the target failed (connect, auth, timeout, query, "
            "privilege, config), 0 for the others",
            (*tk, "reason"),
        )
        duration = gauge("poolwatch_collection_duration_seconds", "Duration of the last collection", tk)
        last_ts = gauge(
            "poolwatch_last_collection_timestamp_seconds", "Unix time the last collection finished", tk
        )
        errors = counter("poolwatch_errors_total", "Failed collections by reason", (*tk, "reason"))
        collections = counter("poolwatch_collections_total", "Collections run", tk)
        success = gauge(
            "poolwatch_collector_success",
            "1 if the collector's query succeeded in the last collection",
            ("target", "collector"),
        )
        collector_seconds = gauge(
            "poolwatch_collector_duration_seconds",
            "Duration of the collector's query",
            ("target", "collector"),
        )
        for runtime in self.targets:
            key = (runtime.name, runtime.kind)
            last = runtime.last
            collections.add(key, runtime.collections)
            for reason in ERROR_REASONS:
                errors.add((*key, reason), runtime.errors.get(reason, 0))
            if last is None:
                continue
            up.add(key, 1.0 if last.up else 0.0)
            for reason in ERROR_REASONS:
                down_reason.add((*key, reason), 1.0 if (not last.up and last.reason == reason) else 0.0)
            duration.add(key, last.seconds)
            last_ts.add(key, time.time())
            for outcome in last.outcomes:
                collector_name = f"{runtime.kind}_{outcome.collector}"
                success.add((runtime.name, collector_name), 1.0 if outcome.ok else 0.0)
                collector_seconds.add((runtime.name, collector_name), outcome.seconds)
        info = gauge("poolwatch_build_info", "poolwatch version and Python runtime", ("version", "python"))
        info.add((__version__, platform.python_version()), 1)
        start = gauge("poolwatch_start_time_seconds", "Unix time poolwatch started")
        start.add((), self._started)
        builders = (
            up,
            down_reason,
            duration,
            last_ts,
            errors,
            collections,
            success,
            collector_seconds,
            info,
            start,
        )
        return [b.build() for b in builders if len(b)]


def _probe_databases(target: PgBouncerTarget, last: SourceResult | None) -> list[str]:
    wanted = target.probe.databases
    if wanted != "auto":
        return list(wanted)
    observation = last.observation if last else None
    if not isinstance(observation, PgBouncerObservation):
        return []
    names = []
    for row in observation.databases:
        name = row.get("name")
        if isinstance(name, str) and name != "pgbouncer" and name not in names:
            names.append(name)
    return sorted(names)[: target.probe.max_databases]


def _pgbouncer_source(target: PgBouncerTarget) -> PgBouncerSource:
    from psycopg.conninfo import make_conninfo

    params = target.connection_params(6432, "pgbouncer")
    return PgBouncerSource(
        target.name,
        make_conninfo("", **params),
        target.password(),
        connect_timeout=target.connect_timeout,
        hold_connection=target.hold_connection,
        pool_filter=PoolFilter.build(
            include_databases=target.databases.include,
            exclude_databases=target.databases.exclude,
            include_users=target.users.include,
            exclude_users=target.users.exclude,
            max_pools=target.max_pools,
        ),
    )


def _postgres_source(target: PostgresTarget) -> PostgresSource:
    from poolwatch.config import postgres_url
    from poolwatch.sources.postgres import PostgresSource

    params = target.connection_params(5432, None)
    return PostgresSource(
        target.name,
        postgres_url(params),
        target.password(),
        connect_timeout=target.connect_timeout,
        pool_max_size=target.pool_max_size,
    )
