"""HTTP endpoints. Nothing here talks to a database: it asks the engine for a snapshot.

Every handler is bounded: ``/metrics`` waits at most the collection timeout plus a margin (the
engine enforces per-target deadlines), ``/healthz`` answers from memory, ``/readyz`` reads the
last results.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from poolwatch import __version__
from poolwatch.collect import Engine
from poolwatch.logs import get_logger

log = get_logger("poolwatch.server")

TEXT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"

ENGINE_KEY: web.AppKey[Callable[[], Engine]] = web.AppKey("engine", Callable[[], Engine])  # type: ignore[arg-type]


def wants_openmetrics(accept: str) -> bool:
    """Content negotiation as Prometheus does it: OpenMetrics only when the scraper asks for it."""
    for part in accept.split(","):
        if part.split(";")[0].strip().lower() == "application/openmetrics-text":
            return True
    return False


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether the scraper takes a gzip body (RFC 9110 12.5.3): ``gzip``/``x-gzip``, or ``*``
    when gzip is not named, with a q-value above 0. Prometheus sends ``Accept-Encoding: gzip``."""
    weights: dict[str, float] = {}
    for part in accept_encoding.split(","):
        coding, *params = (item.strip() for item in part.split(";"))
        if not coding:
            continue
        weight = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        weights[coding.lower()] = weight
    for coding in ("gzip", "x-gzip"):
        if coding in weights:
            return weights[coding] > 0
    return weights.get("*", 0.0) > 0


#: Bodies above this are written in slices of this size: asyncio (3.11) copies whatever a single
#: write cannot send at once into its buffer, and a 30 MB body would be copied whole.
BODY_SLICE = 1 << 20


async def metrics(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE_KEY]()
    openmetrics = wants_openmetrics(request.headers.get("Accept", ""))
    engine.prefer_openmetrics = openmetrics
    deadline = engine.config.collection.timeout + 2.0
    try:
        async with asyncio.timeout(deadline):
            snapshot = await engine.current()
    except TimeoutError:
        # a stale snapshot is better than none: the self-metrics in it say how old it is
        stale = engine.snapshot
        if stale is None:
            return web.Response(status=503, text="collection did not finish in time\n")
        snapshot = stale
    gzip = accepts_gzip(request.headers.get("Accept-Encoding", ""))
    engine.prefer_gzip = gzip
    headers = {
        "Content-Type": OPENMETRICS_TYPE if openmetrics else TEXT_TYPE,
        "Vary": "Accept, Accept-Encoding",
    }
    if gzip:
        headers["Content-Encoding"] = "gzip"
    if snapshot.packed and not gzip:
        # too large to keep as text: decompressed piece by piece as the socket takes it
        response = web.StreamResponse(headers=headers)
        response.content_length = sum(f.size for f in await snapshot.fragments_async(openmetrics))
        await response.prepare(request)
        await _write_ahead(response, snapshot.pieces(openmetrics))
        await response.write_eof()
        return response
    if gzip:
        chunks = [await snapshot.gzip_async(openmetrics)]
        size = len(chunks[0])
    else:
        body = await snapshot.body_async(openmetrics=openmetrics)
        chunks, size = body.chunks, body.size  # a family or a group of small ones (Snapshot.body)
    if size <= BODY_SLICE:
        return web.Response(body=b"".join(chunks), headers=headers)
    response = web.StreamResponse(headers=headers)
    response.content_length = size
    await response.prepare(request)
    for chunk in chunks:
        await _write(response, chunk)
    await response.write_eof()
    return response


async def _write_ahead(response: web.StreamResponse, pieces: AsyncIterator[bytes]) -> None:
    """Write ``pieces`` while the next one is being made (in a worker thread): the socket and
    the decompressor work at the same time, and at most two pieces exist at once."""
    # the end is a None, not StopAsyncIteration: an exception kept on the last future would hold
    # this frame, and the last piece with it, in a reference cycle until a full gc pass
    upcoming = asyncio.ensure_future(anext(pieces, None))
    try:
        while (piece := await upcoming) is not None:
            upcoming = asyncio.ensure_future(anext(pieces, None))
            await _write(response, piece)
    finally:
        if not upcoming.done():  # the scraper went away mid-body
            upcoming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await upcoming


async def _write(response: web.StreamResponse, chunk: bytes) -> None:
    if len(chunk) <= BODY_SLICE:
        await response.write(chunk)
        return
    view = memoryview(chunk)
    for start in range(0, len(chunk), BODY_SLICE):
        await response.write(view[start : start + BODY_SLICE])


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def readyz(request: web.Request) -> web.Response:
    ready, body = request.app[ENGINE_KEY]().readiness()
    return web.json_response(body, status=200 if ready else 503)


async def index(request: web.Request) -> web.Response:
    links = "".join(
        f'<li><a href="{html.escape(path)}">{html.escape(path)}</a> — {html.escape(what)}</li>'
        for path, what in (
            ("metrics", "Prometheus metrics"),
            ("healthz", "the process is alive"),
            ("readyz", "every target answered its last collection"),
            ("checklist", "the pool doctor's verdicts (HTML; ?format=json)"),
        )
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>poolwatch</title></head><body>"
        f"<h1>poolwatch {html.escape(__version__)}</h1><ul>{links}</ul></body></html>"
    )
    return web.Response(text=page, content_type="text/html")


async def checklist(request: web.Request) -> web.Response:
    """The doctor's verdicts: HTML for a browser; JSON for ``?format=json`` or an Accept of JSON."""
    from poolwatch.doctor import report

    engine = request.app[ENGINE_KEY]()
    if engine.doctor is None:
        return web.json_response({"error": "the pool doctor is disabled (doctor.enabled: false)"}, status=404)
    snapshot = engine.snapshot
    if snapshot is None:
        try:
            async with asyncio.timeout(engine.config.collection.timeout + 2.0):
                snapshot = await engine.current()
        except TimeoutError:
            pass
    findings = engine.doctor.findings
    fmt = request.query.get("format", "")
    accept = request.headers.get("Accept", "")
    if fmt == "json" or (not fmt and "application/json" in accept and "text/html" not in accept):
        return web.Response(
            text=report.to_json(findings, engine.doctor.evaluated_at), content_type="application/json"
        )
    return web.Response(text=report.to_html(findings, engine.doctor.evaluated_at), content_type="text/html")


def make_app(engine: Callable[[], Engine]) -> web.Application:
    app = web.Application()
    app[ENGINE_KEY] = engine
    app.router.add_get("/", index)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/checklist", checklist)
    return app
