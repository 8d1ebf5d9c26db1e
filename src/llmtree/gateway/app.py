"""The HTTP gateway: ``create_app(settings)`` builds the FastAPI app with its dependencies.

Routes: the OpenAI surface (``chat.py``), health (``/healthz``, ``/readyz``), the directory
(``/api/nodes``) and the web page at ``/``. Every error leaves in the OpenAI error shape.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmtree.config import Settings
from llmtree.errors import LlmTreeError, Overloaded
from llmtree.gateway.accounts import make_accounts_router
from llmtree.gateway.apierror import ApiError
from llmtree.gateway.auth import Auth
from llmtree.gateway.chat import ChatContext, make_router
from llmtree.gateway.chats import make_chats_router
from llmtree.gateway.db import Database, gateway_owner, prepare_database
from llmtree.gateway.limits import Limiter
from llmtree.gateway.metrics import mount_metrics
from llmtree.gateway.root_client import RootClient
from llmtree.gateway.sink import SinkServer
from llmtree.gateway.turn import ChatServices
from llmtree.gateway.web import mount_web
from llmtree.gateway.ws import make_ws_router

logger = logging.getLogger(__name__)


def _error(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


def create_app(settings: Settings, root: RootClient | None = None) -> FastAPI:
    root_client = root or RootClient(settings)
    sink_server = SinkServer(settings.sink_host)
    owner = gateway_owner(settings.gateway_host, settings.gateway_port)
    db = Database(settings.db_url, owner)
    auth = Auth(settings, db)  # refuses a missing or short jwt_secret outside dev mode
    prepare_database(settings.db_url, owner)  # migrations; a bad database fails here, in one line
    limiter = Limiter(settings)  # per-user limits by tier, response cache (Redis or in-process)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 200
        await db.start()
        sink_uri = await anyio.to_thread.run_sync(sink_server.start)
        ctx = ChatContext(
            root=root_client,
            sink=sink_server.sink,
            sink_uri=sink_uri,
            default_model=settings.model,
            idle_timeout_s=settings.request_timeout_s,
            max_body_bytes=settings.max_body_bytes,
            limiter=limiter,
        )
        app.include_router(make_router(ctx), dependencies=[Depends(auth.api_key_user)])
        services = ChatServices(ctx=ctx, db=db, max_model_len=settings.max_model_len)
        app.include_router(make_accounts_router(auth))
        app.include_router(make_chats_router(auth, services))
        app.include_router(make_ws_router(auth, services))
        logger.info("gateway ready; event sink at %s", sink_uri)
        try:
            yield
        finally:
            sink_server.stop()
            root_client.close()
            await limiter.close()
            await db.close()

    app = FastAPI(title="llmtree", version="0.1.0", lifespan=lifespan)
    mount_metrics(app, root_client, sink_server.sink)

    @app.exception_handler(LlmTreeError)
    async def on_llmtree_error(request: Request, error: LlmTreeError) -> JSONResponse:
        headers = {"Retry-After": "1"} if isinstance(error, Overloaded) else None
        return JSONResponse(error.to_openai(), status_code=error.http_status, headers=headers)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return _error(error.status_code, str(error.detail), kind)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error(
            400, str(error.errors()[0].get("msg", "invalid request")), "invalid_request_error"
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=None)
    async def readyz() -> dict[str, Any] | JSONResponse:
        try:
            status = await anyio.to_thread.run_sync(root_client.status)
        except LlmTreeError as error:
            return _error(503, f"root not reachable: {error.message}", "service_unavailable")
        if not status.get("children"):
            return _error(503, "the root has no serving nodes yet", "service_unavailable")
        return {"status": "ready", "root": status["name"], "children": status["children"]}

    @app.get("/api/nodes")
    async def api_nodes() -> dict[str, Any]:
        nodes = await anyio.to_thread.run_sync(root_client.list_nodes)
        return {"nodes": [n.to_dict() for n in nodes]}

    @app.get("/api/nodes/{name}")
    async def api_node(name: str) -> dict[str, Any]:
        record = await anyio.to_thread.run_sync(root_client.lookup, name)
        result: dict[str, Any] = record.to_dict()
        return result

    mount_web(app)
    return app
