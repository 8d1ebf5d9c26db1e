"""The load generator against a small real SSE server on 127.0.0.1.

The server speaks the OpenAI chunk format with known delays (first chunk after ``FIRST_S``, the
others ``GAP_S`` apart), so the measured TTFT, ITL and token counts can be checked; some models
make it misbehave: ``busy`` answers every other request with a 503, ``no-usage`` omits the usage
chunk, ``broken`` sends an error mid-stream and ``slow`` outlives a level's time cap.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from llmtree.bench.cli import make_plan, run_bench
from llmtree.bench.loadgen import Level, Target, chat_url, run_level
from llmtree.bench.report import read_jsonl
from llmtree.bench.stats import LevelSummary
from llmtree.bench.workload import Span, make_requests
from llmtree.cli import build_parser
from llmtree.errors import ConfigError

FIRST_S = 0.05
GAP_S = 0.02


@dataclass
class Seen:
    bodies: list[dict[str, Any]] = field(default_factory=list)
    count: int = 0


def make_app(seen: Seen) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "tiny", "object": "model"}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> StreamingResponse | JSONResponse:
        body = await request.json()
        seen.bodies.append(body)
        seen.count += 1
        model = body.get("model", "tiny")
        if model == "busy" and seen.count % 2 == 0:
            error = {"message": "no capacity", "type": "service_unavailable", "code": None}
            return JSONResponse({"error": error}, status_code=503)
        return StreamingResponse(stream(body, model), media_type="text/event-stream")

    return app


async def stream(body: dict[str, Any], model: str) -> AsyncIterator[str]:
    def data(obj: dict[str, Any]) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def delta(content: str) -> dict[str, Any]:
        return {"object": "chat.completion.chunk", "choices": [{"delta": {"content": content}}]}

    tokens = int(body["max_tokens"])
    yield data({"choices": [{"delta": {"role": "assistant", "content": ""}}]})
    await asyncio.sleep(FIRST_S if model != "slow" else 1.0)
    for index in range(tokens):
        if index:
            await asyncio.sleep(GAP_S)
        if model == "broken" and index == 1:
            yield data({"error": {"message": "engine fell over", "type": "server_error"}})
            return
        yield data(delta(f" w{index}"))
    yield data({"choices": [{"delta": {}, "finish_reason": "length"}]})
    if model != "no-usage" and body.get("stream_options", {}).get("include_usage"):
        usage = {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": tokens + 3}
        yield data({"choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Seen]]:
    seen = Seen()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(make_app(seen), log_level="warning", lifespan="off")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:  # probe readiness
        assert time.monotonic() < deadline and thread.is_alive(), "test server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", seen
    uv.should_exit = True
    thread.join(10)
    sock.close()


def level(model: str, count: int = 6, tokens: int = 5, **kwargs: Any) -> tuple[Target, Level]:
    specs = make_requests(count, Span(8, 8), Span(tokens, tokens), seed=3)
    return Target(url="", model=model), Level(specs, **kwargs)


def run(base: str, target: Target, lvl: Level) -> LevelSummary:
    async def go() -> LevelSummary:
        aimed = Target(chat_url(base), target.model, target.api_key, target.temperature)
        return await run_level(aimed, lvl, seed=1)

    return asyncio.run(go())


def test_closed_loop_measures_ttft_itl_and_tokens(server: tuple[str, Seen]) -> None:
    base, seen = server
    target, lvl = level("tiny", count=6, tokens=5, concurrency=2)
    summary = run(base, target, lvl)
    assert (summary.num_ok, summary.num_errors, summary.num_incomplete) == (6, 0, 0)
    assert summary.output_tokens == 30
    assert FIRST_S * 0.9 <= (summary.ttft.p50 or 0) < FIRST_S + 0.25
    assert GAP_S * 0.5 <= (summary.itl.p50 or 0) < GAP_S + 0.1
    assert summary.itl.count == 6 * 4
    assert summary.tpot.p50 is not None and summary.tpot.p50 == pytest.approx(GAP_S, abs=0.05)
    assert summary.output_tokens_per_s > 0 and summary.requests_per_s > 0
    body = seen.bodies[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == body["min_tokens"] == 5 and body["ignore_eos"] is True


def test_errors_are_counted_not_fatal(server: tuple[str, Seen]) -> None:
    base, seen = server
    seen.count = 0
    target, lvl = level("busy", count=6, concurrency=1)
    summary = run(base, target, lvl)
    assert (summary.num_ok, summary.num_errors) == (3, 3)
    assert summary.errors == ["HTTP 503: no capacity"]
    assert summary.output_tokens == 15  # failed requests add no tokens


def test_stream_error_and_missing_usage(server: tuple[str, Seen]) -> None:
    base, _ = server
    target, lvl = level("broken", count=2, concurrency=2)
    broken = run(base, target, lvl)
    assert (broken.num_ok, broken.num_errors) == (0, 2)
    assert "engine fell over" in broken.errors[0]
    target, lvl = level("no-usage", count=2, tokens=4, concurrency=2)
    counted = run(base, target, lvl)
    assert counted.num_ok == 2 and counted.output_tokens == 8  # one token per content chunk


def test_open_loop_and_time_cap(server: tuple[str, Seen]) -> None:
    base, _ = server
    target, lvl = level("tiny", count=5, tokens=3, rate=50.0)
    opened = run(base, target, lvl)
    assert (opened.num_ok, opened.rate, opened.label) == (5, 50.0, "rate=50/s")
    target, lvl = level("slow", count=4, concurrency=2, duration_s=0.4)
    started = time.perf_counter()
    capped = run(base, target, lvl)
    assert time.perf_counter() - started < 2.0
    assert (capped.num_ok, capped.num_errors, capped.num_incomplete) == (0, 0, 2)
    assert capped.duration_s == pytest.approx(0.4, abs=0.05)


def test_cli_end_to_end(server: tuple[str, Seen], tmp_path: Path) -> None:
    base, _ = server
    out = tmp_path / "bench.jsonl"
    argv = ["bench", base, "--concurrency", "1,2", "--requests", "3", "--output-tokens", "4"]
    args = build_parser().parse_args([*argv, "--prompt-tokens-range", "4:8", "--json", str(out)])
    assert run_bench(args) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["label"] for line in lines] == ["c=1", "c=2"]
    assert all(line["model"] == "tiny" and line["output_tokens"] == 12 for line in lines)
    assert [s.num_ok for s in read_jsonl(out)] == [3, 3]


def test_remote_url_needs_permission() -> None:
    args = build_parser().parse_args(["bench", "http://192.0.2.1:8000"])
    with pytest.raises(ConfigError, match="--allow-remote"):
        make_plan(args)
    args = build_parser().parse_args(["bench", "http://192.0.2.1:8000", "--allow-remote"])
    assert make_plan(args).target.url == "http://192.0.2.1:8000/v1/chat/completions"
    with pytest.raises(ConfigError):
        make_plan(build_parser().parse_args(["bench", "--concurrency", "0"]))
