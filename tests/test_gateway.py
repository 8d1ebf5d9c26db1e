"""The gateway against a real root that has no workers yet (no model needed), and the sink's
ordering of events."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from llmtree.config import Settings
from llmtree.errors import InvalidRequest
from llmtree.gateway.sink import EventSink, RequestStream
from llmtree.protocol import make_event, pack_events

from chatapi import JWT_SECRET, WebUser
from cluster import Proc, free_port, llmtree_env, wait_for


@pytest.fixture(scope="module")
def gateway(slapd_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    logs = tmp_path_factory.mktemp("gw-logs")
    database = tmp_path_factory.mktemp("gw-db") / "llmtree.db"
    root_port, http_port = free_port(), free_port()
    env = llmtree_env(
        slapd_settings,
        LLMTREE_ROOT_PORT=str(root_port),
        LLMTREE_ROOT_NAME="gwroot",
        LLMTREE_GATEWAY_PORT=str(http_port),
        LLMTREE_JWT_SECRET=JWT_SECRET,
        LLMTREE_DATABASE_URL=f"sqlite+aiosqlite:///{database}",
    )
    root = Proc("gwroot", ["node", "--name", "gwroot", "--root"], env, logs)
    gw = Proc("gateway", ["gateway"], env, logs)
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, 60, "gateway")
        wait_for(lambda: "ready at" in root.output(), 60, "root")
        yield url
    finally:
        gw.stop()
        root.stop()


pytestmark = pytest.mark.ldap


@pytest.fixture(scope="module")
def auth(gateway: str) -> dict[str, str]:
    """An API key of a freshly registered user, as the header /v1/* needs."""
    user = WebUser(gateway).signup()
    secret = user.client.post("/api/keys", json={"name": "test"}).json()["secret"]
    user.close()
    return {"Authorization": f"Bearer {secret}"}


def test_v1_needs_an_api_key(gateway: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, {"Authorization": "Bearer llmt-not-a-key"}):
        r = httpx.post(f"{gateway}/v1/chat/completions", json=body, headers=headers, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_not_ready_without_workers(gateway: str) -> None:
    r = httpx.get(f"{gateway}/readyz")
    assert r.status_code == 503
    assert "no serving nodes" in r.json()["error"]["message"]


def test_overloaded_is_503_with_retry_after(gateway: str, auth: dict[str, str]) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{gateway}/v1/chat/completions", json=body, headers=auth, timeout=10)
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "overloaded"


def test_chat_message_on_a_full_tree_is_a_polite_overloaded_event(gateway: str) -> None:
    user = WebUser(gateway).signup()
    chat_id = user.new_chat()
    events = user.send(chat_id, "hi")
    assert [e["type"] for e in events] == ["start", "error"]
    error = events[-1]
    assert error["code"] == "overloaded" and "try again" in error["message"]
    assert error["message_obj"]["status"] == "failed"
    stored = user.chat(chat_id)["messages"]
    assert [(m["role"], m["status"]) for m in stored] == [
        ("user", "complete"),
        ("assistant", "failed"),
    ]


def test_unknown_route_is_openai_shaped(gateway: str) -> None:
    r = httpx.get(f"{gateway}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xff\xfe",
        b'{"messages": [{"role": "user", "content": "x"}], "stream": "maybe"}',
        b'{"messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}',
        b'{"messages": [{"role": "user", "content": "x"}], "top_p": 0}',
        b'{"messages": [{"role": "user", "content": "x"}], "seed": "x"}',
        b'{"messages": [{"role": "user", "content": "x"}], "logprobs": true}',
    ],
)
def test_bad_bodies_are_400(gateway: str, auth: dict[str, str], body: bytes) -> None:
    r = httpx.post(f"{gateway}/v1/chat/completions", content=body, headers=auth, timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_stream_orders_events_and_drops_duplicates() -> None:
    async def run() -> list[int]:
        stream = RequestStream("r", asyncio.get_running_loop())
        stream.push_threadsafe([make_event("r", seq, text=str(seq)) for seq in (2, 0, 0)])
        for seq in (1, 4, 3):
            stream.push_threadsafe([make_event("r", seq, text=str(seq), finish_reason=None)])
        stream.push_threadsafe([make_event("r", 5, finish_reason="stop")])
        stream.push_threadsafe([make_event("r", 6, text="late")])
        return [event["seq"] async for event in stream.events(5)]

    assert asyncio.run(run()) == [0, 1, 2, 3, 4, 5]


def test_sink_takes_a_packed_batch_and_drops_what_is_not_an_event() -> None:
    async def run() -> tuple[int, list[str]]:
        sink = EventSink()
        stream = sink.open("r")
        batch = [
            make_event("r", 1, text="b"),
            {"request_id": "r", "seq": -1},  # malformed: dropped
            "not an event",
            make_event("other", 0, text="x"),  # no such stream here: dropped
            make_event("r", 0, text="a"),
            make_event("r", 2, finish_reason="stop"),
        ]
        count = await asyncio.to_thread(sink.deliver, pack_events(batch))  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest):
            sink.deliver('{"not": "a list"}')
        return count, [event["text"] async for event in stream.events(5)]

    assert asyncio.run(run()) == (3, ["a", "b", ""])


def test_a_stream_that_keeps_delivering_outlives_its_idle_limit() -> None:
    """The idle limit counts from the last event, not from the start of the answer."""

    async def run() -> list[dict[str, object]]:
        stream = RequestStream("r", asyncio.get_running_loop())

        async def feed() -> None:
            for seq in range(6):
                await asyncio.sleep(0.1)
                reason = "stop" if seq == 5 else None
                stream.push_threadsafe([make_event("r", seq, text="x", finish_reason=reason)])

        feeder = asyncio.create_task(feed())
        events = [event async for event in stream.events(0.25)]
        await feeder
        return events

    events = asyncio.run(run())
    assert [e["finish_reason"] for e in events] == [None] * 5 + ["stop"]


def test_stream_times_out_with_one_error_event() -> None:
    async def run() -> list[dict[str, object]]:
        stream = RequestStream("r", asyncio.get_running_loop())
        stream.push_threadsafe([make_event("r", 0, text="a")])
        return [event async for event in stream.events(0.2)]

    events = asyncio.run(run())
    assert [e["finish_reason"] for e in events] == [None, "error"]
