"""One chat turn of the web product: store the question, send the chat's history to the tree,
stream and store the answer, then (after the first exchange) ask the model for a title.

``prepare_turn`` checks everything that can be refused before anything streams (ownership, input)
and returns a ``Turn``; ``Turn.events()`` yields the ChatEvents of CHAT_API.md. The user's message
is committed before generation starts; the answer row is created ``streaming`` and its content
written every ``FLUSH_EVERY_S`` seconds, ending ``complete``, ``interrupted`` (stop, disconnect) or
``failed``. ``Turn.stop()`` ends the answer at a user's request; a consumer that goes away
(cancellation) ends it too. Either way the request is cancelled on the tree.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import anyio
from sqlalchemy import delete, select, update

from llmtree.errors import ContextLengthExceeded, LlmTreeError, NodeUnavailable, Overloaded
from llmtree.gateway.apierror import ApiError, not_found
from llmtree.gateway.chat import ChatContext
from llmtree.gateway.db import Database
from llmtree.gateway.db.models import Chat, Message, User, utcnow
from llmtree.gateway.limits import Admission, RateLimited
from llmtree.gateway.prompting import DEFAULT_TITLE, clean_title, fallback_title, fit_history
from llmtree.gateway.sink import RequestStream
from llmtree.protocol import GenerateRequest, SamplingParams

logger = logging.getLogger(__name__)

MAX_CONTENT_CHARS = 32_000
CHAT_MAX_TOKENS = 512
DEFAULT_TEMPERATURE = 0.7
FLUSH_EVERY_S = 0.5
TITLE_MAX_TOKENS = 16
TITLE_TIMEOUT_S = 60.0
SYSTEM_PROMPT = "You are a helpful, friendly assistant. Answer clearly and concisely."
TITLE_PROMPT = (
    "Write a short title, at most six words, for a conversation that starts with the message "
    "below. Reply with the title only, no quotes.\n\nMessage: {message}"
)
POLITE = {
    "overloaded": "The service is busy right now; every model slot is taken. Please try again "
    "in a few seconds.",
    "queue_timeout": "Sorry, the answer did not start in time (the queue is long or a node was "
    "lost). Please try again.",
    "context_length": "This message is too long for the model's context window. Please shorten it.",
    "failed": "Sorry, the model failed while answering. Please try again.",
    "unavailable": "The model service cannot be reached right now. Please try again shortly.",
}


@dataclass(slots=True)
class ChatServices:
    """What a turn needs, built once by ``create_app``."""

    ctx: ChatContext
    db: Database
    max_model_len: int


async def owned_chat(db: Database, user: User, chat_id: str) -> Chat:
    """The user's chat ``chat_id``; 404 for a missing chat and for another user's."""
    if not re.fullmatch(r"[0-9a-f]{32}", chat_id):
        raise not_found("chat")
    async with db.session() as session:
        chat = await session.get(Chat, chat_id)
    if chat is None or chat.user_id != user.id:
        raise not_found("chat")
    return chat


def check_temperature(value: Any) -> float:
    if value is None:
        return DEFAULT_TEMPERATURE
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 2:
        raise ApiError(
            400, "invalid_request", "temperature must be a number from 0 to 2", param="temperature"
        )
    return float(value)


def check_content(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ApiError(
            400, "invalid_request", "content must be a non-empty string", param="content"
        )
    if len(value) > MAX_CONTENT_CHARS:
        raise ApiError(
            413, "message_too_long",
            f"the message has {len(value)} characters; the limit is {MAX_CONTENT_CHARS}",
            param="content",
        )  # fmt: skip
    return value


async def prepare_turn(
    services: ChatServices,
    user: User,
    chat_id: str,
    content: Any,
    regenerate: bool,
    temperature: Any,
) -> Turn:
    """Check ownership and input (ApiError when refused); nothing is stored yet."""
    chat = await owned_chat(services.db, user, chat_id)
    temp = check_temperature(temperature)
    if regenerate:
        async with services.db.session() as session:
            last_user = (
                await session.execute(
                    select(Message.id)
                    .where(Message.chat_id == chat.id, Message.role == "user")
                    .order_by(Message.id.desc())
                    .limit(1)
                )
            ).scalar_one_or_none()
        if last_user is None:
            raise ApiError(
                400, "invalid_request", "nothing to regenerate: the chat has no message yet"
            )
        return Turn(services, chat, None, temp, user=user)
    return Turn(services, chat, check_content(content), temp, user=user)


@dataclass
class Turn:
    services: ChatServices
    chat: Chat
    content: str | None
    """The new user message; None regenerates the answer to the last one."""
    temperature: float
    user: User | None = None
    """Whose limits and priority apply (gateway/limits.py)."""
    request_id: str = field(default_factory=lambda: f"chat-{uuid.uuid4().hex}")
    _admission: Admission | None = None
    _stream: RequestStream | None = None
    _stop_requested: bool = False

    def stop(self) -> None:
        """End the answer now (it is stored as interrupted)."""
        self._stop_requested = True
        if self._stream is not None:
            self._stream.stop()

    # -- storage ------------------------------------------------------------------------------
    async def _begin(self) -> tuple[Message | None, Message, list[dict[str, str]]]:
        """Store the question (or drop the answer being regenerated) and a streaming answer."""
        db = self.services.db
        async with db.session() as session, session.begin():
            user_message = None
            if self.content is None:
                last_user = (
                    await session.execute(
                        select(Message.id)
                        .where(Message.chat_id == self.chat.id, Message.role == "user")
                        .order_by(Message.id.desc())
                        .limit(1)
                    )
                ).scalar_one()
                await session.execute(
                    delete(Message).where(Message.chat_id == self.chat.id, Message.id > last_user)
                )
            else:
                user_message = Message(
                    chat_id=self.chat.id, role="user", content=self.content, status="complete"
                )
                session.add(user_message)
            await session.execute(
                update(Chat).where(Chat.id == self.chat.id).values(updated_at=utcnow())
            )
            await session.flush()
            rows = (
                await session.execute(
                    select(Message).where(Message.chat_id == self.chat.id).order_by(Message.id)
                )
            ).scalars()
            history = [{"role": "system", "content": SYSTEM_PROMPT}] + [
                {"role": m.role, "content": m.content}
                for m in rows
                if m.content and m.status != "failed"
            ]
            answer = Message(
                chat_id=self.chat.id,
                role="assistant",
                content="",
                status="streaming",
                owner=db.owner,
            )
            session.add(answer)
            await session.flush()
        return user_message, answer, history

    async def _save(self, answer: Message, **values: Any) -> None:
        for name, value in values.items():
            setattr(answer, name, value)
        async with self.services.db.session() as session, session.begin():
            await session.execute(update(Message).where(Message.id == answer.id).values(**values))

    # -- the tree -----------------------------------------------------------------------------
    async def _submit(
        self, request_id: str, messages: list[dict[str, str]], temperature: float, max_tokens: int
    ) -> RequestStream:
        ctx = self.services.ctx
        request = GenerateRequest(
            request_id=request_id,
            messages=messages,
            sampling=SamplingParams.from_wire(
                {"max_tokens": max_tokens, "temperature": temperature}
            ),
            sink=ctx.sink_uri,
            priority=self._admission.priority if self._admission is not None else 0,
        )
        stream = ctx.sink.open(request_id)
        try:
            await anyio.to_thread.run_sync(ctx.root.submit, request.pack())
        except BaseException:
            ctx.sink.close(request_id)
            raise
        return stream

    async def _cancel_on_tree(self, request_id: str) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await anyio.to_thread.run_sync(self.services.ctx.root.cancel, request_id)
            except LlmTreeError as error:
                logger.warning("cancel %s failed: %s", request_id, error)

    async def _submit_history(self, history: list[dict[str, str]]) -> RequestStream:
        """Submit with the newest history that fits; drops more turns on ContextLengthExceeded."""
        max_tokens = min(CHAT_MAX_TOKENS, self.services.max_model_len // 4)
        budget = self.services.max_model_len - max_tokens - 16
        for drop in range(0, 2 * len(history), 2):
            messages = fit_history(history, budget, drop)
            if messages is None:
                break
            try:
                return await self._submit(self.request_id, messages, self.temperature, max_tokens)
            except ContextLengthExceeded:
                logger.info("%s: history too long for the model; dropping a turn", self.request_id)
                self.request_id = f"chat-{uuid.uuid4().hex}"
        raise ContextLengthExceeded(POLITE["context_length"])

    # -- the turn -----------------------------------------------------------------------------
    async def events(self) -> AsyncGenerator[dict[str, Any], None]:
        limiter = self.services.ctx.limiter
        if limiter is not None and self.user is not None:
            try:
                self._admission = await limiter.admit(self.user)
            except RateLimited as error:  # nothing stored: the user may send it again later
                yield error.chat_event()
                return
        try:
            async with aclosing(self._events()) as events:  # closed at once on disconnect
                async for event in events:
                    yield event
        finally:
            if self._admission is not None:
                await self._admission.end()

    async def _events(self) -> AsyncGenerator[dict[str, Any], None]:
        user_message, answer, history = await self._begin()
        yield {
            "type": "start",
            "user_message": user_message.to_api() if user_message else None,
            "assistant_message": answer.to_api(),
        }
        parts: list[str] = []
        outcome: tuple[str, str | None, str | None] | None = None  # status, code, error
        from_tree = False
        try:
            try:
                if self._stop_requested:
                    raise _Stopped
                self._stream = stream = await self._submit_history(history)
            except _Stopped:
                outcome = ("interrupted", None, None)
            except Overloaded:
                outcome = ("failed", "overloaded", POLITE["overloaded"])
            except ContextLengthExceeded:
                outcome = ("failed", "context_length", POLITE["context_length"])
            except NodeUnavailable as error:
                logger.warning("%s: submit failed: %s", self.request_id, error.message)
                outcome = ("failed", "failed", POLITE["unavailable"])
            except LlmTreeError as error:
                logger.warning("%s: submit failed: %s", self.request_id, error.message)
                outcome = ("failed", "failed", POLITE["failed"])
            if outcome is None:
                if self._stop_requested:
                    stream.stop()
                flushed_at, flushed_len = time.monotonic(), 0
                async for event in stream.events(self.services.ctx.idle_timeout_s):
                    reason = event.get("finish_reason")
                    from_tree = reason is not None and not event.get("local")
                    if self._admission is not None:
                        await self._admission.observe(event)
                    if event["text"]:
                        parts.append(event["text"])
                        yield {"type": "delta", "text": event["text"]}
                    if reason is None:
                        if (
                            time.monotonic() - flushed_at >= FLUSH_EVERY_S
                            and len(parts) != flushed_len
                        ):
                            await self._save(answer, content="".join(parts))
                            flushed_at, flushed_len = time.monotonic(), len(parts)
                        continue
                    if reason in ("stop", "length"):
                        outcome = ("complete", None, None)
                    elif reason == "cancelled":
                        outcome = ("interrupted", None, None)
                    elif event.get("timeout") or event.get("code") == "queue_timeout":
                        outcome = ("failed", "queue_timeout", POLITE["queue_timeout"])
                    else:
                        logger.warning("%s: %s", self.request_id, event.get("error"))
                        outcome = ("failed", "failed", POLITE["failed"])
        finally:
            if self._stream is not None:
                self.services.ctx.sink.close(self._stream.request_id)
                if not from_tree:
                    await self._cancel_on_tree(self._stream.request_id)
            if outcome is None:  # the consumer went away (disconnect): keep what came
                with anyio.CancelScope(shield=True):
                    await self._save(
                        answer, content="".join(parts), status="interrupted", error=None
                    )
        assert outcome is not None
        status, code, reason = outcome
        await self._save(answer, content="".join(parts), status=status, error=reason)
        if code is not None:
            yield {"type": "error", "code": code, "message": reason, "message_obj": answer.to_api()}
        else:
            yield {"type": "done", "message": answer.to_api()}
        if status == "complete" and user_message is not None and self.chat.title == DEFAULT_TITLE:
            title = await self._make_title(user_message.content)
            chat = await self._set_title(title)
            if chat is not None:
                yield {"type": "title", "chat": chat.to_api()}

    async def _make_title(self, question: str) -> str:
        """A short title from the model (greedy); the question's first words if that fails."""
        request_id = f"title-{uuid.uuid4().hex}"
        messages = [{"role": "user", "content": TITLE_PROMPT.format(message=question[:600])}]
        stream: RequestStream | None = None
        parts: list[str] = []
        try:
            with anyio.fail_after(TITLE_TIMEOUT_S):
                stream = await self._submit(request_id, messages, 0.0, TITLE_MAX_TOKENS)
                async for event in stream.events(self.services.ctx.idle_timeout_s):
                    parts.append(event["text"])
                    if event.get("finish_reason") == "error":
                        parts.clear()
        except (LlmTreeError, TimeoutError) as error:
            logger.info("no title from the model (%s); using the first words", error)
        finally:
            if stream is not None:
                self.services.ctx.sink.close(request_id)
                if not stream.finished:
                    await self._cancel_on_tree(request_id)
        return clean_title("".join(parts)) or fallback_title(question)

    async def _set_title(self, title: str) -> Chat | None:
        async with self.services.db.session() as session, session.begin():
            chat = await session.get(Chat, self.chat.id)
            if chat is None or chat.title != DEFAULT_TITLE:  # deleted, or renamed meanwhile
                return None
            chat.title = title
            return chat


class _Stopped(Exception):
    pass
