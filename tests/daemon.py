"""Helpers to run the real daemon in-process against fixture servers and read its metrics."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from poolwatch.cli import Running, serve
from poolwatch.config import Config, config_from_mapping
from poolwatch.localcluster import PgBouncerServer, PostgresServer


def secret_env(value: str) -> str:
    """Put a password in a fresh environment variable; returns the variable's name."""
    name = f"POOLWATCH_TEST_PW_{secrets.token_hex(4).upper()}"
    os.environ[name] = value
    return name


def pgbouncer_target(pgb: PgBouncerServer, name: str = "pgb", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "host": pgb.host,
        "port": pgb.port,
        "user": pgb.stats_user,
        "password_env": secret_env(pgb.stats_password),
        **extra,
    }


def postgres_target(pg: PostgresServer, name: str = "db", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "host": pg.host,
        "port": pg.port,
        "user": pg.monitor_user,
        "dbname": "postgres",
        "password_env": secret_env(pg.monitor_password),
        **extra,
    }


def make_config(
    *,
    pgbouncers: list[dict[str, Any]] = (),  # type: ignore[assignment]
    postgres: list[dict[str, Any]] = (),  # type: ignore[assignment]
    **top: Any,
) -> Config:
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "log": {"level": "warning", "format": "json"},
        "collection": {"timeout": 2, "interval": 1, "max_age": 0},
        "probes": {"interval": 1, "timeout": 1.5},
        "pgbouncers": list(pgbouncers),
        "postgres": list(postgres),
    }
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return config_from_mapping(data, "test")


class Daemon:
    def __init__(self, running: Running, session: aiohttp.ClientSession) -> None:
        self.url = running.url
        self.running = running
        self.session = session

    async def get(self, path: str, **kw: Any) -> tuple[int, str]:
        async with self.session.get(self.url + path, **kw) as response:
            return response.status, await response.text()

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """``{(sample name, sorted labels): value}`` of one scrape."""
        status, text = await self.get("/metrics")
        assert status == 200, text
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                assert key not in samples, f"duplicate series {key}"
                samples[key] = sample.value
        return samples

    async def value(self, name: str, /, **labels: str) -> float | None:
        return pick(await self.metrics(), name, **labels)

    async def wait_for(
        self, name: str, expected: float, /, timeout: float = 15.0, **labels: str
    ) -> float | None:
        """Scrape until ``name{labels} == expected``; returns the last value seen."""
        deadline = asyncio.get_running_loop().time() + timeout
        seen = None
        while asyncio.get_running_loop().time() < deadline:
            seen = await self.value(name, **labels)
            if seen == expected:
                return seen
            await asyncio.sleep(0.25)
        return seen


def pick(
    samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str, /, **labels: str
) -> float | None:
    """The value of the one sample of ``name`` whose labels include ``labels`` (None if absent)."""
    found = [
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and all(dict(sample_labels).get(k) == v for k, v in labels.items())
    ]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} series"
    return found[0] if found else None


@contextlib.asynccontextmanager
async def running_daemon(config: Config) -> AsyncIterator[Daemon]:
    started: asyncio.Future[Running] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(config, on_listening=started.set_result, install_signals=False))
    done, _ = await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED, timeout=30)
    if task in done:
        task.result()  # raises the start-up error
    running = started.result()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        try:
            yield Daemon(running, session)
        finally:
            running.stop()
            await asyncio.wait_for(task, 10)
