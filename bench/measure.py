"""Measuring an exporter process from the outside: scrapes, CPU, memory, series.

Every exporter is measured the same way, as a separate process: wall time of a whole HTTP scrape
as the scraper sees it (connect, request, the full body), CPU seconds of the exporter process
(all threads, from /proc/<pid>/stat) over a run of scrapes divided by their number, peak RSS
(VmHWM), and the series in the body (sample lines).
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import os
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: What the bench scraper sends: the text format, no compression (every exporter is asked the same).
SCRAPE_HEADERS = {"Accept": "text/plain;version=0.0.4", "Accept-Encoding": "identity"}
#: What Prometheus sends (it always takes gzip): the rows marked "gzip".
PROMETHEUS_HEADERS = {"Accept": "text/plain;version=0.0.4", "Accept-Encoding": "gzip"}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(
    port: int, path: str = "/metrics", timeout: float = 300.0, headers: Mapping[str, str] = SCRAPE_HEADERS
) -> tuple[float, bytes, int]:
    """One scrape on a fresh connection: (seconds until the last byte arrived, the body as text,
    bytes on the wire). A gzip body is decompressed after the clock stopped."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=dict(headers))
        response = conn.getresponse()
        body = response.read()
        seconds = time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"scrape of :{port}{path} answered {response.status}: {body[:200]!r}")
        encoding = response.getheader("Content-Encoding", "identity")
    finally:
        conn.close()
    if encoding == "gzip":
        return seconds, gzip.decompress(body), len(body)
    return seconds, body, len(body)


def series_in(body: bytes) -> int:
    """Sample lines of a text-format body."""
    return sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads, living and exited)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0])
    return out


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


@dataclass
class Run:
    """The measurements of one exporter on one scenario."""

    exporter: str
    scrapes: list[float] = field(default_factory=list)
    cpu: float = 0.0
    series: int = 0
    body_bytes: int = 0
    wire_bytes: int = 0  # the body as sent: smaller than body_bytes when gzip-compressed
    peak_rss_kb: int = 0
    rss_kb: int = 0
    rss_after_warmup_kb: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.scrapes) * 1000 if self.scrapes else float("nan")

    @property
    def p99_ms(self) -> float:
        return percentile(self.scrapes, 0.99) * 1000

    @property
    def cpu_ms(self) -> float:
        return self.cpu / len(self.scrapes) * 1000 if self.scrapes else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "exporter": self.exporter,
            "scrapes": len(self.scrapes),
            "median_ms": round(self.median_ms, 2),
            "p99_ms": round(self.p99_ms, 2),
            "min_ms": round(min(self.scrapes) * 1000, 2) if self.scrapes else None,
            "cpu_ms_per_scrape": round(self.cpu_ms, 2),
            "series": self.series,
            "body_bytes": self.body_bytes,
            "wire_bytes": self.wire_bytes,
            "peak_rss_mb": round(self.peak_rss_kb / 1024, 1),
            "rss_mb": round(self.rss_kb / 1024, 1),
            "rss_after_warmup_mb": round(self.rss_after_warmup_kb / 1024, 1),
            **self.extra,
        }


class Exporter:
    """An exporter process: started in its own session, stopped by its pid, never left behind."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        port: int,
        *,
        env: Mapping[str, str] | None = None,
        log: Path,
        path: str = "/metrics",
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.env = dict(env or os.environ)
        self.log = log
        self.path = path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 - closed with the process
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        finally:
            out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen on :{self.port} within {timeout}s; see {self.log}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def __enter__(self) -> Exporter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def measure(
        self,
        scrapes: int,
        *,
        warmup: int = 2,
        pause: float = 0.0,
        headers: Mapping[str, str] = SCRAPE_HEADERS,
        before_each: Callable[[], object] | None = None,
    ) -> Run:
        """``warmup`` scrapes, then ``scrapes`` timed ones back to back; CPU over the timed ones.

        ``before_each`` runs before every scrape (outside the timing; the CPU it makes the exporter
        spend, none unless the exporter collects in the background, is counted)."""
        run = Run(self.name)
        body, wire = b"", 0
        for _ in range(warmup):
            if before_each is not None:
                before_each()
            _, body, wire = scrape(self.port, self.path, headers=headers)
        run.rss_after_warmup_kb = memory_kb(self.pid)["VmRSS"]
        cpu_before = cpu_seconds(self.pid)
        for _ in range(scrapes):
            if before_each is not None:
                before_each()
            seconds, body, wire = scrape(self.port, self.path, headers=headers)
            run.scrapes.append(seconds)
            if pause:
                time.sleep(pause)
        run.cpu = cpu_seconds(self.pid) - cpu_before
        memory = memory_kb(self.pid)
        run.peak_rss_kb, run.rss_kb = memory["VmHWM"], memory["VmRSS"]
        run.series = series_in(body)
        run.body_bytes = len(body)
        run.wire_bytes = wire
        return run
