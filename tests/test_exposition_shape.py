"""What /metrics serves is one valid exposition however it is produced.

* Two PgBouncer and two PostgreSQL targets: each metric is one group under one HELP/TYPE header
  with every target's series in it (a second header for a name is a parse error to ``promtool
  check metrics`` and to Prometheus's OpenMetrics parser).
* A body above ``collection.cached_body_max_series`` is kept compressed family by family
  (packed): decompressed for a text scrape, put together for a gzip one, and either way byte for
  byte the families' whole exposition.
"""

from __future__ import annotations

import asyncio
import gzip
import shutil
import subprocess
import zlib
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from poolwatch import collect, metrics
from poolwatch.collect import Engine
from poolwatch.config import Config
from poolwatch.localcluster import PgBouncerServer, PostgresServer
from poolwatch.metrics import ColumnarFamily, exposition, gzip_fragments, pack, unpack, unpacked_pieces
from poolwatch.server import accepts_gzip, make_app
from tests.daemon import make_config, pgbouncer_target, postgres_target, running_daemon

OPENMETRICS = {"Accept": "application/openmetrics-text; version=1.0.0"}


def _headers(text: str) -> Counter[str]:
    """How many ``# TYPE`` lines each metric name has."""
    return Counter(line.split()[2] for line in text.splitlines() if line.startswith("# TYPE "))


@asynccontextmanager
async def _serving(config: Config) -> AsyncIterator[tuple[Engine, str]]:
    """An engine for ``config`` behind the real HTTP app on a free port: (engine, /metrics URL)."""
    engine = Engine(config)
    runner = web.AppRunner(make_app(lambda: engine))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    try:
        yield engine, f"http://{host}:{port}/metrics"
    finally:
        await runner.cleanup()
        await engine.stop()


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


async def test_packed_body_is_the_whole_exposition(
    pgb: PgBouncerServer, pg: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body over the limit is kept compressed, family by family, not as text: a text scrape
    gets it decompressed piece by piece, with its length known up front. What arrives is byte
    for byte the families' exposition rendered afresh, in both formats. (Uncompressed: the gzip
    case is ``test_gzip_body_is_the_exposition_compressed``.)"""
    monkeypatch.setattr(collect, "TEXT_PIECE", 100)  # many pieces, even from a small fleet
    monkeypatch.setattr(metrics, "PACK_ALONE_SERIES", 2)  # and many fragments
    config = make_config(
        pgbouncers=[pgbouncer_target(pgb, "pgb-a"), pgbouncer_target(pgb, "pgb-b")],
        postgres=[postgres_target(pg, "db-a")],
        collection={"interval": 3600, "max_age": 3600, "cached_body_max_series": 1},
        probes={"interval": 3600},
    )
    async with _serving(config) as (engine, url):
        snapshot = await engine.current()
        assert snapshot.packed and snapshot.series() > 100
        columnar = [f for f in snapshot.families if isinstance(f, ColumnarFamily) and len(f.values) >= 2]
        assert len(columnar) > 10 and all(f.packed is not None and f.rendered is None for f in columnar)
        async with aiohttp.ClientSession(headers={"Accept-Encoding": "identity"}) as session:
            for headers, openmetrics in (({}, False), (OPENMETRICS, True)):
                expected = exposition(snapshot.families, openmetrics=openmetrics).join()
                for _ in range(2):  # decompressed again for the second scrape, same snapshot
                    async with session.get(url, headers=headers) as response:
                        assert response.status == 200
                        assert response.content_length == len(expected)
                        body = await response.read()
                    assert engine.snapshot is snapshot
                    assert body == expected
                text = body.decode()
                assert max(_headers(text).values()) == 1
                if openmetrics:
                    assert text.endswith("# EOF\n")
                    assert {"pgbouncer_up", "pg_up"} <= {f.name for f in parse_openmetrics(text)}  # type: ignore[no-untyped-call]
                else:
                    await _promtool(text)
            # a scraper that goes away mid-body costs nothing but its own response
            async with session.get(url) as response:
                await response.content.read(1000)
                response.close()
            async with session.get(url) as response:
                assert (await response.read()) == snapshot.body().join()
        assert not snapshot._rendered  # no text kept between scrapes
        assert all(f.rendered is None for f in columnar)
        # the next collection reuses the families that did not change, compressed lines included
        again = await engine.current(max_age=0.0)
        reused = [f for f in again.families if any(f is old for old in columnar)]
        assert reused and all(f.packed is not None for f in reused)
        assert again.render() == exposition(again.families).join()


@pytest.mark.parametrize(
    ("header", "takes_gzip"),
    [
        ("gzip", True),  # what Prometheus sends
        ("gzip, deflate, br", True),  # browsers, aiohttp's client
        ("x-gzip", True),
        ("GZIP;q=0.5", True),
        ("*", True),
        ("", False),
        ("identity", False),  # http.client's default
        ("gzip;q=0, identity", False),
        ("gzip;q=0, *", False),  # named with q=0: the wildcard does not bring it back
        ("*;q=0", False),
        ("br, deflate", False),
        ("gzip;q=nonsense", False),
    ],
)
def test_accept_encoding_gzip(header: str, takes_gzip: bool) -> None:
    assert accepts_gzip(header) is takes_gzip


@pytest.mark.parametrize("kept", [True, False], ids=["body-kept", "body-packed"])
async def test_gzip_body_is_the_exposition_compressed(
    pgb: PgBouncerServer, pg: PostgresServer, kept: bool
) -> None:
    """A scraper that takes gzip (Prometheus always does) gets the same exposition compressed,
    in both formats; one that does not, or refuses it with q=0, gets it as it is. A kept body is
    compressed once per snapshot; a packed one's fragments are put together into one gzip member
    without compressing anything again. Either is then served as the same bytes."""
    config = make_config(
        pgbouncers=[pgbouncer_target(pgb, "pgb-a")],
        postgres=[postgres_target(pg, "db-a")],
        collection={"interval": 3600, "max_age": 3600, "cached_body_max_series": 0 if kept else 1},
        probes={"interval": 3600},
    )
    async with _serving(config) as (engine, url):
        snapshot = await engine.current()
        assert snapshot.packed is not kept
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            for accept, openmetrics in (({}, False), (OPENMETRICS, True)):
                plain = exposition(snapshot.families, openmetrics=openmetrics).join()
                served = []
                for _ in range(2):
                    headers = {**accept, "Accept-Encoding": "gzip"}
                    async with session.get(url, headers=headers) as response:
                        assert response.status == 200
                        assert response.headers["Content-Encoding"] == "gzip"
                        assert response.headers["Vary"] == "Accept, Accept-Encoding"
                        assert "Transfer-Encoding" not in response.headers  # length known
                        served.append(await response.read())
                    assert gzip.decompress(served[-1]) == plain
                    assert zlib.decompress(served[-1], 16 + zlib.MAX_WBITS) == plain  # one member
                    assert len(served[-1]) * 4 < len(plain)  # small fleet: HELP text weighs more
                assert served[0] == served[1]  # made once per snapshot and format
                for refused in ("gzip;q=0, identity", "identity"):
                    async with session.get(url, headers={**accept, "Accept-Encoding": refused}) as response:
                        assert "Content-Encoding" not in response.headers
                        assert (await response.read()) == plain
            # a gzip scraper that goes away mid-body costs nothing but its own response
            snapshot.release_rendering()
            async with session.get(url, headers={"Accept-Encoding": "gzip"}) as response:
                await response.content.read(100)
                response.close()
            async with session.get(url, headers={"Accept-Encoding": "gzip"}) as response:
                assert gzip.decompress(await response.read()) == exposition(snapshot.families).join()
        assert engine.snapshot is snapshot
        assert bool(snapshot._rendered) is kept  # a packed body keeps no text


@pytest.mark.parametrize("size", [1, 7, 64, 1 << 20])
def test_fragments_join_into_one_stream(size: int) -> None:
    """Texts compressed one by one, concatenated, are one valid gzip member and one DEFLATE
    stream (full flush: byte-aligned, no reference back); decompressed in pieces of any size
    they are the texts joined, every piece but the last exactly ``size`` bytes."""
    snowmen = "caf\u00e9 \u2603\n".encode() * 900
    texts = [b"", b"# HELP x y\n", bytes(range(256)) * 40, b"a" * 70_000, snowmen, b""]
    fragments = [pack(t) for t in texts]
    whole = b"".join(texts)
    assert gzip.decompress(gzip_fragments(fragments)) == whole
    assert zlib.decompress(gzip_fragments(fragments), 16 + zlib.MAX_WBITS) == whole
    assert [unpack(f) for f in fragments] == texts
    pieces = list(unpacked_pieces(fragments, size))
    assert b"".join(pieces) == whole
    assert all(len(p) == size for p in pieces[:-1]) and 0 < len(pieces[-1]) <= size
    assert gzip.decompress(gzip_fragments([])) == b""

