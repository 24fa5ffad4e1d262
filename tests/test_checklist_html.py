"""``GET /checklist``: the HTML page in a real browser (headless Chromium), its JSON, and the metrics.

The page must be readable without JavaScript. Headless Chromium cannot dump a DOM or take a
screenshot with scripting switched off (``--blink-settings=scriptEnabled=false`` makes both print
nothing), so the test proves it the other way round: the served page has no script, no event
handler and no external resource, and the DOM Chromium renders holds every verdict, summary and
evidence value of the JSON document of the same evaluation. The screenshot shows the overall badge
in its colour at the top of the page.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from poolwatch.doctor import report
from poolwatch.doctor.model import Status
from poolwatch.localcluster import PgBouncerServer, PostgresServer
from tests.conftest import unavailable
from tests.daemon import Daemon, make_config, pgbouncer_target, postgres_target, running_daemon

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # the tests run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
BADGE_RGB = {"fail": (0xCF, 0x22, 0x2E), "warn": (0x9A, 0x67, 0x00), "ok": (0x1A, 0x7F, 0x37)}


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        message = "chromium is missing: apt-get install -y chromium (scripts/test does)"
        unavailable(message)
    return found


async def run_chromium(binary: str, profile: Path, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        binary,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


class _Page(HTMLParser):
    """The parts of the checklist page a reader sees: text per element id and per finding row."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.stack: list[tuple[str, dict[str, str | None]]] = []
        self.text_by_id: dict[str, str] = {}
        self.rows: dict[str, dict[str, Any]] = {}
        self.problems: list[str] = []
        self._row: str | None = None
        self._open_ids: list[tuple[int, str]] = []
        self._in_problem = False
        self.all_text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag in ("br", "meta", "link", "img", "input"):
            return
        self.stack.append((tag, attributes))
        element_id = attributes.get("id")
        if element_id:
            self._open_ids.append((len(self.stack), element_id))
            self.text_by_id.setdefault(element_id, "")
        if tag == "tr" and "data-check" in attributes:
            self._row = str(attributes["id"])
            self.rows[self._row] = {
                "check": attributes["data-check"],
                "status": attributes["data-status"],
                "text": "",
            }
        if tag == "li" and self.stack[-2:-1] and self.stack[-2][1].get("class") == "problems":
            self._in_problem = True
            self.problems.append("")

    def handle_endtag(self, tag: str) -> None:
        if not self.stack:
            return
        depth = len(self.stack)
        while self._open_ids and self._open_ids[-1][0] >= depth:
            self._open_ids.pop()
        self.stack.pop()
        if tag == "tr":
            self._row = None
        if tag == "li":
            self._in_problem = False

    def handle_data(self, data: str) -> None:
        self.all_text.append(data)
        for _, element_id in self._open_ids:
            self.text_by_id[element_id] += data
        if self._row is not None:
            self.rows[self._row]["text"] += data
        if self._in_problem:
            self.problems[-1] += data


def parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    page.close()
    return page


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def png_top_pixels(path: Path, rows: int) -> tuple[int, list[bytes]]:
    """Width and the first ``rows`` rows (RGB/RGBA bytes) of an 8-bit PNG, without an imaging library."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    assert depth == 8 and colour in (2, 6), (depth, colour)
    channels = 3 if colour == 2 else 4
    idat, offset = b"", 8
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if kind == b"IDAT":
            idat += data[offset + 8 : offset + 8 + length]
        offset += 12 + length
    raw = zlib.decompressobj().decompress(idat, (width * channels + 1) * rows)
    stride, previous, out = width * channels, bytearray(width * channels), []
    for y in range(min(rows, height)):
        line = raw[y * (stride + 1) : (y + 1) * (stride + 1)]
        kind, current = line[0], bytearray(line[1:])
        for i in range(stride):
            left = current[i - channels] if i >= channels else 0
            up, corner = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                current[i] = (current[i] + left) & 0xFF
            elif kind == 2:
                current[i] = (current[i] + up) & 0xFF
            elif kind == 3:
                current[i] = (current[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                predictor = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                current[i] = (current[i] + predictor) & 0xFF
        out.append(bytes(current))
        previous = current
    return channels, out


def has_colour(channels: int, rows: list[bytes], rgb: tuple[int, int, int], tolerance: int = 8) -> int:
    count = 0
    for row in rows:
        for x in range(0, len(row), channels):
            if all(abs(row[x + c] - rgb[c]) <= tolerance for c in range(3)):
                count += 1
    return count


async def settled_daemon_document(daemon: Daemon) -> dict[str, Any]:
    """Two collections (rates need two), then a document that no longer changes."""
    await asyncio.sleep(0.6)
    status, _ = await daemon.get("/metrics")  # max_age 0: a second collection
    assert status == 200
    status, body = await daemon.get("/checklist?format=json")
    assert status == 200
    return dict(json.loads(body))


def checklist_config(pg: PostgresServer, pgb: PgBouncerServer) -> Any:
    # interval 1 h: after the start-up collection only a scrape collects, so the page and the JSON
    # show the same evaluation
    return make_config(
        pgbouncers=[pgbouncer_target(pgb)],
        postgres=[postgres_target(pg)],
        collection={"interval": 3600, "max_age": 0, "timeout": 3},
    )


async def test_checklist_page_in_headless_chromium(
    pg: PostgresServer, pgb: PgBouncerServer, chromium: str, tmp_path: Path
) -> None:
    async with running_daemon(checklist_config(pg, pgb)) as daemon:
        doc = await settled_daemon_document(daemon)
        status, served = await daemon.get("/checklist")
        assert status == 200
        dom = await run_chromium(chromium, tmp_path / "profile-dom", "--dump-dom", daemon.url + "/checklist")
        shot = tmp_path / "checklist.png"
        await run_chromium(
            chromium,
            tmp_path / "profile-shot",
            "--window-size=1100,900",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            daemon.url + "/checklist",
        )
        status, again = await daemon.get("/checklist?format=json")
    assert json.loads(again)["generated_at"] == doc["generated_at"], "a collection ran in between"

    # nothing in the page needs a script: none, no handlers, no javascript: links, nothing external
    for tag, attributes in parse(served).tags:
        assert tag not in ("script", "iframe", "object", "embed", "img", "link"), tag
        assert not any(name.startswith("on") for name in attributes), (tag, attributes)
        assert not any("javascript:" in (value or "") for value in attributes.values()), attributes
        assert not any((value or "").startswith(("http:", "https:", "//")) for value in attributes.values())
    rendered, sent = parse(dom), parse(served)
    # with no script, what Chromium renders is what the server sent
    assert _squash(" ".join(rendered.all_text)) == _squash(" ".join(sent.all_text))

    # the verdicts a reader sees are those of the JSON document, word for word
    assert _squash(rendered.text_by_id["overall"]) == doc["overall"].upper()
    counts = doc["counts"]
    assert _squash(rendered.text_by_id["counts"]).startswith(
        f"{counts['fail']} fail, {counts['warn']} warn, {counts['unknown']} unknown, {counts['ok']} ok"
    )
    statuses = set()
    for group in doc["targets"]:
        for finding in group["findings"]:
            row = rendered.rows[f"{group['kind']}-{group['target']}-{finding['check']}"]
            statuses.add(finding["status"])
            assert row["check"] == finding["check"] and row["status"] == finding["status"]
            text = _squash(row["text"])
            assert text.startswith(finding["status"].upper()), text  # the status in words
            assert _squash(finding["title"]) in text and _squash(finding["summary"]) in text
            for key, value in finding["evidence"].items():  # <dt>key</dt><dd>value</dd>
                assert f"{key}{_squash(report._text(value))}" in text, (key, value, text)
            if finding["recommendation"]:
                assert "Fix: " + _squash(finding["recommendation"]) in text
    # the session servers give a mix: PostgreSQL without statement_timeout fails, PgBouncer 1.18 in
    # transaction pooling warns (prepared statements), sizing without a core count is unknown
    assert {"fail", "warn", "unknown", "ok"} <= statuses
    problems = [_squash(p) for p in rendered.problems]
    expected = [
        (f["status"], f["title"], f["summary"])
        for g in doc["targets"]
        for f in g["findings"]
        if f["status"] != "ok"
    ]
    assert len(problems) == len(expected)
    assert problems[0].startswith("FAIL")  # failures first
    for status_word, title, summary in expected:
        assert any(
            p.startswith(status_word.upper()) and _squash(title) in p and _squash(summary) in p
            for p in problems
        ), (title, problems)
    # every "Needs attention" link lands on a row
    for tag, attributes in rendered.tags:
        if tag == "a" and (attributes.get("href") or "").startswith("#"):
            assert str(attributes["href"])[1:] in rendered.text_by_id

    # the screenshot: the overall badge, in its colour, at the top of the page
    channels, top = png_top_pixels(shot, 120)
    assert has_colour(channels, top, BADGE_RGB[doc["overall"]]) > 200, "no overall badge at the top"


async def test_checklist_json_matches_metrics(pg: PostgresServer, pgb: PgBouncerServer) -> None:
    async with running_daemon(checklist_config(pg, pgb)) as daemon:
        doc = await settled_daemon_document(daemon)
        samples = await daemon.metrics()  # a third collection: compare with its own document
        status, body = await daemon.get("/checklist", headers={"Accept": "application/json"})
        assert status == 200
        current = json.loads(body)
        status, html = await daemon.get("/checklist", headers={"Accept": "text/html"})
        assert status == 200 and html.startswith("<!doctype html>")
    assert current["schema_version"] == report.SCHEMA_VERSION == 1
    assert set(current) == set(doc) == {"schema_version", "generated_at", "overall", "counts", "targets"}
    codes = {status.label: int(status) for status in Status}
    seen = 0
    for group in current["targets"]:
        for finding in group["findings"]:
            key = ("poolwatch_check_status", (("check", finding["check"]), ("target", finding["target"])))
            assert samples[key] == codes[finding["status"]], finding
            value = samples.get(
                ("poolwatch_check_value", (("check", finding["check"]), ("target", finding["target"])))
            )
            if finding["value"] is None:
                assert value is None, finding
            else:
                assert value == pytest.approx(finding["value"]), finding
            seen += 1
    assert seen == sum(current["counts"].values()) and seen >= 18


def test_checklist_before_the_first_collection_is_unknown() -> None:
    page = parse(report.to_html([]))
    assert _squash(page.text_by_id["overall"]) == "UNKNOWN"
    assert "No verdicts yet" in " ".join(page.all_text)
