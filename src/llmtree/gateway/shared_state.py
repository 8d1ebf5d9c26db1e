"""State that several gateways share: per-user sliding windows and leases, and cached answers.

One interface, two backends: ``MemoryState`` (one gateway process; pure logic with an
injectable clock) and ``RedisState`` (``LLMTREE_REDIS_URL``; each check-and-take is one Lua
script, so it is atomic across gateways, and the clock is the Redis server's).

Per user: the requests admitted in the last ``WINDOW_S`` seconds, the tokens used in that window
(each flush is one timestamped entry) and the open leases (answers streaming now), each with an
expiry so a gateway that dies does not hold its user's slots for ever.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

WINDOW_S = 60.0
PREFIX = "llmtree:"


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    retry_after: float = 0.0
    """Seconds until the refused request could pass (0 when allowed)."""
    reason: str = ""
    """'concurrent', 'requests' or 'tokens' when refused."""


class SharedState(Protocol):
    async def acquire(
        self, user: str, lease: str, rpm: int, tpm: int, concurrent: int, lease_ttl_s: float
    ) -> Decision:
        """Admit one request of ``user`` (recording it and opening ``lease``) or refuse it."""
        ...

    async def add_tokens(self, user: str, lease: str, tokens: int) -> None: ...

    async def release(self, user: str, lease: str) -> None: ...

    async def cache_get(self, key: str) -> str | None: ...

    async def cache_put(self, key: str, value: str, ttl_s: float, size: int) -> None: ...

    async def close(self) -> None: ...


def _retry_after(now: float, stamps: list[float], index: int) -> float:
    return max(0.0, stamps[index] + WINDOW_S - now)


class _UserWindow:
    __slots__ = ("requests", "tokens", "leases")

    def __init__(self) -> None:
        self.requests: deque[float] = deque()
        self.tokens: deque[tuple[float, int]] = deque()
        self.leases: dict[str, float] = {}

    def prune(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW_S:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
            self.tokens.popleft()
        for lease, expiry in list(self.leases.items()):
            if expiry <= now:
                del self.leases[lease]


def decide(
    now: float,
    requests: list[float],
    tokens: list[tuple[float, int]],
    open_leases: int,
    rpm: int,
    tpm: int,
    concurrent: int,
) -> Decision:
    """The sliding-window rule (the Redis script does the same): refuse when the user has
    ``concurrent`` answers open, ``rpm`` requests in the window, or ``tpm`` tokens used in it."""
    waits: list[tuple[float, str]] = []
    if concurrent > 0 and open_leases >= concurrent:
        waits.append((1.0, "concurrent"))
    if rpm > 0 and len(requests) >= rpm:
        waits.append((_retry_after(now, requests, len(requests) - rpm), "requests"))
    if tpm > 0:
        used = sum(n for _, n in tokens)
        if used >= tpm:
            for stamp, n in tokens:  # oldest first: when enough has left the window
                used -= n
                if used < tpm:
                    waits.append((max(0.0, stamp + WINDOW_S - now), "tokens"))
                    break
    if not waits:
        return Decision(True)
    return Decision(False, max(w for w, _ in waits), waits[0][1])


class MemoryState:
    """In-process backend; thread-safe; ``clock`` is injectable for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._users: dict[str, _UserWindow] = {}
        self._cache: OrderedDict[str, tuple[float, str]] = OrderedDict()

    async def acquire(
        self, user: str, lease: str, rpm: int, tpm: int, concurrent: int, lease_ttl_s: float
    ) -> Decision:
        with self._lock:
            now = self.clock()
            window = self._users.setdefault(user, _UserWindow())
            window.prune(now)
            decision = decide(
                now, list(window.requests), list(window.tokens), len(window.leases),
                rpm, tpm, concurrent,
            )  # fmt: skip
            if decision.allowed:
                window.requests.append(now)
                window.leases[lease] = now + lease_ttl_s
            if len(self._users) > 100_000:  # bounded memory: drop idle users
                for name in [n for n, w in self._users.items() if not w.leases]:
                    del self._users[name]
            return decision

    async def add_tokens(self, user: str, lease: str, tokens: int) -> None:
        if tokens <= 0:
            return
        with self._lock:
            self._users.setdefault(user, _UserWindow()).tokens.append((self.clock(), tokens))

    async def release(self, user: str, lease: str) -> None:
        with self._lock:
            window = self._users.get(user)
            if window is not None:
                window.leases.pop(lease, None)

    async def cache_get(self, key: str) -> str | None:
        with self._lock:
            item = self._cache.get(key)
            if item is None:
                return None
            expiry, value = item
            if expiry <= self.clock():
                del self._cache[key]
                return None
            self._cache.move_to_end(key)
            return value

    async def cache_put(self, key: str, value: str, ttl_s: float, size: int) -> None:
        with self._lock:
            self._cache[key] = (self.clock() + ttl_s, value)
            self._cache.move_to_end(key)
            while len(self._cache) > max(0, size):
                self._cache.popitem(last=False)

    async def close(self) -> None:
        return None


# KEYS: requests, tokens, leases. ARGV: lease, rpm, tpm, concurrent, lease_ttl_s, window_s.
# Returns {allowed (0/1), retry_after (string), reason}. Token entries are "lease:stamp:n".
ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rpm, tpm, con = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local ttl, window = tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local wait, reason = -1, ''
local function refuse(w, why)
  if w > wait then wait = w end
  if reason == '' then reason = why end
end
if con > 0 and redis.call('ZCARD', KEYS[3]) >= con then refuse(1, 'concurrent') end
if rpm > 0 then
  local n = redis.call('ZCARD', KEYS[1])
  if n >= rpm then
    local e = redis.call('ZRANGE', KEYS[1], n - rpm, n - rpm, 'WITHSCORES')
    refuse(math.max(0, tonumber(e[2]) + window - now), 'requests')
  end
end
if tpm > 0 then
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local used = 0
  for i = 1, #entries, 2 do used = used + tonumber(string.match(entries[i], ':(%d+)$')) end
  if used >= tpm then
    for i = 1, #entries, 2 do
      used = used - tonumber(string.match(entries[i], ':(%d+)$'))
      if used < tpm then
        refuse(math.max(0, tonumber(entries[i + 1]) + window - now), 'tokens')
        break
      end
    end
  end
end
if reason ~= '' then return {0, tostring(wait), reason} end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZADD', KEYS[3], now + ttl, ARGV[1])
local keep = math.ceil((window + ttl) * 1000)
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], keep) end
return {1, '0', ''}
"""

# KEYS: tokens. ARGV: lease, tokens, window_s.
ADD_TOKENS_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1] .. ':' .. t[1] .. t[2] .. ':' .. ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) * 1000) + 1000)
return 1
"""

# KEYS: entry, index. ARGV: value, ttl_ms, size. The index (a sorted set by insertion time)
# bounds how many answers are kept: the oldest beyond ``size`` are deleted.
CACHE_PUT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local size = tonumber(ARGV[3])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], now, KEYS[1])
local n = redis.call('ZCARD', KEYS[2])
if n > size then
  local old = redis.call('ZRANGE', KEYS[2], 0, n - size - 1)
  for _, key in ipairs(old) do redis.call('DEL', key) end
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, n - size - 1)
end
return n
"""


class RedisState:
    """Redis backend (``redis.asyncio``); every decision is one atomic script run."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as aioredis

        self._redis: Any = aioredis.Redis.from_url(
            url, decode_responses=True, socket_timeout=5, socket_connect_timeout=5
        )
        self._acquire = self._redis.register_script(ACQUIRE_LUA)
        self._add_tokens = self._redis.register_script(ADD_TOKENS_LUA)
        self._cache_put = self._redis.register_script(CACHE_PUT_LUA)

    @staticmethod
    def _keys(user: str) -> list[str]:
        return [f"{PREFIX}rl:{user}:{part}" for part in ("req", "tok", "con")]

    async def acquire(
        self, user: str, lease: str, rpm: int, tpm: int, concurrent: int, lease_ttl_s: float
    ) -> Decision:
        allowed, wait, reason = await self._acquire(
            keys=self._keys(user), args=[lease, rpm, tpm, concurrent, lease_ttl_s, WINDOW_S]
        )
        if int(allowed):
            return Decision(True)
        return Decision(False, float(wait), str(reason))

    async def add_tokens(self, user: str, lease: str, tokens: int) -> None:
        if tokens > 0:
            await self._add_tokens(keys=[self._keys(user)[1]], args=[lease, tokens, WINDOW_S])

    async def release(self, user: str, lease: str) -> None:
        await self._redis.zrem(self._keys(user)[2], lease)

    async def cache_get(self, key: str) -> str | None:
        value = await self._redis.get(f"{PREFIX}cache:{key}")
        return None if value is None else str(value)

    async def cache_put(self, key: str, value: str, ttl_s: float, size: int) -> None:
        ttl_ms = max(1, math.ceil(ttl_s * 1000))
        await self._cache_put(
            keys=[f"{PREFIX}cache:{key}", f"{PREFIX}cache-index"], args=[value, ttl_ms, size]
        )

    async def close(self) -> None:
        await self._redis.aclose()


def make_state(redis_url: str) -> SharedState:
    """Redis when a URL is set, else in-process."""
    if redis_url:
        return RedisState(redis_url)
    return MemoryState()
