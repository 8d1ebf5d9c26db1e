"""``WS /api/chats/{id}/ws``: the chat stream over a WebSocket.

The handshake needs the session cookie and an ``Origin`` equal to the ``Host`` the gateway is
reached at (a WebSocket is not covered by SameSite or CSRF headers). The client sends
``{"type": "send", "content", "temperature"?}``, ``{"type": "regenerate", "temperature"?}`` or
``{"type": "stop"}``; the server answers with ChatEvent text frames. One generation at a time per
socket; a socket that closes stops its generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from llmtree.gateway.apierror import ApiError
from llmtree.gateway.auth import Auth
from llmtree.gateway.chats import MESSAGE_BODY_BYTES
from llmtree.gateway.turn import ChatServices, Turn, owned_chat, prepare_turn

logger = logging.getLogger(__name__)

POLICY_VIOLATION = 1008


def _error(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, "message_obj": None}


def same_origin(websocket: WebSocket) -> bool:
    origin, host = websocket.headers.get("origin"), websocket.headers.get("host")
    return bool(origin and host and urlsplit(origin).netloc.lower() == host.lower())


def make_ws_router(auth: Auth, services: ChatServices) -> APIRouter:
    router = APIRouter()

    @router.websocket("/api/chats/{chat_id}/ws")
    async def chat_ws(websocket: WebSocket, chat_id: str) -> None:
        if not same_origin(websocket):
            await websocket.close(POLICY_VIOLATION, "cross-origin WebSocket refused")
            return
        try:
            user, _ = await auth.session_user(dict(websocket.cookies))
            await owned_chat(services.db, user, chat_id)
        except ApiError as error:
            await websocket.close(POLICY_VIOLATION, error.message)
            return
        await websocket.accept()
        turn: Turn | None = None
        task: asyncio.Task[None] | None = None

        async def run(current: Turn) -> None:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                async with contextlib.aclosing(current.events()) as events:
                    async for event in events:
                        await websocket.send_json(event)

        try:
            while True:
                text = await websocket.receive_text()
                if len(text) > MESSAGE_BODY_BYTES:
                    await websocket.send_json(_error("invalid_request", "the frame is too large"))
                    continue
                try:
                    data = json.loads(text)
                except json.JSONDecodeError:
                    data = None
                kind = data.get("type") if isinstance(data, dict) else None
                if kind == "stop":
                    if turn is not None and task is not None and not task.done():
                        turn.stop()
                    continue
                if kind not in ("send", "regenerate"):
                    await websocket.send_json(
                        _error("invalid_request", 'send {"type": "send"|"regenerate"|"stop"}')
                    )
                    continue
                assert isinstance(data, dict)
                if task is not None and not task.done():
                    await websocket.send_json(
                        _error("busy", "An answer is still being written; stop it or wait.")
                    )
                    continue
                try:
                    turn = await prepare_turn(
                        services, user, chat_id, data.get("content"), kind == "regenerate",
                        data.get("temperature"),
                    )  # fmt: skip
                except ApiError as error:
                    await websocket.send_json(_error(error.code, error.message))
                    continue
                task = asyncio.create_task(run(turn))
        except WebSocketDisconnect:
            pass
        finally:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    return router
