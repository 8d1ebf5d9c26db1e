"""``/api/chats*``: a user's chats and their messages; ``POST /api/chats/{id}/messages`` streams
the answer as Server-Sent Events (``data: {ChatEvent}``); a client that goes away stops it."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, select
from starlette.types import Receive, Scope, Send

from llmtree.gateway.accounts import parse_body
from llmtree.gateway.auth import Auth
from llmtree.gateway.db.models import Chat, Message, User, utcnow
from llmtree.gateway.prompting import DEFAULT_TITLE
from llmtree.gateway.turn import (
    MAX_CONTENT_CHARS,
    ChatServices,
    Turn,
    owned_chat,
    prepare_turn,
)

MESSAGE_BODY_BYTES = 4 * MAX_CONTENT_CHARS + 4096
"""A message body may hold the largest message even if every character is JSON-escaped."""


class NewChat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(default=None, min_length=1, max_length=200)


class Rename(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=200)


class SendBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: str | None = None
    regenerate: bool = False
    temperature: float | None = None


def sse(event: dict[str, Any]) -> str:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n"


async def sse_events(turn: Turn) -> AsyncGenerator[str, None]:
    async with aclosing(turn.events()) as events:
        async for event in events:
            yield sse(event)


class TurnStream(StreamingResponse):
    """SSE of one turn; however the response ends (done, disconnect), the turn is closed, so
    its answer is stored and the request is cancelled on the tree."""

    def __init__(self, turn: Turn) -> None:
        self._events = sse_events(turn)
        super().__init__(
            self._events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._events.aclose()


def make_chats_router(auth: Auth, services: ChatServices) -> APIRouter:
    router = APIRouter()
    db = services.db
    current_user = Depends(auth.current_user)

    @router.get("/api/chats")
    async def list_chats(user: User = current_user) -> dict[str, Any]:
        async with db.session() as session:
            chats = (
                await session.execute(
                    select(Chat)
                    .where(Chat.user_id == user.id)
                    .order_by(Chat.updated_at.desc(), Chat.created_at.desc())
                )
            ).scalars()
            return {"chats": [chat.to_api() for chat in chats]}

    @router.post("/api/chats", status_code=201)
    async def create_chat(request: Request, user: User = current_user) -> dict[str, Any]:
        has_body = request.headers.get("content-length", "0") != "0"
        body = await parse_body(request, NewChat) if has_body else NewChat()
        title = (body.title or "").strip() or DEFAULT_TITLE
        async with db.session() as session, session.begin():
            now = utcnow()
            chat = Chat(
                id=uuid.uuid4().hex, user_id=user.id, title=title, created_at=now, updated_at=now
            )
            session.add(chat)
        return {"chat": chat.to_api()}

    @router.get("/api/chats/{chat_id}")
    async def get_chat(chat_id: str, user: User = current_user) -> dict[str, Any]:
        chat = await owned_chat(db, user, chat_id)
        async with db.session() as session:
            messages = (
                await session.execute(
                    select(Message).where(Message.chat_id == chat.id).order_by(Message.id)
                )
            ).scalars()
            return {"chat": chat.to_api(), "messages": [m.to_api() for m in messages]}

    @router.patch("/api/chats/{chat_id}")
    async def rename_chat(
        request: Request, chat_id: str, user: User = current_user
    ) -> dict[str, Any]:
        chat = await owned_chat(db, user, chat_id)
        body = await parse_body(request, Rename)
        async with db.session() as session, session.begin():
            row = await session.get(Chat, chat.id)
            if row is None:
                return {"chat": chat.to_api()}
            row.title = body.title.strip() or DEFAULT_TITLE
            row.updated_at = utcnow()
        return {"chat": row.to_api()}

    @router.delete("/api/chats/{chat_id}", status_code=204)
    async def delete_chat(chat_id: str, user: User = current_user) -> Response:
        chat = await owned_chat(db, user, chat_id)
        async with db.session() as session, session.begin():
            await session.execute(delete(Chat).where(Chat.id == chat.id))
        return Response(status_code=204)

    @router.post("/api/chats/{chat_id}/messages")
    async def send_message(
        request: Request, chat_id: str, user: User = current_user
    ) -> StreamingResponse:
        await owned_chat(db, user, chat_id)
        body = await parse_body(request, SendBody, MESSAGE_BODY_BYTES)
        turn = await prepare_turn(
            services, user, chat_id, body.content, body.regenerate, body.temperature
        )
        return TurnStream(turn)

    return router
