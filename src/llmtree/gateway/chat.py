"""``POST /v1/chat/completions`` and ``GET /v1/models``: the OpenAI-compatible surface.

Lifecycle: validate -> open a sink stream -> ``root.submit`` (in a thread) -> read the stream's
ordered events -> SSE chunks or one JSON answer. A client that goes away cancels the request.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from llmtree.errors import EngineError, LlmTreeError, NotFound
from llmtree.gateway.body import read_json
from llmtree.gateway.cache import CACHE_HEADER, cache_key, replay_stream
from llmtree.gateway.limits import Admission, Limiter
from llmtree.gateway.root_client import RootClient
from llmtree.gateway.schemas import chat_request_openapi, parse_chat_request
from llmtree.gateway.sink import EventSink, RequestStream
from llmtree.protocol import GenerateRequest, SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 512
MODELS_TTL_S = 5.0


@dataclass(slots=True)
class ChatContext:
    """What the chat routes need, built once by ``create_app``."""

    root: RootClient
    sink: EventSink
    sink_uri: str
    default_model: str
    idle_timeout_s: float
    max_body_bytes: int
    models: tuple[float, list[str]] = (0.0, [])
    """(monotonic time read, model names) from the directory; re-read every few seconds."""
    limiter: Limiter | None = None
    """Per-user limits, tiers and the response cache (gateway/limits.py)."""


def _finish(reason: str) -> str:
    return "stop" if reason == "cancelled" else reason


def make_router(ctx: ChatContext) -> APIRouter:
    router = APIRouter()

    async def known_models() -> list[str]:
        read_at, names = ctx.models
        if names and time.monotonic() - read_at < MODELS_TTL_S:
            return names
        try:
            nodes = await anyio.to_thread.run_sync(ctx.root.list_nodes)
        except LlmTreeError:
            return [ctx.default_model]
        names = sorted({n.model for n in nodes if n.model}) or [ctx.default_model]
        ctx.models = (time.monotonic(), names)
        return names

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "llmtree"}
                for name in await known_models()
            ],
        }

    @router.post("/v1/chat/completions", response_model=None, openapi_extra=chat_request_openapi())
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        chat = parse_chat_request(await read_json(request, ctx.max_body_bytes))
        sampling = SamplingParams.from_wire(chat.sampling_wire(DEFAULT_MAX_TOKENS))
        models = await known_models()
        if chat.model and chat.model not in models and chat.model != ctx.default_model:
            raise NotFound(f"model {chat.model!r} does not exist; try one of {models}", "model")
        model = chat.model or models[0]
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        generate = GenerateRequest(
            request_id=request_id,
            messages=[m.as_wire() for m in chat.messages],
            sampling=sampling,
            sink=ctx.sink_uri,
        )
        admission = await _admit(ctx, request, generate, model)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        if admission is not None and admission.cache_key is not None:
            cached = await admission.limiter.cache_get(admission.cache_key)
            headers[CACHE_HEADER] = "miss" if cached is None else "hit"
            if cached is not None:  # replayed: nothing reaches the tree
                await admission.end()
                stream, admission = replay_stream(request_id, cached), None
        if headers.get(CACHE_HEADER) != "hit":
            stream = ctx.sink.open(request_id)
            try:
                await anyio.to_thread.run_sync(ctx.root.submit, generate.pack())
            except BaseException:
                ctx.sink.close(request_id)
                if admission is not None:
                    await admission.end()
                raise
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return StreamingResponse(
                _sse(ctx, stream, model, include_usage, admission),
                media_type="text/event-stream",
                headers=headers,
            )
        cache = {k: v for k, v in headers.items() if k == CACHE_HEADER}
        return JSONResponse(await _collect(ctx, stream, model, admission), headers=cache)

    return router


async def _admit(
    ctx: ChatContext, request: Request, generate: GenerateRequest, model: str
) -> Admission | None:
    """The caller's limits (429 when one is reached), priority and cache key."""
    user = getattr(request.state, "user", None)
    if ctx.limiter is None or user is None:
        return None
    admission = await ctx.limiter.admit(user)
    generate.priority = admission.priority
    if ctx.limiter.cache_on:
        admission.cache_key = cache_key(model, generate.messages, generate.sampling)
    return admission


async def _cancel(ctx: ChatContext, request_id: str) -> None:
    try:
        await anyio.to_thread.run_sync(ctx.root.cancel, request_id)
    except LlmTreeError as error:
        logger.warning("cancel %s failed: %s", request_id, error)


async def _collect(
    ctx: ChatContext, stream: RequestStream, model: str, admission: Admission | None = None
) -> dict[str, Any]:
    parts: list[str] = []
    final: dict[str, Any] = {}
    try:
        async for event in stream.events(ctx.idle_timeout_s):
            parts.append(event["text"])
            final = event
            if admission is not None:
                await admission.observe(event)
    finally:
        if admission is not None:
            await admission.end()
        ctx.sink.close(stream.request_id)
        if not stream.finished:
            await _cancel(ctx, stream.request_id)
    if final.get("finish_reason") == "error":
        raise EngineError(f"generation failed: {final.get('error') or 'unknown error'}")
    return {
        "id": stream.request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(parts)},
                "finish_reason": _finish(final.get("finish_reason") or "stop"),
            }
        ],
        "usage": final.get("usage") or {},
        "node": final.get("node"),
    }


async def _sse(
    ctx: ChatContext,
    stream: RequestStream,
    model: str,
    include_usage: bool,
    admission: Admission | None = None,
) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> str:
        body = {
            "id": stream.request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

    # a content chunk is ``chunk({"content": text}, None)``, built around the one changing part
    content_prefix, _, content_suffix = chunk({"content": ""}, None).rpartition('""')
    try:
        yield chunk({"role": "assistant", "content": ""}, None)
        async for event in stream.events(ctx.idle_timeout_s):
            if admission is not None:
                await admission.observe(event)
            reason = event.get("finish_reason")
            if reason == "error":
                error = EngineError(f"generation failed: {event.get('error') or 'unknown'}")
                yield f"data: {json.dumps(error.to_openai())}\n\n"
                break
            if event["text"] or reason is None:
                yield content_prefix + json.dumps(event["text"]) + content_suffix
            if reason is not None:
                yield chunk({}, _finish(reason))
                if include_usage and event.get("usage"):
                    body = {
                        "id": stream.request_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": event["usage"],
                    }
                    yield f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if admission is not None:
            await admission.end()
        ctx.sink.close(stream.request_id)
        if not stream.finished:
            with anyio.CancelScope(shield=True):
                await _cancel(ctx, stream.request_id)
