"""``/api/auth/*``, ``/api/me*`` and ``/api/keys*``: accounts, sessions and API keys.

Bodies are small JSON objects checked by pydantic models; any failure is a 400 naming the field.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from llmtree.errors import InvalidRequest
from llmtree.gateway.apierror import ApiError, not_found
from llmtree.gateway.auth import Auth, hash_password, new_api_key, verify_password
from llmtree.gateway.body import read_json
from llmtree.gateway.db.models import ApiKey, User

SMALL_BODY_BYTES = 16_384
USERNAME = re.compile(r"^[A-Za-z0-9_.-]{3,32}$")
MAX_KEYS_PER_USER = 100

Model = TypeVar("Model", bound=BaseModel)


class Credentials(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(min_length=3, max_length=32)
    password: str = Field(min_length=8, max_length=256)

    @field_validator("username")
    @classmethod
    def _username(cls, value: str) -> str:
        if not USERNAME.match(value):
            raise ValueError("use 3-32 letters, digits, '_', '.' or '-'")
        return value


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(max_length=64)
    password: str = Field(max_length=256)


class PasswordChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    current_password: str = Field(max_length=256)
    new_password: str = Field(min_length=8, max_length=256)


class PasswordOnly(BaseModel):
    model_config = ConfigDict(extra="forbid")

    password: str = Field(max_length=256)


class KeyName(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)


async def parse_body(
    request: Request, model: type[Model], max_bytes: int = SMALL_BODY_BYTES
) -> Model:
    """The request's JSON body as ``model``; ApiError 400 (or 413 when too large) otherwise."""
    try:
        data: Any = await read_json(request, max_bytes)
    except InvalidRequest as error:
        status = 413 if "larger than" in error.message else 400
        raise ApiError(status, "invalid_request", error.message) from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request", "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first.get("loc", ())) or None
        message = str(first.get("msg", "invalid request"))
        raise ApiError(
            400, "invalid_request", f"{param}: {message}" if param else message, param=param
        ) from None


def make_accounts_router(auth: Auth) -> APIRouter:
    router = APIRouter()
    db = auth.db
    current_user = Depends(auth.current_user)

    @router.post("/api/auth/register", status_code=201)
    async def register(request: Request) -> dict[str, Any]:
        body = await parse_body(request, Credentials)
        hashed = await hash_password(body.password)
        try:
            async with db.session() as session, session.begin():
                user = User(username=body.username, password_hash=hashed)
                session.add(user)
                await session.flush()
        except IntegrityError:
            raise ApiError(
                409, "username_taken", f"the username {body.username!r} is taken", param="username"
            ) from None
        return {"user": user.to_api()}

    @router.post("/api/auth/login")
    async def login(request: Request) -> JSONResponse:
        body = await parse_body(request, Login)
        client = request.client.host if request.client else "-"
        wait = auth.limiter.retry_after(body.username, client)
        if wait:
            raise ApiError(
                429, "rate_limited", f"too many failed logins; try again in {wait} s",
                "rate_limit_error", headers={"Retry-After": str(wait)},
            )  # fmt: skip
        async with db.session() as session:
            user = (
                await session.execute(select(User).where(User.username == body.username))
            ).scalar_one_or_none()
        if not await verify_password(body.password, user.password_hash if user else None):
            auth.limiter.failed(body.username, client)
            raise ApiError(
                401, "invalid_credentials", "wrong username or password", "authentication_error"
            )
        assert user is not None
        auth.limiter.succeeded(body.username, client)
        token, csrf = auth.issue(user)
        response = JSONResponse({"user": user.to_api()})
        auth.set_cookies(request, response, token, csrf)
        return response

    @router.post("/api/auth/logout", status_code=204)
    async def logout(user: User = current_user) -> Response:
        await auth.bump_version(user.id)
        response = Response(status_code=204)
        auth.clear_cookies(response)
        return response

    @router.get("/api/me")
    async def me(user: User = current_user) -> dict[str, Any]:
        return {"user": user.to_api()}

    @router.post("/api/me/password", status_code=204)
    async def change_password(request: Request, user: User = current_user) -> Response:
        body = await parse_body(request, PasswordChange)
        if not await verify_password(body.current_password, user.password_hash):
            raise ApiError(
                401, "invalid_credentials", "the current password is wrong",
                "authentication_error", param="current_password",
            )  # fmt: skip
        hashed = await hash_password(body.new_password)
        async with db.session() as session, session.begin():
            row = await session.get(User, user.id)
            if row is None:
                raise ApiError(401, "not_authenticated", "log in first", "authentication_error")
            row.password_hash = hashed
            row.token_version += 1
        # the session that changed it goes on: a fresh token with the new version
        row.token_version = user.token_version + 1
        token, csrf = auth.issue(row)
        response = Response(status_code=204)
        auth.set_cookies(request, response, token, csrf)
        return response

    @router.delete("/api/me", status_code=204)
    async def delete_me(request: Request, user: User = current_user) -> Response:
        body = await parse_body(request, PasswordOnly)
        if not await verify_password(body.password, user.password_hash):
            raise ApiError(
                401, "invalid_credentials", "the password is wrong", "authentication_error",
                param="password",
            )  # fmt: skip
        async with db.session() as session, session.begin():
            await session.execute(delete(User).where(User.id == user.id))
        response = Response(status_code=204)
        auth.clear_cookies(response)
        return response

    @router.get("/api/keys")
    async def list_keys(user: User = current_user) -> dict[str, Any]:
        async with db.session() as session:
            keys = (
                await session.execute(
                    select(ApiKey).where(ApiKey.user_id == user.id).order_by(ApiKey.id)
                )
            ).scalars()
            return {"keys": [key.to_api() for key in keys]}

    @router.post("/api/keys", status_code=201)
    async def create_key(request: Request, user: User = current_user) -> dict[str, Any]:
        body = await parse_body(request, KeyName)
        key, secret = await create_api_key(auth, user.id, body.name.strip() or "key")
        return {"key": key.to_api(), "secret": secret}

    @router.delete("/api/keys/{key_id}", status_code=204)
    async def revoke_key(key_id: str, user: User = current_user) -> Response:
        if not key_id.isdigit() or len(key_id) > 18:
            raise not_found("key")
        async with db.session() as session, session.begin():
            result = await session.execute(
                delete(ApiKey).where(ApiKey.id == int(key_id), ApiKey.user_id == user.id)
            )
        if not getattr(result, "rowcount", 0):
            raise not_found("key")
        return Response(status_code=204)

    return router


async def create_api_key(auth: Auth, user_id: int, name: str) -> tuple[ApiKey, str]:
    """A new key for ``user_id``: (its row, the secret to show once)."""
    secret, prefix, hashed = new_api_key()
    async with auth.db.session() as session, session.begin():
        count = len(
            (await session.execute(select(ApiKey.id).where(ApiKey.user_id == user_id))).all()
        )
        if count >= MAX_KEYS_PER_USER:
            raise ApiError(400, "too_many_keys", f"at most {MAX_KEYS_PER_USER} keys per user")
        key = ApiKey(user_id=user_id, name=name, prefix=prefix, key_hash=hashed)
        session.add(key)
        await session.flush()
    return key, secret
