"""The load generator: streaming chat completions against an OpenAI-compatible URL.

One ``RequestRecord`` per request (start, arrival of each content chunk, end, output tokens,
error). Two ways to offer load, one level at a time:

* closed loop: ``concurrency`` clients, each sending its next request when the last one ends;
* open loop: requests arrive at ``rate`` per second with Poisson (exponential) gaps, whatever
  the server's speed, which is how queueing delay shows up.

Each request fixes its output length with ``max_tokens`` + ``min_tokens`` + ``ignore_eos``
(vLLM's extensions, which the llmtree gateway supports) and asks for a final usage chunk
(``stream_options.include_usage``); its output tokens come from that chunk, else one per content
chunk. A level stops at its request count or at its time cap, whichever comes first; requests
still running at the cap are cancelled and counted as incomplete, not as errors.

Streams are read with the lean client of ``sse`` (the generator shares the cores with the server
it measures); ``httpx`` serves the one-off calls such as ``discover_model``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from llmtree.bench.sse import StreamError, StreamResponse, open_stream
from llmtree.bench.stats import LevelSummary, RequestRecord, summarize
from llmtree.bench.workload import RequestSpec

CHAT_PATH = "/v1/chat/completions"
MAX_ERROR_CHARS = 200

OnDone = Callable[[RequestRecord], None]


def chat_url(url: str) -> str:
    """The chat completions endpoint for a server URL, a ``.../v1`` URL or the endpoint itself."""
    url = url.rstrip("/")
    if url.endswith(CHAT_PATH):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + CHAT_PATH


def is_loopback(url: str) -> bool:
    """True when ``url`` points at this machine (127.0.0.0/8, ::1 or ``localhost``)."""
    host = urlsplit(url if "://" in url else f"http://{url}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Target:
    """Where to send requests and the fixed parts of each body."""

    url: str
    """The chat completions endpoint (see ``chat_url``)."""
    model: str | None = None
    """Sent as ``model`` when set."""
    api_key: str | None = None
    """Sent as ``Authorization: Bearer`` when set."""
    temperature: float = 0.0
    timeout_s: float = 600.0
    """Longest wait for any one read of a response."""

    def body(self, spec: RequestSpec) -> dict[str, Any]:
        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": spec.prompt}],
            "max_tokens": spec.output_tokens,
            "min_tokens": spec.output_tokens,
            "ignore_eos": True,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.model:
            body["model"] = self.model
        return body

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(frozen=True, slots=True)
class Level:
    """One level of load: closed loop at ``concurrency`` or open loop at ``rate`` requests/s."""

    requests: list[RequestSpec]
    concurrency: int | None = None
    rate: float | None = None
    duration_s: float | None = None
    """Time cap for the level; None waits for every request."""

    @property
    def label(self) -> str:
        return f"rate={self.rate:g}/s" if self.rate else f"c={self.concurrency}"


def make_client(timeout_s: float) -> httpx.AsyncClient:
    """An HTTP client with no connection cap (the load generator decides the concurrency)."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s, connect=10.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        trust_env=False,
    )


def _error_text(status: int, body: bytes) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace")
    return f"HTTP {status}: {str(message)[:MAX_ERROR_CHARS]}"


async def _stream_into(target: Target, spec: RequestSpec, record: RequestRecord) -> None:
    """Fill ``record`` as the response streams in; it stays without an ``end`` if cancelled."""
    usage_tokens: int | None = None
    done = False
    body = json.dumps(target.body(spec)).encode()
    response: StreamResponse | None = None
    try:
        response = await open_stream(target.url, body, target.headers(), target.timeout_s)
        if response.status != 200:
            record.error = _error_text(response.status, await response.body())
        else:
            async for now, line in response.lines():
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                chunk = orjson.loads(data)  # it shares the cores with what it measures
                if "error" in chunk:
                    record.error = f"stream error: {chunk['error'].get('message', chunk)}"
                    break
                if isinstance(chunk.get("usage"), dict):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        record.chunk_times.append(now)
            if record.error is None and not done:
                record.error = "the stream ended without data: [DONE]"
    except (OSError, TimeoutError, StreamError, asyncio.IncompleteReadError) as error:
        record.error = f"{type(error).__name__}: {str(error)[:MAX_ERROR_CHARS]}"
    except (ValueError, AttributeError) as error:
        record.error = f"{type(error).__name__}: {str(error)[:MAX_ERROR_CHARS]}"
    finally:
        if response is not None:
            await response.close()
    record.output_tokens = usage_tokens if usage_tokens is not None else len(record.chunk_times)
    record.end = time.perf_counter()


async def run_level(
    target: Target,
    level: Level,
    seed: int = 0,
    on_done: OnDone | None = None,
) -> LevelSummary:
    """Offer one level of load and summarize it."""
    start = time.perf_counter()
    deadline = start + level.duration_s if level.duration_s else None
    records: list[RequestRecord] = []
    tasks: list[asyncio.Task[None]] = []

    async def one(spec: RequestSpec) -> None:
        record = RequestRecord(start=time.perf_counter())
        records.append(record)
        await _stream_into(target, spec, record)
        if on_done is not None:
            on_done(record)

    if level.rate:
        rng = random.Random(seed)
        arrival = start
        for spec in level.requests:
            if deadline is not None and arrival >= deadline:
                break
            await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
            tasks.append(asyncio.create_task(one(spec)))
            arrival += rng.expovariate(level.rate)
    else:
        pending_specs = iter(level.requests)

        async def client_loop() -> None:
            for spec in pending_specs:
                if deadline is not None and time.perf_counter() >= deadline:
                    return
                await one(spec)

        tasks = [asyncio.create_task(client_loop()) for _ in range(level.concurrency or 1)]
    timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
    _, cut = await asyncio.wait(tasks, timeout=timeout) if tasks else (set(), set())
    for task in cut:
        task.cancel()
    await asyncio.gather(*cut, return_exceptions=True)
    window_end = deadline if cut else None
    return summarize(records, level.label, start, window_end, level.concurrency, level.rate)


async def discover_model(client: httpx.AsyncClient, url: str, api_key: str | None) -> str | None:
    """The first model ``GET /v1/models`` lists, or None when the server does not say."""
    models_url = chat_url(url).removesuffix("/chat/completions") + "/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = await client.get(models_url, headers=headers)
        data = response.json()["data"]
        return str(data[0]["id"]) if data else None
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return None
