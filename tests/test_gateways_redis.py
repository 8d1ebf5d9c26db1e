"""Several gateways in front of one tree, sharing users (one database) and limits and cached
answers (a real ``redis-server`` on loopback); the Redis backend's atomic scripts on their own;
tier priorities through a one-slot worker."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis
from websockets.sync.client import connect

from llmtree.config import Settings
from llmtree.gateway.limits import Limiter, RateLimited
from llmtree.gateway.shared_state import RedisState
from llmtree.registry import Registry
from llmtree.tree.client import Peers

from chatapi import Gateway, WebUser
from cluster import Proc, free_port, llmtree_env, wait_for

ROOT = "rgwroot"
WORKER = "rgw-w1"
TIERS = {
    "free": {"rpm": 0, "tpm": 0, "concurrent": 8, "priority": 0},
    "pro": {"rpm": 0, "tpm": 0, "concurrent": 8, "priority": 10},
    "tiny": {"rpm": 3, "tpm": 0, "concurrent": 0, "priority": 0},
}
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a free loopback port, nothing persisted."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is missing: run `make test-deps`"
    data = tmp_path_factory.mktemp("redis")
    port = free_port()
    log = (data / "redis.out").open("wb")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(data), "--protected-mode", "yes"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url, socket_timeout=2)
        wait_for(lambda: proc.poll() is None and client.ping(), 30, "redis-server")
        client.close()
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


# -- the Redis backend on its own (two RedisState objects = two gateways) ----------------------
def test_redis_windows_are_shared_and_atomic(redis_url: str) -> None:
    async def go() -> None:
        one, two = RedisState(redis_url), RedisState(redis_url)
        user = f"t{uuid.uuid4().hex[:8]}"
        try:
            for i in range(3):
                assert (await one.acquire(user, f"l{i}", 3, 0, 0, 60)).allowed
            refused = await two.acquire(user, "l3", 3, 0, 0, 60)
            assert not refused.allowed and refused.reason == "requests"
            assert 55 < refused.retry_after <= 60
            # concurrent: leases opened by one are seen (and freed) by the other
            conc = f"{user}c"
            assert (await one.acquire(conc, "a", 0, 0, 2, 60)).allowed
            assert (await two.acquire(conc, "b", 0, 0, 2, 60)).allowed
            assert (await two.acquire(conc, "c", 0, 0, 2, 60)).reason == "concurrent"
            await one.release(conc, "a")
            assert (await two.acquire(conc, "c", 0, 0, 2, 60)).allowed
            # an expired lease (its gateway died) no longer counts
            dead = f"{user}d"
            assert (await one.acquire(dead, "x", 0, 0, 1, 0.2)).allowed
            assert not (await two.acquire(dead, "y", 0, 0, 1, 60)).allowed
            await asyncio.sleep(0.3)
            assert (await two.acquire(dead, "y", 0, 0, 1, 60)).allowed
            # tokens
            tok = f"{user}t"
            assert (await one.acquire(tok, "a", 0, 100, 0, 60)).allowed
            await one.add_tokens(tok, "a", 60)
            await two.add_tokens(tok, "a", 50)
            refused = await two.acquire(tok, "b", 0, 100, 0, 60)
            assert not refused.allowed and refused.reason == "tokens" and refused.retry_after > 55
            # 40 parallel attempts against rpm 10 from both "gateways": exactly 10 pass
            race = f"{user}r"
            results = await asyncio.gather(
                *((one if i % 2 else two).acquire(race, f"r{i}", 10, 0, 0, 60) for i in range(40))
            )
            passed = sum(d.allowed for d in results)
            print(f"\nrace: {passed}/40 admitted against rpm 10 across two clients")
            assert passed == 10
            # the cache: written by one, read by the other; size-bounded
            await one.cache_put(f"{user}k1", "v1", 60, 1000)
            assert await two.cache_get(f"{user}k1") == "v1"
            assert await two.cache_get(f"{user}nope") is None
        finally:
            await one.close()
            await two.close()

    asyncio.run(go())


def test_limiter_over_redis_raises_rate_limited(redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, tiers=json.dumps(TIERS))

    class U:
        id = 900_000 + int(uuid.uuid4().int % 1000)
        tier = "tiny"

    async def go() -> None:
        one, two = Limiter(settings), Limiter(settings)
        try:
            for _ in range(3):
                await (await one.admit(U())).end()
            with pytest.raises(RateLimited) as refused:
                await two.admit(U())
            assert refused.value.headers is not None
            assert 1 <= int(refused.value.headers["Retry-After"]) <= 60
        finally:
            await one.close()
            await two.close()

    asyncio.run(go())


# -- two gateway processes, one tree, one database, one Redis ----------------------------------
class Stack:
    def __init__(self, settings: Settings, gws: list[Gateway], env: dict[str, str]) -> None:
        self.settings, self.gws, self.env = settings, gws, env
        self.registry = Registry(settings)
        self.registry.connect(writer=False)
        self.peers = Peers(10.0)

    def served(self) -> int:
        status = self.peers.call(self.registry.lookup(WORKER).uri, "status")
        return int(status["served"])

    def user(self, tier: str | None = None) -> tuple[WebUser, dict[str, str]]:
        """A new user (registered on gateway 1) in ``tier``, and its API key header."""
        user = WebUser(self.gws[0].url).signup()
        secret = user.client.post("/api/keys", json={"name": "t"}).json()["secret"]
        if tier is not None:  # the CLI, on the shared database
            out = subprocess.run(
                [sys.executable, "-m", "llmtree", "users", "set-tier",
                 user.username, tier],
                env=self.env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert out.returncode == 0, out.stdout + out.stderr
            assert f"tier {tier}" in out.stdout
        return user, {"Authorization": f"Bearer {secret}"}


@pytest.fixture(scope="module")
def stack(
    slapd_settings: Settings, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("rgw-logs")
    var = tmp_path_factory.mktemp("rgw-var")
    database = f"sqlite+aiosqlite:///{var}/shared.db"
    tree_env = {
        "LLMTREE_ROOT_NAME": ROOT,
        "LLMTREE_ROOT_PORT": str(free_port()),
        "LLMTREE_VAR_DIR": str(var),
    }
    gw_env = {
        **tree_env,
        "LLMTREE_REDIS_URL": redis_url,
        "LLMTREE_TIERS": json.dumps(TIERS),
        "LLMTREE_DEFAULT_TIER": "free",
        "LLMTREE_RESPONSE_CACHE": "1",
    }
    env = llmtree_env(slapd_settings, **tree_env)
    procs = [Proc(ROOT, ["node", "--name", ROOT, "--root"], env, logs)]
    gws: list[Gateway] = []
    try:
        wait_for(lambda: "ready at" in procs[0].output(), 60, "root")
        worker_env = {**env, "LLMTREE_MAX_MODEL_LEN": "1024", "LLMTREE_SLOTS": "1"}
        procs.append(Proc(WORKER, ["node", "--name", WORKER, "--parent", ROOT], worker_env, logs))

        def worker_ready() -> bool:
            assert procs[1].alive(), procs[1].output()[-3000:]
            return "ready at" in procs[1].output()

        wait_for(worker_ready, 300, "worker")
        for name in ("gw1", "gw2"):  # one after the other: the first migrates the database
            gws.append(Gateway(name, slapd_settings, logs, database, **gw_env).start())
        cli_env = llmtree_env(
            slapd_settings, **gw_env, LLMTREE_DATABASE_URL=database, LLMTREE_JWT_SECRET="x" * 40
        )
        yield Stack(slapd_settings, gws, cli_env)
    finally:
        for gw in gws:
            gw.stop()
        for proc in reversed(procs):
            proc.stop()


def sse_text(response: httpx.Response) -> tuple[str, str | None]:
    """(content, finish_reason) of a streamed chat completion; asserts it ends with [DONE]."""
    parts: list[str] = []
    finish = None
    lines = [line for line in response.iter_lines() if line.startswith("data:")]
    assert lines and lines[-1] == "data: [DONE]", lines[-3:]
    for line in lines[:-1]:
        chunk = json.loads(line[5:])
        assert "error" not in chunk, chunk
        for choice in chunk["choices"]:
            parts.append(choice["delta"].get("content") or "")
            finish = choice["finish_reason"] or finish
    return "".join(parts), finish


@pytest.mark.ldap
@pytest.mark.model
@pytest.mark.slow
def test_both_gateways_stream_their_own_requests(stack: Stack) -> None:
    _, auth = stack.user()
    results: dict[str, tuple[str, str | None]] = {}

    def ask(gw: Gateway, i: int) -> None:
        body = {
            "messages": [{"role": "user", "content": f"Count from 1 to 5. ({i})"}],
            "max_tokens": 16, "temperature": 0.8, "stream": True,
        }  # fmt: skip
        with httpx.stream("POST", f"{gw.url}{CHAT}", json=body, headers=auth, timeout=180) as r:
            assert r.status_code == 200, r.read()
            assert "x-llmtree-cache" not in r.headers  # sampled: not cacheable
            results[f"{gw.name}-{i}"] = sse_text(r)

    threads = [threading.Thread(target=ask, args=(gw, i)) for i in range(2) for gw in stack.gws]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    print(f"\nstreams through two gateways: {len(results)}/4 complete")
    assert len(results) == 4, results
    for text, finish in results.values():
        assert text.strip() and finish in ("stop", "length")


@pytest.mark.ldap
@pytest.mark.model
@pytest.mark.slow
def test_request_limit_holds_across_gateways(stack: Stack) -> None:
    web, auth = stack.user("tiny")  # 3 requests per minute
    gw1, gw2 = stack.gws
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0.5}
    for _ in range(3):
        r = httpx.post(f"{gw1.url}{CHAT}", json=body, headers=auth, timeout=120)
        assert r.status_code == 200, r.text
    r = httpx.post(f"{gw2.url}{CHAT}", json=body, headers=auth, timeout=60)
    assert r.status_code == 429, r.text
    retry_after = int(r.headers["retry-after"])
    error = r.json()["error"]
    print(
        f"\n4th request on the other gateway: 429, Retry-After {retry_after} s: {error['message']}"
    )
    assert 1 <= retry_after <= 60
    assert error["code"] == "rate_limited" and error["type"] == "rate_limit_error"
    assert set(error) == {"message", "type", "param", "code"}
    # the web chat of the same user, on gateway 2: SSE and WebSocket get the ChatEvent
    web2 = WebUser(gw2.url, web.username, web.password).login()
    chat_id = web2.new_chat()
    events = web2.send(chat_id, "hello")
    assert [e["type"] for e in events] == ["error"], events
    assert events[0]["code"] == "rate_limited" and 1 <= events[0]["retry_after"] <= 60
    assert web2.chat(chat_id)["messages"] == []  # nothing stored
    ws_url = gw2.url.replace("http://", "ws://") + f"/api/chats/{chat_id}/ws"
    headers = {"Cookie": web2.cookie_header(), "Origin": gw2.url}
    with connect(ws_url, additional_headers=headers, open_timeout=10) as ws:
        ws.send(json.dumps({"type": "send", "content": "hello"}))
        frame = json.loads(ws.recv(timeout=30))
    assert frame["type"] == "error" and frame["code"] == "rate_limited", frame
    assert frame["retry_after"] >= 1
    web.close()
    web2.close()


@pytest.mark.ldap
@pytest.mark.model
@pytest.mark.slow
def test_cached_answer_from_one_gateway_is_served_by_the_other(stack: Stack) -> None:
    _, auth = stack.user()
    gw1, gw2 = stack.gws
    question = f"Name three colours. (run {uuid.uuid4().hex[:6]})"
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 20,
            "temperature": 0}  # fmt: skip
    first = httpx.post(f"{gw1.url}{CHAT}", json=body, headers=auth, timeout=120)
    assert first.status_code == 200, first.text
    assert first.headers["x-llmtree-cache"] == "miss"
    answer = first.json()["choices"][0]["message"]["content"]
    wait_for(lambda: stack.served() == stack.served(), 10, "the worker's count to settle")
    served = stack.served()
    second = httpx.post(f"{gw2.url}{CHAT}", json=body, headers=auth, timeout=60)
    assert second.status_code == 200 and second.headers["x-llmtree-cache"] == "hit"
    data = second.json()
    assert data["choices"][0]["message"]["content"] == answer
    assert data["usage"] == first.json()["usage"] and "(cached)" in data["node"]
    with httpx.stream("POST", f"{gw2.url}{CHAT}", json={**body, "stream": True}, headers=auth,
                      timeout=60) as r:  # fmt: skip
        assert r.status_code == 200 and r.headers["x-llmtree-cache"] == "hit"
        text, finish = sse_text(r)
    assert text == answer and finish in ("stop", "length")
    time.sleep(0.5)
    print(f"\ncached answer {answer!r}: served by the other gateway twice; worker served count "
          f"{served} -> {stack.served()}")  # fmt: skip
    assert stack.served() == served  # nothing new reached the tree


@pytest.mark.ldap
@pytest.mark.model
@pytest.mark.slow
def test_higher_tier_is_admitted_first_under_load(stack: Stack) -> None:
    _, low = stack.user("free")  # priority 0
    _, high = stack.user("pro")  # priority 10
    gw1, gw2 = stack.gws
    first_token: dict[str, float] = {}
    placed: dict[str, threading.Event] = {}
    errors: list[str] = []

    def ask(name: str, gw: Gateway, auth: dict[str, str], max_tokens: int) -> None:
        body = {
            "messages": [{"role": "user", "content": "Tell me a long story about a cat."}],
            "max_tokens": max_tokens, "temperature": 0.7, "ignore_eos": True, "stream": True,
        }  # fmt: skip
        try:
            with httpx.stream("POST", f"{gw.url}{CHAT}", json=body, headers=auth,
                              timeout=300) as r:  # fmt: skip
                placed[name].set()  # headers come back once the tree placed it
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if (
                        line.startswith("data: {")
                        and '"content":"' in line
                        and ('"content":""' not in line)
                    ):
                        first_token.setdefault(name, time.monotonic())
        except Exception as error:  # noqa: BLE001 - reported by the test
            errors.append(f"{name}: {error!r}")
            placed[name].set()

    order = [("L0", gw1, low, 96), ("L1", gw2, low, 8), ("L2", gw1, low, 8), ("L3", gw2, low, 8),
             ("H", gw1, high, 8)]  # fmt: skip
    threads = []
    for name, gw, auth, max_tokens in order:
        placed[name] = threading.Event()
        thread = threading.Thread(target=ask, args=(name, gw, auth, max_tokens))
        thread.start()
        threads.append(thread)
        assert placed[name].wait(60), f"{name} was not placed"
        if name == "L0":  # the one slot is busy before the others arrive
            wait_for(lambda: "L0" in first_token, 120, "L0's first token")
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    started = sorted(first_token, key=first_token.__getitem__)
    print(f"\norder of first tokens through a 1-slot worker: {started}")
    assert started[0] == "L0" and started[1] == "H", started
    assert sorted(started) == sorted(name for name, *_ in order)
