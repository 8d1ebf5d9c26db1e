"""Pure logic of the chat product: history trimming, titles, the login limiter, the session key
check, API key shape. (The API itself is tested against real processes in test_chat_api.py.)"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from llmtree.config import Settings
from llmtree.errors import ConfigError
from llmtree.gateway.auth import LoginLimiter, key_hash, new_api_key, session_secret
from llmtree.gateway.prompting import clean_title, estimate_tokens, fallback_title, fit_history


def history(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": "system", "content": "sys"}] + [{"role": r, "content": c} for r, c in pairs]


def test_fit_history_keeps_the_newest_turns_within_the_budget() -> None:
    turns = [
        ("user", "a" * 300),
        ("assistant", "b" * 300),
        ("user", "c" * 300),
        ("assistant", "d" * 300),
        ("user", "q"),
    ]
    every = fit_history(history(*turns), budget=10_000)
    assert every is not None and [m["content"][0] for m in every] == ["s", "a", "b", "c", "d", "q"]
    budget = estimate_tokens("sys") + estimate_tokens("c" * 300) * 2 + estimate_tokens("q")
    kept = fit_history(history(*turns), budget)
    assert kept is not None and [m["content"][0] for m in kept] == ["s", "c", "d", "q"]
    assert kept[1]["role"] == "user"  # never starts on an answer


def test_fit_history_drops_more_on_request_and_gives_up_when_nothing_fits() -> None:
    turns = [("user", "a"), ("assistant", "b"), ("user", "c")]
    dropped = fit_history(history(*turns), 10_000, drop=2)
    assert dropped is not None and [m["content"] for m in dropped] == ["sys", "c"]
    assert fit_history(history(*turns), 10_000, drop=3) is None
    assert fit_history(history(("user", "x" * 9000)), 100) is None


def test_estimate_is_generous() -> None:
    assert estimate_tokens("hello world " * 100) >= 1200 / 4  # real tokenizers: ~4 chars a token
    assert estimate_tokens("日本語") >= 3


def test_titles() -> None:
    assert clean_title('Title: "Paris, Capital of France".\nmore') == "Paris, Capital of France"
    assert clean_title("   \n\n") == ""
    assert fallback_title("one two three four five six seven") == "one two three four five six…"
    assert fallback_title("hi") == "hi"


def test_login_limiter_counts_failures_per_name_and_address() -> None:
    limiter = LoginLimiter(failures=3, window_s=60)
    for _ in range(3):
        assert limiter.retry_after("Alice", "1.2.3.4") == 0
        limiter.failed("Alice", "1.2.3.4")
    assert 1 <= limiter.retry_after("alice", "1.2.3.4") <= 60
    assert limiter.retry_after("alice", "5.6.7.8") == 0
    assert limiter.retry_after("bob", "1.2.3.4") == 0
    limiter.succeeded("alice", "1.2.3.4")
    assert limiter.retry_after("alice", "1.2.3.4") == 0


def test_login_limiter_window_expires() -> None:
    limiter = LoginLimiter(failures=1, window_s=0.05)
    limiter.failed("a", "x")
    assert limiter.retry_after("a", "x") >= 1
    time.sleep(0.06)
    assert limiter.retry_after("a", "x") == 0


@pytest.mark.parametrize("secret", ["", "short", " " * 40])
def test_session_secret_refuses_weak_keys_outside_dev_mode(secret: str) -> None:
    with pytest.raises(ConfigError, match="LLMTREE_JWT_SECRET"):
        session_secret(Settings(jwt_secret=secret, dev=False))
    assert len(session_secret(Settings(jwt_secret=secret, dev=True))) >= 32


def test_api_keys_are_random_and_stored_hashed() -> None:
    secret, prefix, hashed = new_api_key()
    assert secret.startswith("llmt-") and len(secret) > 40 and secret.startswith(prefix)
    assert hashed == key_hash(secret) and secret not in hashed and len(hashed) == 64
    assert new_api_key()[0] != secret


def test_a_gateway_restart_recovers_only_its_own_streaming_answers(tmp_path: Path) -> None:
    import asyncio

    from sqlalchemy import select

    from llmtree.gateway.db import Database, gateway_owner
    from llmtree.gateway.db.models import Chat, Message, User

    url = f"sqlite+aiosqlite:///{tmp_path / 'chats.db'}"
    mine, theirs = gateway_owner("127.0.0.1", 8000), gateway_owner("127.0.0.1", 8001)

    async def run() -> dict[str | None, str]:
        first = Database(url, mine)
        await first.start()
        async with first.session() as session, session.begin():
            user = User(username="ada", password_hash="x")
            session.add(user)
            await session.flush()
            chat = Chat(id="c" * 32, user_id=user.id, title="t")
            session.add(chat)
            await session.flush()
            for owner in (mine, theirs, None):
                session.add(
                    Message(chat_id=chat.id, role="assistant", status="streaming", owner=owner)
                )
        await first.close()
        tool = Database(url)  # llmtree keys / users: recovers nothing
        assert await tool.start() == 0
        await tool.close()
        restarted = Database(url, mine)
        assert await restarted.start() == 2  # its own and the ownerless one
        async with restarted.session() as session:
            rows = (await session.execute(select(Message))).scalars().all()
        await restarted.close()
        return {m.owner: m.status for m in rows}

    assert asyncio.run(run()) == {mine: "interrupted", None: "interrupted", theirs: "streaming"}
