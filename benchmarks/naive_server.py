"""Baseline (c): the naive design llmtree's seeds started from.

One request at a time through ``transformers`` ``model.generate()`` behind a web endpoint: a
FastAPI app whose ``POST /v1/chat/completions`` takes a lock, runs ``generate()`` with a
``TextIteratorStreamer`` and streams what it yields as OpenAI chunks (SSE, ending with a usage
chunk and ``data: [DONE]``), so the same load generator measures it as the real gateway. Every
other request waits for the lock. A client that goes away stops its generation.

Every ``generate()`` runs on one long-lived thread, the one that loaded the model. The usual
recipe (a new thread per request) is slower here for a reason that has nothing to do with the
design: libgomp keeps one OpenMP thread pool per thread that starts parallel work, and once a
process has more OpenMP threads than cores it stops spinning between parallel regions, so every
operator wakes a sleeping thread (on this VM 2-3x slower). The baseline should not lose to that.

    python benchmarks/naive_server.py --port 8100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import anyio
import torch
import uvicorn
from common import load_model
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

logger = logging.getLogger("naive")


class StopWhenSet(StoppingCriteria):
    """Ends ``generate()`` early once the client has gone away."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


def create_app(model: Any, tokenizer: Any, model_name: str, runner: ThreadPoolExecutor) -> FastAPI:
    app = FastAPI()
    lock = asyncio.Lock()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model"}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> StreamingResponse | JSONResponse:
        body = await request.json()
        text = tokenizer.apply_chat_template(
            body["messages"], tokenize=False, add_generation_prompt=True
        )
        max_tokens = int(body.get("max_tokens") or 256)
        min_tokens = max_tokens if body.get("ignore_eos") else int(body.get("min_tokens") or 0)
        temperature = body.get("temperature") or 0.0
        job = Job(model, tokenizer, runner, text, max_tokens, min_tokens, temperature)
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if not body.get("stream"):
            async with lock:
                try:
                    parts = [piece async for piece in job.pieces()]
                finally:
                    await job.close()
            message = {"role": "assistant", "content": "".join(parts)}
            choice = {"index": 0, "message": message, "finish_reason": "length"}
            return JSONResponse({"choices": [choice], "usage": job.usage()})
        return StreamingResponse(sse(job, lock, model_name, usage), media_type="text/event-stream")

    return app


class Job:
    """One ``generate()`` call on the runner thread, its text streamed through a
    TextIteratorStreamer."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        runner: ThreadPoolExecutor,
        text: str,
        max_tokens: int,
        min_tokens: int,
        temp: float,
    ) -> None:
        self.model, self.tokenizer, self.runner = model, tokenizer, runner
        self.inputs = tokenizer(text, return_tensors="pt")
        self.max_tokens, self.min_tokens, self.temperature = max_tokens, min_tokens, float(temp)
        self.stop = threading.Event()
        self.streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.output_tokens = 0
        self.error: str | None = None
        self.future: Future[None] | None = None

    def _generate(self) -> None:
        sampling: dict[str, Any] = {"do_sample": False}
        if self.temperature > 0:
            sampling = {"do_sample": True, "temperature": self.temperature}
        try:
            with torch.inference_mode():
                out = self.model.generate(
                    **self.inputs,
                    max_new_tokens=self.max_tokens,
                    min_new_tokens=self.min_tokens,
                    streamer=self.streamer,
                    stopping_criteria=StoppingCriteriaList([StopWhenSet(self.stop)]),
                    pad_token_id=self.tokenizer.pad_token_id,
                    **sampling,
                )
            self.output_tokens = int(out.shape[1] - self.inputs["input_ids"].shape[1])
        except Exception as error:  # the stream must end either way
            self.error = f"{type(error).__name__}: {error}"
            self.streamer.end()

    async def pieces(self) -> AsyncIterator[str]:
        """The text as generate() produces it; call ``close`` after, whatever happens."""
        self.future = self.runner.submit(self._generate)
        while True:
            piece = await anyio.to_thread.run_sync(next, self.streamer, None)
            if piece is None:
                break
            if piece:
                yield piece

    async def close(self) -> None:
        """Stop generate() if it still runs and wait for it to end (also when cancelled)."""
        self.stop.set()
        if self.future is not None and not self.future.done():
            with anyio.CancelScope(shield=True):
                await asyncio.wrap_future(self.future)

    def usage(self) -> dict[str, int]:
        prompt = int(self.inputs["input_ids"].shape[1])
        completion = self.output_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


async def sse(job: Job, lock: asyncio.Lock, model_name: str, usage: bool) -> AsyncIterator[str]:
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_name,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(body)}\n\n"

    async with lock:  # the naive part: one request at a time
        try:
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
            async for piece in job.pieces():
                yield chunk([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
        finally:
            await job.close()
    if job.error:
        error = {"message": job.error, "type": "server_error", "param": None, "code": None}
        yield f"data: {json.dumps({'error': error})}\n\n"
    else:
        yield chunk([{"index": 0, "delta": {}, "finish_reason": "length"}])
        if usage:
            yield chunk([], usage=job.usage())
    yield "data: [DONE]\n\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--dtype", help="bfloat16 or float32 (default: as llmtree)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s naive: %(message)s")
    runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
    model, tokenizer, info = runner.submit(load_model, args.dtype).result()
    logger.info("loaded %s (%s, %s threads)", info["source"], info["dtype"], info["threads"])
    app = create_app(model, tokenizer, "smollm2", runner)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
