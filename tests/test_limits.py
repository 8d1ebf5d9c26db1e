"""Unit tests of the per-user limits, tiers and the response cache with the in-process backend
and a fake clock (pure logic; the Redis backend is tested in test_gateways_redis.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from llmtree.config import Settings
from llmtree.errors import ConfigError
from llmtree.gateway.cache import cache_key, replay_stream
from llmtree.gateway.limits import FLUSH_TOKENS, Limiter, RateLimited
from llmtree.gateway.shared_state import MemoryState, decide
from llmtree.gateway.tiers import DEFAULT_TIERS, load_tiers, tier_of
from llmtree.protocol import SamplingParams, make_event


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeUser:
    id: int
    tier: str | None = None


def limiter(tiers: str = "", **settings: Any) -> tuple[Limiter, Clock]:
    clock = Clock()
    return Limiter(Settings(tiers=tiers, **settings), MemoryState(clock)), clock


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_tiers_defaults_overrides_and_errors() -> None:
    tiers = load_tiers('{"free": {"rpm": 5}, "team": {"priority": 5, "concurrent": 2}}')
    assert tiers["free"].rpm == 5 and tiers["free"].tpm == DEFAULT_TIERS["free"].tpm
    assert tiers["team"].priority == 5 and tiers["team"].rpm == DEFAULT_TIERS["free"].rpm
    assert tiers["admin"].rpm == 0 and tiers["admin"].priority > tiers["pro"].priority
    assert tier_of(tiers, None, "free").name == "free"
    assert tier_of(tiers, "gone", "team").name == "team"
    for bad in ("[", "[1]", '{"Bad Name": {}}', '{"x": {"rpm": -1}}', '{"x": {"speed": 1}}',
                '{"x": {"priority": 5000}}', '{"x": {"rpm": true}}'):  # fmt: skip
        with pytest.raises(ConfigError):
            load_tiers(bad)


def test_requests_per_minute_slide_with_the_window() -> None:
    lim, clock = limiter('{"free": {"rpm": 3, "tpm": 0, "concurrent": 0}}')
    user = FakeUser(1)

    async def go() -> None:
        for _ in range(3):
            await (await lim.admit(user)).end()
            clock.now += 10
        with pytest.raises(RateLimited) as refused:
            await lim.admit(user)
        # the first request (t=1000) leaves the window at t=1060; now is 1030
        assert refused.value.retry_after == 30
        assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "30"}
        assert refused.value.body()["error"]["code"] == "rate_limited"
        assert refused.value.body()["error"]["type"] == "rate_limit_error"
        clock.now = 1060.5
        await lim.admit(user)  # one slot freed
        with pytest.raises(RateLimited):
            await lim.admit(user)
        await lim.admit(FakeUser(2))  # other users have their own window

    run(go())


def test_concurrent_streams_are_released_at_the_end() -> None:
    lim, _ = limiter('{"free": {"rpm": 0, "tpm": 0, "concurrent": 2}}')
    user = FakeUser(1)

    async def go() -> None:
        first, second = await lim.admit(user), await lim.admit(user)
        with pytest.raises(RateLimited) as refused:
            await lim.admit(user)
        assert refused.value.retry_after == 1 and "at once" in refused.value.message
        await first.end()
        await first.end()  # idempotent: frees one slot only
        third = await lim.admit(user)
        with pytest.raises(RateLimited):
            await lim.admit(user)
        await second.end()
        await third.end()

    run(go())


def test_tokens_count_while_streaming_and_at_the_end() -> None:
    lim, clock = limiter('{"free": {"rpm": 0, "tpm": 1000, "concurrent": 0}}')
    user = FakeUser(1)
    state = lim.state
    assert isinstance(state, MemoryState)

    def used() -> int:
        return sum(n for _, n in state._users["u1"].tokens)

    async def go() -> None:
        admission = await lim.admit(user)
        for seq in range(FLUSH_TOKENS):
            await admission.observe(make_event("r", seq, "x", [seq]))
        assert used() == FLUSH_TOKENS  # flushed mid-stream
        final = make_event("r", 64, "", [], "stop", usage={"total_tokens": 900})
        await admission.observe(final)
        await admission.end()
        assert used() == 900  # the usage's prompt + completion, counted once
        clock.now += 30
        admission = await lim.admit(user)  # 900 < 1000: still allowed
        await admission.observe(make_event("r2", 0, "", [], "stop", usage={"total_tokens": 200}))
        await admission.end()
        with pytest.raises(RateLimited) as refused:
            await lim.admit(user)
        assert refused.value.retry_after == 30 and "tokens per minute" in refused.value.message
        clock.now += 30.5  # the 900 left the window
        await lim.admit(user)

    run(go())


def test_decide_reports_the_longest_wait_and_first_reason() -> None:
    now = 100.0
    d = decide(now, [50.0, 60.0], [(45.0, 10)], 3, rpm=2, tpm=5, concurrent=3)
    assert not d.allowed and d.reason == "concurrent"
    assert d.retry_after == pytest.approx(10.0)  # rpm: 50 + 60 - 100; tokens: 5
    assert decide(now, [], [], 0, 0, 0, 0).allowed


def test_priority_comes_from_the_tier() -> None:
    lim, _ = limiter()

    async def go() -> None:
        assert (await lim.admit(FakeUser(1))).priority == DEFAULT_TIERS["free"].priority
        assert (await lim.admit(FakeUser(2, "admin"))).priority == DEFAULT_TIERS["admin"].priority
        assert (await lim.admit(FakeUser(3, "pro"))).priority == DEFAULT_TIERS["pro"].priority

    run(go())


def test_unreachable_state_lets_requests_pass() -> None:
    class Broken(MemoryState):
        async def acquire(self, *args: Any) -> Any:
            raise ConnectionError("redis down")

    lim = Limiter(Settings(), Broken())

    async def go() -> None:
        admission = await lim.admit(FakeUser(1))
        await admission.end()

    run(go())


def test_cache_keys_only_for_deterministic_requests() -> None:
    messages = [{"role": "user", "content": "hi"}]
    greedy = SamplingParams(max_tokens=20, temperature=0.0)
    key = cache_key("m", messages, greedy)
    assert key is not None and key == cache_key("m", messages, SamplingParams(20, 0.0, seed=4))
    assert cache_key("m", messages, SamplingParams(max_tokens=20, temperature=0.7)) is None
    assert cache_key("m", messages, SamplingParams(max_tokens=20, temperature=0.7, top_k=1))
    assert key != cache_key("m", messages, SamplingParams(max_tokens=21, temperature=0.0))
    assert key != cache_key("n", messages, greedy)
    assert key != cache_key("m", [{"role": "user", "content": "hi!"}], greedy)


def test_cache_ttl_size_and_replay() -> None:
    lim, clock = limiter(response_cache=True, response_cache_ttl_s=10, response_cache_size=2)

    async def go() -> None:
        admission = await lim.admit(FakeUser(1))
        admission.cache_key = "k1"
        for seq, text in enumerate(["Hello", " world"]):
            await admission.observe(make_event("r", seq, text, [seq]))
        await admission.observe(make_event("r", 2, "", [], "stop", node="w1", usage={"a": 1}))
        await admission.end()
        cached = await lim.cache_get("k1")
        assert cached == {"text": "Hello world", "finish_reason": "stop", "usage": {"a": 1},
                          "node": "w1"}  # fmt: skip
        stream = replay_stream("again", cached)
        events = [e async for e in stream.events(5)]
        assert "".join(e["text"] for e in events) == "Hello world"
        assert events[-1]["finish_reason"] == "stop" and events[-1]["usage"] == {"a": 1}
        assert "cached" in events[-1]["node"] and stream.finished
        # an answer that ended in an error or was cut by the gateway is not kept
        failed = await lim.admit(FakeUser(1))
        failed.cache_key = "k2"
        await failed.observe(make_event("r", 0, "", [], "error"))
        await failed.end()
        assert await lim.cache_get("k2") is None
        await lim.cache_put("k3", {"text": "3"})
        await lim.cache_put("k4", {"text": "4"})
        assert await lim.cache_get("k1") is None  # size 2: the oldest went
        clock.now += 11
        assert await lim.cache_get("k4") is None  # past its TTL

    run(go())
