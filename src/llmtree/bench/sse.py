"""A lean HTTP/1.1 client for one streamed POST, on asyncio streams: what the load generator
uses to read server-sent events.

The load generator shares the machine with the server it measures, so every microsecond it
spends per token is taken from the server. A general client (httpx over anyio and httpcore)
spends a few hundred microseconds of Python on each streamed chunk; this one reads the chunked
body straight from the socket and splits lines, a few tens. It does exactly one request per
connection (``Connection: close``): a loopback connect costs far less than one token.

``open_stream`` returns the status line and headers; ``lines()`` then yields each line of the
body with the time its bytes arrived, ``body()`` reads a whole (error) body. The head must come
within ``timeout_s``, and then no gap between two reads may be longer: one timer per response
checks that (re-armed only when it fires), not a timeout around every read, which cost as much
as the rest of a chunk's handling. Failures raise ``StreamError`` (or OSError / TimeoutError).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable
from urllib.parse import urlsplit

MAX_HEADER_BYTES = 64 * 1024
MAX_ERROR_BODY_BYTES = 64 * 1024


class StreamError(Exception):
    """The server's answer is not well-formed HTTP/1.1."""


class StreamResponse:
    """An HTTP response whose body is read as it arrives."""

    def __init__(
        self,
        status: int,
        headers: dict[str, str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        timeout_s: float,
    ) -> None:
        self.status = status
        self.headers = headers
        self._reader = reader
        self._writer = writer
        self._timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        self._last_read = self._loop.time()
        self._stalled = False
        self._watchdog = self._loop.call_later(timeout_s, self._watch)

    def _watch(self) -> None:
        """The stall timer: after ``timeout_s`` without data, cut the connection."""
        quiet = self._loop.time() - self._last_read
        if quiet >= self._timeout_s:
            self._stalled = True
            self._writer.transport.abort()  # the pending read ends at once
        else:
            self._watchdog = self._loop.call_later(self._timeout_s - quiet, self._watch)

    def _check_stall(self) -> None:
        if self._stalled:
            raise TimeoutError(f"no data from the server for {self._timeout_s:g} s")

    async def _read(self, count: int) -> bytes:
        return await self._progress(self._reader.readexactly(count))

    async def _readline(self) -> bytes:
        return await self._progress(self._reader.readuntil(b"\n"))

    async def _progress(self, pending: Awaitable[bytes]) -> bytes:
        """``pending``'s data, noted as progress; a read cut by the stall timer is a timeout."""
        try:
            data = await pending
        except (asyncio.IncompleteReadError, ConnectionError):
            self._check_stall()
            raise
        self._last_read = self._loop.time()
        return data

    async def _read_some(self, limit: int) -> bytes:
        data = await self._reader.read(limit)
        self._check_stall()
        self._last_read = self._loop.time()
        return data

    async def chunks(self) -> AsyncIterator[tuple[float, bytes]]:
        """The body in the pieces it arrives in, each with its arrival time."""
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await self._readline()
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise StreamError(f"bad chunk size line {size_line[:40]!r}") from None
                if size == 0:
                    while (await self._readline()).strip():  # trailers, then the blank line
                        pass
                    return
                data = await self._read(size + 2)
                yield time.perf_counter(), data[:-2]
        elif "content-length" in self.headers:
            left = int(self.headers["content-length"])
            while left > 0:
                data = await self._read_some(min(left, 65536))
                if not data:
                    raise StreamError("the connection closed before the end of the body")
                left -= len(data)
                yield time.perf_counter(), data
        else:
            while True:
                data = await self._read_some(65536)
                if not data:
                    return
                yield time.perf_counter(), data

    async def lines(self) -> AsyncIterator[tuple[float, bytes]]:
        """Each line of the body (without its line break) with the time it arrived."""
        pending = b""
        arrived = time.perf_counter()
        async for arrived, data in self.chunks():
            pending += data
            if b"\n" not in data:
                continue
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield arrived, line.rstrip(b"\r")
        if pending:
            yield arrived, pending.rstrip(b"\r")

    async def body(self, limit: int = MAX_ERROR_BODY_BYTES) -> bytes:
        """The whole body, cut at ``limit`` bytes."""
        parts: list[bytes] = []
        size = 0
        async for _, data in self.chunks():
            parts.append(data)
            size += len(data)
            if size >= limit:
                break
        return b"".join(parts)[:limit]

    async def close(self) -> None:
        self._watchdog.cancel()
        self._writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self._writer.wait_closed()


async def open_stream(
    url: str, body: bytes, headers: dict[str, str], timeout_s: float
) -> StreamResponse:
    """POST ``body`` (JSON) to ``url`` and return once the status line and headers are in."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StreamError(f"not an http(s) URL: {url}")
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    context = ssl.create_default_context() if secure else None
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(
            parts.hostname, port, ssl=context, limit=MAX_HEADER_BYTES
        )
    host = parts.netloc.rsplit("@", 1)[-1]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [
        f"POST {target} HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    try:
        async with asyncio.timeout(timeout_s):
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.LimitOverrunError, asyncio.IncompleteReadError) as error:
        writer.close()
        raise StreamError(f"no complete response head: {error}") from None
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    fields = status_line.split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/1.") or not fields[1].isdigit():
        writer.close()
        raise StreamError(f"bad status line {status_line[:80]!r}")
    response_headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if sep:
            response_headers[name.strip().lower()] = value.strip()
    return StreamResponse(int(fields[1]), response_headers, reader, writer, timeout_s)
