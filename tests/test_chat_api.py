"""The chat product's API against real parts: one tree (root + a worker with the real model) and
two gateways on it, one on SQLite and one on a private PostgreSQL server; every history test runs
on both. Also a gateway killed with SIGKILL mid-answer, and the start-up secret check."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from llmtree.config import Settings
from llmtree.gateway.db import Database
from llmtree.gateway.db.models import ApiKey, Chat, Message

from chatapi import Gateway, WebUser, answer_text
from cluster import REPO, Proc, free_port, llmtree_env, wait_for
from pgserver import PrivatePostgres

pytestmark = [pytest.mark.ldap, pytest.mark.model, pytest.mark.slow]

ROOT = "chatroot"
LONG_ASK = "Write a very long story about a dragon who learns to bake bread. Make it detailed."


@pytest.fixture(scope="module")
def gateways(
    slapd_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Gateway]]:
    """One tree (the worker's context is 1024 tokens, smaller than the gateways think, so the
    retry on ContextLengthExceeded is exercised) and a gateway per database."""
    logs = tmp_path_factory.mktemp("chat-logs")
    var = tmp_path_factory.mktemp("chat-var")
    tree_env = {
        "LLMTREE_ROOT_NAME": ROOT,
        "LLMTREE_ROOT_PORT": str(free_port()),
        "LLMTREE_VAR_DIR": str(var),
    }
    env = llmtree_env(slapd_settings, **tree_env)
    procs = [Proc("chatroot", ["node", "--name", ROOT, "--root"], env, logs)]
    wait_for(lambda: "ready at" in procs[0].output(), 60, "root")
    worker_env = {**env, "LLMTREE_MAX_MODEL_LEN": "1024", "LLMTREE_SLOTS": "8"}
    procs.append(Proc("chat-w1", ["node", "--name", "chat-w1", "--parent", ROOT], worker_env, logs))
    postgres = PrivatePostgres()
    started: list[Gateway] = []
    try:
        pg_url = postgres.start()
        gws = {
            "sqlite": Gateway(
                "gw-sqlite", slapd_settings, logs, f"sqlite+aiosqlite:///{var}/chat.db", **tree_env
            ),
            "postgresql": Gateway("gw-pg", slapd_settings, logs, pg_url, **tree_env),
        }
        for gw in gws.values():
            started.append(gw.start())
        yield gws
    finally:
        for gw in started:
            gw.stop()
        for proc in reversed(procs):
            proc.stop()
        postgres.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def gw(request: pytest.FixtureRequest, gateways: dict[str, Gateway]) -> Gateway:
    return gateways[request.param]


@pytest.fixture
def alice(gw: Gateway) -> Iterator[WebUser]:
    user = WebUser(gw.url).signup()
    yield user
    user.close()


def db_query(gw: Gateway, statement: Any) -> list[Any]:
    """Read the gateway's database directly (what a restart would find)."""

    async def run() -> list[Any]:
        db = Database(gw.database_url)
        try:
            async with db.session() as session:
                return list((await session.execute(statement)).all())
        finally:
            await db.close()

    return asyncio.run(run())


def ws_connect(
    gw: Gateway, user: WebUser, chat_id: str, origin: str | None = None
) -> ClientConnection:
    ws_url = gw.url.replace("http://", "ws://") + f"/api/chats/{chat_id}/ws"
    headers = {"Cookie": user.cookie_header(), "Origin": origin or gw.url}
    return connect(ws_url, additional_headers=headers, open_timeout=10)


def ws_until(ws: ClientConnection, *types: str, timeout_s: float = 120) -> list[dict[str, Any]]:
    """Frames up to and including the first whose type is in ``types``."""
    frames: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while True:
        frame = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        frames.append(frame)
        if frame["type"] in types:
            return frames


# -- accounts ------------------------------------------------------------------------------------
def test_register_login_me_and_cookies(gw: Gateway) -> None:
    user = WebUser(gw.url)
    assert user.client.get("/api/me").json()["error"]["code"] == "not_authenticated"
    created = user.register()
    assert created["username"] == user.username and created["created_at"].endswith("Z")
    again = user.client.post(
        "/api/auth/register", json={"username": user.username, "password": "another pw 1"}
    )
    assert again.status_code == 409 and again.json()["error"]["code"] == "username_taken"
    bad = user.client.post(
        "/api/auth/login", json={"username": user.username, "password": "wrong password"}
    )
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_credentials"
    r = user.client.post(
        "/api/auth/login", json={"username": user.username, "password": user.password}
    )
    assert r.status_code == 200
    cookies = {c.split("=", 1)[0]: c.lower() for c in r.headers.get_list("set-cookie")}
    assert (
        "httponly" in cookies["llmtree_session"] and "samesite=strict" in cookies["llmtree_session"]
    )
    assert (
        "httponly" not in cookies["llmtree_csrf"] and "samesite=strict" in cookies["llmtree_csrf"]
    )
    assert user.client.get("/api/me").json()["user"]["id"] == created["id"]
    user.client.headers["X-CSRF-Token"] = user.client.cookies["llmtree_csrf"]
    assert user.client.post("/api/auth/logout").status_code == 204
    assert user.client.get("/api/me").status_code == 401


@pytest.mark.parametrize(
    "body",
    [
        {"username": "ab", "password": "long enough"},
        {"username": "bad name!", "password": "long enough"},
        {"username": "x" * 33, "password": "long enough"},
        {"username": "fine_name", "password": "short"},
        {"username": "fine_name", "password": "p" * 257},
        {"username": "fine_name", "password": "long enough", "admin": True},
        {"username": 5, "password": "long enough"},
    ],
)
def test_register_refuses_bad_input(gateways: dict[str, Gateway], body: dict[str, Any]) -> None:
    r = httpx.post(f"{gateways['sqlite'].url}/api/auth/register", json=body)
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_csrf_is_required_for_changes(gw: Gateway, alice: WebUser) -> None:
    token = alice.client.headers.pop("X-CSRF-Token")
    for headers in ({}, {"X-CSRF-Token": "forged"}):
        r = alice.client.post("/api/chats", json={}, headers=headers)
        assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed"
    assert alice.client.get("/api/chats").status_code == 200  # reads need no token
    alice.client.headers["X-CSRF-Token"] = token
    assert alice.client.post("/api/chats", json={}).status_code == 201


def test_login_is_rate_limited(gw: Gateway) -> None:
    user = WebUser(gw.url)
    user.register()
    wrong = {"username": user.username, "password": "not the password"}
    codes = [user.client.post("/api/auth/login", json=wrong).status_code for _ in range(6)]
    assert codes == [401] * 5 + [429]
    right = user.client.post(
        "/api/auth/login", json={"username": user.username, "password": user.password}
    )
    assert right.status_code == 429 and right.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(right.headers["retry-after"]) <= 60
    other = WebUser(gw.url)  # another account from the same address is not held up
    other.register()
    other.login()


def test_password_change_ends_older_sessions(gw: Gateway, alice: WebUser) -> None:
    second = WebUser(gw.url, alice.username, alice.password).login()
    r = alice.client.post(
        "/api/me/password", json={"current_password": "nope nope", "new_password": "brand new pw"}
    )
    assert r.status_code == 401
    r = alice.client.post(
        "/api/me/password",
        json={"current_password": alice.password, "new_password": "brand new pw"},
    )
    assert r.status_code == 204
    assert second.client.get("/api/me").status_code == 401  # the other session ended
    assert alice.client.get("/api/me").status_code == 200  # this one got a fresh cookie
    old = httpx.post(
        f"{gw.url}/api/auth/login", json={"username": alice.username, "password": alice.password}
    )
    assert old.status_code == 401
    alice.password = "brand new pw"
    WebUser(gw.url, alice.username, alice.password).login()


# -- API keys ------------------------------------------------------------------------------------
def test_api_keys_guard_v1(gw: Gateway, alice: WebUser) -> None:
    assert httpx.get(f"{gw.url}/v1/models").json()["error"]["code"] == "invalid_api_key"
    created = alice.client.post("/api/keys", json={"name": "laptop"})
    assert created.status_code == 201
    secret, key = created.json()["secret"], created.json()["key"]
    assert (
        secret.startswith("llmt-") and secret.startswith(key["prefix"]) and key["name"] == "laptop"
    )
    listed = alice.client.get("/api/keys").json()["keys"]
    assert [k["id"] for k in listed] == [key["id"]] and secret not in json.dumps(listed)
    auth = {"Authorization": f"Bearer {secret}"}
    assert httpx.get(f"{gw.url}/v1/models", headers=auth).status_code == 200
    for bad in ("Bearer llmt-nope", "Basic abc", secret):
        r = httpx.get(f"{gw.url}/v1/models", headers={"Authorization": bad})
        assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
    body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
    assert (
        httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=auth, timeout=60).status_code
        == 200
    )
    assert alice.client.get("/api/keys").json()["keys"][0]["last_used_at"] is not None
    mallory = WebUser(gw.url).signup()
    assert mallory.client.delete(f"/api/keys/{key['id']}").status_code == 404
    assert alice.client.delete(f"/api/keys/{key['id']}").status_code == 204
    assert httpx.get(f"{gw.url}/v1/models", headers=auth).status_code == 401
    assert db_query(gw, select(ApiKey.key_hash).where(ApiKey.key_hash.contains("llmt-"))) == []


# -- chats -----------------------------------------------------------------------------------------
def test_answer_is_stored_titled_and_remembered(gw: Gateway, alice: WebUser) -> None:
    chat_id = alice.new_chat()
    events = alice.send(chat_id, "What is the capital of France?")
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-2:] == ["done", "title"], kinds
    start, done, title = events[0], events[-2], events[-1]
    assert start["user_message"]["content"] == "What is the capital of France?"
    assert start["assistant_message"]["status"] == "streaming"
    assert kinds.count("delta") > 1 and done["message"]["status"] == "complete"
    assert done["message"]["content"] == answer_text(events)
    assert title["chat"]["id"] == chat_id and title["chat"]["title"] not in ("", "New chat")
    assert "Paris" in answer_text(events)
    follow = alice.send(chat_id, "What is the population of that city?")  # needs the first answer
    assert "Paris" in answer_text(follow), answer_text(follow)
    assert [e["type"] for e in follow][-1] == "done"  # the title is made once
    stored = alice.chat(chat_id)
    assert stored["chat"]["title"] == title["chat"]["title"]
    assert [(m["role"], m["status"]) for m in stored["messages"]] == [
        ("user", "complete"),
        ("assistant", "complete"),
    ] * 2
    assert stored["messages"][3]["content"] == answer_text(follow)
    newer = alice.new_chat(title="Second")
    alice.client.patch(f"/api/chats/{newer}", json={"title": "Renamed"})
    listed = alice.client.get("/api/chats").json()["chats"]
    assert [c["id"] for c in listed] == [newer, chat_id] and listed[0]["title"] == "Renamed"


def test_regenerate_replaces_the_last_answer(gw: Gateway, alice: WebUser) -> None:
    chat_id = alice.new_chat(title="fixed")
    first = alice.send(chat_id, "What is the capital of France?")
    assert "Paris" in answer_text(first)
    old_id = first[-1]["message"]["id"]
    again = alice.send(chat_id, regenerate=True, temperature=0.9)
    assert again[0]["type"] == "start" and again[0]["user_message"] is None
    assert again[-1]["type"] == "done"  # a chat with a title of its own gets no title event
    messages = alice.chat(chat_id)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["id"] != old_id and messages[1]["content"] == answer_text(again)
    empty = alice.new_chat()
    r = alice.client.post(f"/api/chats/{empty}/messages", json={"regenerate": True})
    assert r.status_code == 400


def test_long_history_is_trimmed_to_the_context(gw: Gateway, alice: WebUser) -> None:
    chat_id = alice.new_chat(title="long")

    async def seed() -> None:
        db = Database(gw.database_url)
        try:
            async with db.session() as session, session.begin():
                for i in range(6):
                    text = f"Turn {i}: " + "the quick brown fox jumps over the lazy dog " * 60
                    session.add(
                        Message(chat_id=chat_id, role="user", content=text, status="complete")
                    )
                    session.add(
                        Message(chat_id=chat_id, role="assistant", content=text, status="complete")
                    )
        finally:
            await db.close()

    asyncio.run(seed())
    events = alice.send(chat_id, "Say OK.", temperature=0)
    assert events[-1]["type"] == "done" and events[-1]["message"]["status"] == "complete", events[
        -1
    ]
    huge = alice.send(chat_id, "word " * 6000)  # within the 32k characters, over any context
    assert huge[-1]["type"] == "error" and huge[-1]["code"] == "context_length"
    assert huge[-1]["message_obj"]["status"] == "failed"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b'{"content": ""}', 400),
        (b'{"content": "   "}', 400),
        (b'{"content": 5}', 400),
        (b'{"content": "hi", "temperature": 5}', 400),
        (b'{"content": "hi", "temperature": "warm"}', 400),
        (b'{"content": "hi", "extra": 1}', 400),
        (b"not json", 400),
        (b"[]", 400),
        (json.dumps({"content": "x" * 32_001}).encode(), 413),
        (b'{"content": "' + b"x" * 300_000 + b'"}', 413),
    ],
)
def test_bad_messages_get_a_clear_4xx(
    gateways: dict[str, Gateway], body: bytes, status: int
) -> None:
    user = WebUser(gateways["sqlite"].url).signup()
    chat_id = user.new_chat()
    r = user.client.post(
        f"/api/chats/{chat_id}/messages", content=body, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert user.chat(chat_id)["messages"] == []  # nothing stored
    for title in ("", "t" * 201):
        assert user.client.patch(f"/api/chats/{chat_id}", json={"title": title}).status_code == 400


def test_other_users_ids_are_404(gw: Gateway, alice: WebUser) -> None:
    chat_id = alice.new_chat(title="private")
    mallory = WebUser(gw.url).signup()
    for method, body in (("GET", None), ("PATCH", {"title": "mine"}), ("DELETE", None)):
        r = mallory.client.request(method, f"/api/chats/{chat_id}", json=body)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (method, r.text)
    r = mallory.client.post(f"/api/chats/{chat_id}/messages", json={"content": "hi"})
    assert r.status_code == 404
    for missing in ("0" * 32, "nonsense", "../../etc"):
        assert alice.client.get(f"/api/chats/{missing}").status_code == 404
    with pytest.raises(InvalidStatus):
        ws_connect(gw, mallory, chat_id)
    assert mallory.client.get("/api/chats").json()["chats"] == []
    assert alice.chat(chat_id)["chat"]["title"] == "private"


def test_websocket_streams_stops_and_refuses(gw: Gateway, alice: WebUser) -> None:
    chat_id = alice.new_chat(title="ws")
    with pytest.raises(InvalidStatus):
        ws_connect(gw, alice, chat_id, origin="http://evil.example")
    anonymous = WebUser(gw.url)
    with pytest.raises(InvalidStatus):
        ws_connect(gw, anonymous, chat_id)
    with ws_connect(gw, alice, chat_id) as ws:
        ws.send(json.dumps({"type": "send", "content": LONG_ASK, "temperature": 0.8}))
        frames = ws_until(ws, "delta")
        assert frames[0]["type"] == "start"
        ws.send(json.dumps({"type": "send", "content": "again"}))
        frames += ws_until(ws, "error")
        assert frames[-1]["code"] == "busy"
        ws.send(json.dumps({"type": "stop"}))
        frames += ws_until(ws, "done", "error")
        assert frames[-1]["type"] == "done" and frames[-1]["message"]["status"] == "interrupted"
        partial = answer_text(frames)
        ws.send("not json")
        assert ws_until(ws, "error")[-1]["code"] == "invalid_request"
        ws.send(
            json.dumps(
                {"type": "send", "content": "What is the capital of France?", "temperature": 0}
            )
        )
        short = ws_until(ws, "done", "error")
        assert short[-1]["type"] == "done" and "Paris" in answer_text(short)
    messages = alice.chat(chat_id)["messages"]
    assert [(m["role"], m["status"]) for m in messages] == [
        ("user", "complete"), ("assistant", "interrupted"), ("user", "complete"), ("assistant", "complete"),
    ]  # fmt: skip
    assert messages[1]["content"] == partial


def test_client_disconnect_interrupts_the_answer(gw: Gateway, alice: WebUser) -> None:
    chat_id = alice.new_chat(title="leaving")
    with alice.client.stream(
        "POST", f"/api/chats/{chat_id}/messages", json={"content": LONG_ASK}
    ) as r:
        seen = 0
        for line in r.iter_lines():
            seen += '"type":"delta"' in line
            if seen >= 3:
                break

    def interrupted() -> bool:
        messages = alice.chat(chat_id)["messages"]
        return len(messages) == 2 and messages[1]["status"] == "interrupted"

    wait_for(interrupted, 30, "the answer marked interrupted")
    assert alice.chat(chat_id)["messages"][1]["content"]


def test_sigkilled_gateway_keeps_what_was_committed(gw: Gateway, alice: WebUser) -> None:
    chat_id = alice.new_chat(title="crash")
    received: list[str] = []
    with alice.client.stream(
        "POST", f"/api/chats/{chat_id}/messages", json={"content": LONG_ASK}
    ) as r:
        started = time.monotonic()
        for line in r.iter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                received.append(event.get("text", ""))
            if time.monotonic() - started > 2.0 and len(received) > 5:
                gw.kill()  # mid-answer: at least one flush (every 0.5 s) is committed
                break
    # a hard kill leaves the row `streaming` on disk
    status = db_query(
        gw, select(Message.status).where(Message.chat_id == chat_id, Message.role == "assistant")
    )
    assert status == [("streaming",)]
    gw.start()
    messages = alice.chat(chat_id)["messages"]
    assert [(m["role"], m["status"]) for m in messages] == [
        ("user", "complete"),
        ("assistant", "interrupted"),
    ]
    assert messages[0]["content"] == LONG_ASK
    partial = messages[1]["content"]
    assert partial and "".join(received).startswith(partial)


def test_delete_chat_and_account(gw: Gateway, alice: WebUser) -> None:
    chat_id = alice.new_chat(title="bye")
    alice.send(chat_id, "Say hi.")
    alice.client.post("/api/keys", json={"name": "k"})
    keep = alice.new_chat(title="kept until the account goes")
    assert alice.client.delete(f"/api/chats/{chat_id}").status_code == 204
    assert alice.client.get(f"/api/chats/{chat_id}").status_code == 404
    assert db_query(
        gw, select(func.count()).select_from(Message).where(Message.chat_id == chat_id)
    ) == [(0,)]
    me = alice.client.get("/api/me").json()["user"]["id"]
    assert (
        alice.client.request("DELETE", "/api/me", json={"password": "wrong one"}).status_code == 401
    )
    assert (
        alice.client.request("DELETE", "/api/me", json={"password": alice.password}).status_code
        == 204
    )
    assert alice.client.get("/api/me").status_code == 401
    r = httpx.post(
        f"{gw.url}/api/auth/login", json={"username": alice.username, "password": alice.password}
    )
    assert r.status_code == 401
    assert db_query(gw, select(Chat.id).where(Chat.user_id == me)) == []
    assert db_query(gw, select(ApiKey.id).where(ApiKey.user_id == me)) == []
    assert db_query(gw, select(Message.id).where(Message.chat_id == keep)) == []


def test_no_event_in_time_is_a_polite_queue_timeout(
    gateways: dict[str, Gateway], slapd_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A gateway that waits only 1 ms for the tree's first event: the answer ends queue_timeout."""
    sqlite = gateways["sqlite"]
    var = tmp_path_factory.mktemp("impatient")
    tree_env = {k: sqlite.env[k] for k in ("LLMTREE_ROOT_NAME", "LLMTREE_ROOT_PORT")}
    impatient = Gateway(
        "gw-impatient", slapd_settings, var, f"sqlite+aiosqlite:///{var}/chat.db",
        LLMTREE_REQUEST_TIMEOUT_S="0.001", LLMTREE_VAR_DIR=str(var), **tree_env,
    ).start()  # fmt: skip
    try:
        user = WebUser(impatient.url).signup()
        chat_id = user.new_chat()
        events = user.send(chat_id, "What is the capital of France?")
        assert events[-1]["type"] == "error" and events[-1]["code"] == "queue_timeout", events
        assert "try again" in events[-1]["message"].lower()
        assert user.chat(chat_id)["messages"][1]["status"] == "failed"
    finally:
        impatient.stop()


# -- start-up ----------------------------------------------------------------------------------
@pytest.mark.parametrize("secret", ["", "too-short"])
def test_gateway_refuses_a_missing_or_short_secret(slapd_settings: Settings, secret: str) -> None:
    env = llmtree_env(
        slapd_settings, LLMTREE_JWT_SECRET=secret, LLMTREE_GATEWAY_PORT=str(free_port())
    )
    result = subprocess.run(
        [sys.executable, "-m", "llmtree", "gateway"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 1
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("llmtree: error:")]
    assert (
        len(errors) == 1 and "LLMTREE_JWT_SECRET" in errors[0] and "Traceback" not in result.stderr
    )


def test_gateway_refuses_a_database_it_cannot_open(slapd_settings: Settings) -> None:
    env = llmtree_env(
        slapd_settings,
        LLMTREE_JWT_SECRET="k" * 40,
        LLMTREE_GATEWAY_PORT=str(free_port()),
        LLMTREE_DATABASE_URL=f"postgresql+asyncpg://nobody@127.0.0.1:{free_port()}/none",
    )
    result = subprocess.run(
        [sys.executable, "-m", "llmtree", "gateway"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("llmtree: error:")]
    assert len(errors) == 1 and "cannot open the chat database" in errors[0]
