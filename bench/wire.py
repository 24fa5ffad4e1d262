"""A minimal PostgreSQL wire-protocol client and a counting TCP proxy, for building bench scenarios.

Thousands of idle client connections are cheap this way (one socket each, no libpq, no TLS, no
SCRAM): the scenarios use ``trust`` authentication for clients. The proxy counts the simple-query
messages ('Q') a client sends, so round trips per collection are measured the same way for every
exporter, without trusting any exporter's own accounting.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass, field


class WireError(RuntimeError):
    pass


def startup_packet(user: str, database: str, application_name: str = "") -> bytes:
    params = {"user": user, "database": database}
    if application_name:
        params["application_name"] = application_name
    body = struct.pack("!i", 196608)
    for key, value in params.items():
        # surrogateescape: a test can send a name that is not UTF-8 ("caf\udce9" is b"caf\xe9")
        body += key.encode() + b"\0" + value.encode("utf-8", "surrogateescape") + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def query_message(sql: str) -> bytes:
    data = sql.encode() + b"\0"
    return b"Q" + struct.pack("!i", len(data) + 4) + data


async def _read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    header = await reader.readexactly(5)
    kind, length = header[:1], struct.unpack("!i", header[1:])[0]
    return kind, await reader.readexactly(length - 4)


@dataclass
class WireConn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def until_ready(self) -> str:
        """Read until ReadyForQuery; its transaction status ('I', 'T', 'E')."""
        while True:
            kind, body = await _read_message(self.reader)
            if kind == b"Z":
                return body.decode()
            if kind == b"E":
                raise WireError(_error_text(body))

    async def query(self, sql: str) -> str:
        self.writer.write(query_message(sql))
        await self.writer.drain()
        return await self.until_ready()

    def send(self, sql: str) -> None:
        """Send a query and do not wait for it (it stays active on the server)."""
        self.writer.write(query_message(sql))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(b"X\0\0\0\4")
        with contextlib.suppress(Exception):
            self.writer.close()


def _error_text(body: bytes) -> str:
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[part[:1].decode()] = part[1:].decode(errors="replace")
    return f"{fields.get('S', 'ERROR')}: {fields.get('M', '?')} ({fields.get('C', '')})"


async def connect(
    user: str,
    database: str,
    *,
    host: str | None = None,
    port: int,
    unix_dir: str | None = None,
    application_name: str = "",
    timeout: float = 30.0,
) -> WireConn:
    """Log in with trust authentication (anything else is an error)."""
    async with asyncio.timeout(timeout):
        if unix_dir is not None:
            reader, writer = await asyncio.open_unix_connection(f"{unix_dir}/.s.PGSQL.{port}", limit=1 << 16)
        else:
            reader, writer = await asyncio.open_connection(host, port, limit=1 << 16)
        conn = WireConn(reader, writer)
        writer.write(startup_packet(user, database, application_name))
        while True:
            kind, body = await _read_message(reader)
            if kind == b"R":
                code = struct.unpack("!i", body[:4])[0]
                if code != 0:
                    conn.close()
                    raise WireError(f"server asked for authentication method {code}; trust expected")
            elif kind == b"E":
                conn.close()
                raise WireError(_error_text(body))
            elif kind == b"Z":
                return conn


@dataclass
class CountingProxy:
    """Forwards TCP from a local port to ``(host, port)``; counts client 'Q' messages and bytes."""

    host: str
    port: int
    queries: int = 0
    connections: int = 0
    bytes_down: int = 0
    listen_port: int = 0
    _server: asyncio.base_events.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.listen_port = self._server.sockets[0].getsockname()[1]
        return self.listen_port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            sreader, swriter = await asyncio.open_connection(self.host, self.port)
        except OSError:
            cwriter.close()
            return
        up = asyncio.create_task(self._upstream(creader, swriter))
        down = asyncio.create_task(self._pipe(sreader, cwriter))
        self._tasks.update((up, down))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up, down):
                task.cancel()
            self._tasks.difference_update((up, down))
            for writer in (cwriter, swriter):
                with contextlib.suppress(Exception):
                    writer.close()

    async def _upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # the startup packet has no type byte: length first
        head = await reader.readexactly(4)
        length = struct.unpack("!i", head)[0]
        body = await reader.readexactly(length - 4)
        writer.write(head + body)
        while struct.unpack("!i", body[:4])[0] in (80877103, 80877104):  # SSL/GSSENC request: 'N'
            head = await reader.readexactly(4)
            length = struct.unpack("!i", head)[0]
            body = await reader.readexactly(length - 4)
            writer.write(head + body)
        while True:
            header = await reader.readexactly(5)
            length = struct.unpack("!i", header[1:])[0]
            body = await reader.readexactly(length - 4)
            if header[:1] == b"Q":
                self.queries += 1
            writer.write(header + body)
            await writer.drain()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                return
            self.bytes_down += len(data)
            writer.write(data)
            await writer.drain()
