"""The load generator's HTTP/1.1 stream reader against a raw asyncio server on 127.0.0.1.

The server writes hand-made responses, so framing the real gateway never produces is covered
too: lines split across chunks, several lines in one chunk, chunk extensions and trailers, a
Content-Length body, a body that ends with the connection, and broken framing.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import pytest

from llmtree.bench.sse import StreamError, open_stream

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def chunked(*pieces: bytes, trailer: bytes = b"") -> bytes:
    body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces)
    return body + b"0\r\n" + trailer + b"\r\n"


def serve(response: bytes, seen: list[bytes] | None = None) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        request = head + await reader.readexactly(length)
        if seen is not None:
            seen.append(request)
        for index in range(0, len(response), 7):  # dribble it out in small writes
            writer.write(response[index : index + 7])
            await writer.drain()
        writer.close()

    return handle


async def lines_from(handler: Handler, url_path: str = "/v1/chat/completions") -> list[bytes]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        response = await open_stream(
            f"http://127.0.0.1:{port}{url_path}", b'{"a": 1}', {"X-Test": "yes"}, 5.0
        )
        assert response.status == 200
        got = [line async for _, line in response.lines()]
        await response.close()
        return got
    finally:
        server.close()
        await server.wait_closed()


def test_lines_survive_any_chunking() -> None:
    events = [json.dumps({"n": n, "text": "é" * n}).encode() for n in range(5)]
    text = b"".join(b"data: " + e + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    pieces = [text[i : i + 5] for i in range(0, len(text), 5)]
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    seen: list[bytes] = []
    got = asyncio.run(lines_from(serve(head + chunked(*pieces, trailer=b"X-T: 1\r\n"), seen)))
    data = [line for line in got if line.startswith(b"data:")]
    assert data == [b"data: " + e for e in events] + [b"data: [DONE]"]
    request = seen[0]
    assert request.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nX-Test: yes\r\n" in request and request.endswith(b'{"a": 1}')


def test_content_length_and_read_to_close_bodies() -> None:
    body = b"data: 1\r\n\r\ndata: 2\n"
    sized = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    assert asyncio.run(lines_from(serve(sized))) == [b"data: 1", b"", b"data: 2"]
    unsized = b"HTTP/1.1 200 OK\r\n\r\n" + body + b"data: 3"  # no final newline
    assert asyncio.run(lines_from(serve(unsized)))[-1] == b"data: 3"


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # not a size
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nshort",  # cut short
        b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\ndata: 1\n",  # cut short
        b"SMTP ready\r\n\r\n",  # not HTTP
    ],
)
def test_broken_framing_is_an_error_not_a_hang(response: bytes) -> None:
    with pytest.raises((StreamError, asyncio.IncompleteReadError)):
        asyncio.run(lines_from(serve(response)))


def test_an_error_status_keeps_its_body() -> None:
    async def run() -> tuple[int, bytes]:
        payload = b'{"error": {"message": "busy"}}'
        raw = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: %d\r\n\r\n" % len(payload)
        server = await asyncio.start_server(serve(raw + payload), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            response = await open_stream(f"http://127.0.0.1:{port}/x", b"{}", {}, 5.0)
            status, body = response.status, await response.body()
            await response.close()
            return status, body
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(run()) == (503, b'{"error": {"message": "busy"}}')


def test_a_silent_server_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3)
        writer.close()

    async def run() -> None:
        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            await open_stream(f"http://127.0.0.1:{port}/x", b"{}", {}, 0.3)
        finally:
            server.close()
            await server.wait_closed()

    with pytest.raises(TimeoutError):
        asyncio.run(run())


def trickle(gap_s: float, count: int, then_stall: bool) -> Handler:
    """A chunked event stream: ``count`` events ``gap_s`` apart, then the end (or silence)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)  # the body, b"{}"
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for index in range(count):
            line = b"data: %d\n" % index
            writer.write(b"%x\r\n%s\r\n" % (len(line), line))
            await writer.drain()
            await asyncio.sleep(gap_s)
        if then_stall:
            await asyncio.sleep(5)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    return handle


def read_lines(handler: Handler, timeout_s: float) -> list[bytes]:
    async def run() -> list[bytes]:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            response = await open_stream(f"http://127.0.0.1:{port}/x", b"{}", {}, timeout_s)
            try:
                return [line async for _, line in response.lines()]
            finally:
                await response.close()
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(run())


def test_a_stream_that_keeps_coming_outlives_its_timeout() -> None:
    """The limit is on the gap between reads, not on the whole answer."""
    assert read_lines(trickle(0.1, 6, then_stall=False), 0.3) == [b"data: %d" % i for i in range(6)]


def test_a_stream_that_stalls_times_out() -> None:
    started = time.perf_counter()
    with pytest.raises(TimeoutError):
        read_lines(trickle(0.0, 2, then_stall=True), 0.3)
    assert time.perf_counter() - started < 3


def test_only_http_urls() -> None:
    with pytest.raises(StreamError):
        asyncio.run(open_stream("ftp://127.0.0.1/x", b"{}", {}, 1.0))
