"""Every parameter of ``POST /v1/chat/completions`` is bounded; a violation is a 400 in the
OpenAI error shape whose ``param`` names the parameter (pure logic: the request model, the wire
check behind it and the body reader; tests/test_schemathesis.py drives the real gateway)."""

from __future__ import annotations

from typing import Any

import pytest

from llmtree.errors import InvalidRequest
from llmtree.gateway.schemas import (
    MAX_CONTENT_PARTS,
    MAX_PROMPT_CHARS,
    chat_request_openapi,
    parse_chat_request,
)
from llmtree.protocol import (
    MAX_MESSAGE_CHARS,
    MAX_MESSAGES,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOKENS_LIMIT,
    SamplingParams,
)


def body(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    base.update(kw)
    return base


def refused(data: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        chat = parse_chat_request(data)
        SamplingParams.from_wire(chat.sampling_wire(512))  # what the route does next
    error = info.value
    shape = error.to_openai()["error"]
    assert set(shape) == {"message", "type", "param", "code"}
    assert shape["type"] == "invalid_request_error" and error.http_status == 400
    return error


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


BAD: list[tuple[dict[str, Any], str]] = [
    # messages: count, length of one, all together, shape
    (body(messages=[]), "messages"),
    (body(messages=[user("x")] * (MAX_MESSAGES + 1)), "messages"),
    (body(messages=[user("x" * (MAX_MESSAGE_CHARS + 1))]), "messages"),
    (
        body(messages=[user([{"type": "text", "text": "x" * 40_000}] * 2)]),
        "messages",
    ),  # parts that are short alone but too long together
    (body(messages=[user([{"type": "text", "text": "x"}] * (MAX_CONTENT_PARTS + 1))]), "messages"),
    (body(messages=[user("x" * 60_000)] * 5), "messages"),  # 300k > MAX_PROMPT_CHARS
    (body(messages=[{"role": "wizard", "content": "x"}]), "messages"),
    (body(messages=[user(7)]), "messages"),
    (body(messages="hi"), "messages"),
    (body(messages=[user([{"type": "image_url", "image_url": "http://x"}])]), "messages"),
    # token counts
    (body(max_tokens=0), "max_tokens"),
    (body(max_tokens=-5), "max_tokens"),
    (body(max_tokens=MAX_TOKENS_LIMIT + 1), "max_tokens"),
    (body(max_tokens=10**30), "max_tokens"),
    (body(max_tokens="10"), "max_tokens"),
    (body(max_tokens=True), "max_tokens"),
    (body(max_tokens=1.5), "max_tokens"),
    (body(max_completion_tokens=0), "max_completion_tokens"),
    (body(max_completion_tokens=MAX_TOKENS_LIMIT + 1), "max_completion_tokens"),
    (body(min_tokens=-1), "min_tokens"),
    (body(min_tokens=MAX_TOKENS_LIMIT + 1), "min_tokens"),
    (body(min_tokens=20, max_tokens=10), "min_tokens"),
    (body(min_tokens=600), "min_tokens"),  # over the default max_tokens (512)
    # sampling
    (body(temperature=-0.1), "temperature"),
    (body(temperature=2.01), "temperature"),
    (body(temperature=float("nan")), "temperature"),
    (body(temperature=float("inf")), "temperature"),
    (body(temperature="hot"), "temperature"),
    (body(top_p=0), "top_p"),
    (body(top_p=1.01), "top_p"),
    (body(top_p=1e-9), "top_p"),  # the wire check's lower bound (1e-6)
    (body(top_k=-2), "top_k"),
    (body(top_k=10**7), "top_k"),
    (body(seed=2**63), "seed"),
    (body(seed=-(2**63) - 1), "seed"),
    (body(seed="42"), "seed"),
    (body(n=2), "n"),
    (body(n=0), "n"),
    (body(n=10**9), "n"),
    # stop: count, length, type
    (body(stop=["a"] * (MAX_STOP_STRINGS + 1)), "stop"),
    (body(stop="x" * (MAX_STOP_CHARS + 1)), "stop"),
    (body(stop=["x" * (MAX_STOP_CHARS + 1)]), "stop"),
    (body(stop=[""]), "stop"),
    (body(stop=""), "stop"),
    (body(stop=[1]), "stop"),
    (body(stop={"a": 1}), "stop"),
    # the rest
    (body(model="m" * 300), "model"),
    (body(stream="yes"), "stream"),
    (body(stream=1), "stream"),
    (body(stream_options={"include_usage": "yes"}), "stream_options"),
    (body(logprobs=True), "logprobs"),
    (body(tools=[{"type": "function"}]), "tools"),
    (body(ignore_eos="yes"), "ignore_eos"),
]


@pytest.mark.parametrize(("data", "param"), BAD, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD)])
def test_out_of_bounds_is_400_naming_the_parameter(data: dict[str, Any], param: str) -> None:
    assert refused(data).param == param


@pytest.mark.parametrize("data", [None, [], "x", 5, [{"messages": []}]])
def test_a_body_that_is_not_an_object_is_refused(data: Any) -> None:
    refused(data)


def test_the_bounds_themselves_are_accepted() -> None:
    chat = parse_chat_request(
        body(
            messages=[user("x" * 1000)] * 150 + [user("y" * MAX_MESSAGE_CHARS)],
            max_tokens=MAX_TOKENS_LIMIT,
            min_tokens=MAX_TOKENS_LIMIT,
            temperature=2,
            top_p=1,
            top_k=-1,
            seed=2**63 - 1,
            stop=["s" * MAX_STOP_CHARS] * MAX_STOP_STRINGS,
            n=1,
            model="m" * 256,
            stream=True,
            stream_options={"include_usage": True},
            logprobs=False,
            tools=[],
            user="ignored",
            frequency_penalty=0,
        )
    )
    sampling = SamplingParams.from_wire(chat.sampling_wire(512))
    assert sampling.max_tokens == MAX_TOKENS_LIMIT and sampling.top_k == 0
    assert len(sampling.stop) == MAX_STOP_STRINGS
    assert sum(len(m.text()) for m in chat.messages) <= MAX_PROMPT_CHARS


def test_max_completion_tokens_wins_and_developer_is_system() -> None:
    chat = parse_chat_request(
        body(
            messages=[{"role": "developer", "content": [{"type": "text", "text": "be brief"}]}],
            max_tokens=100,
            max_completion_tokens=7,
        )
    )
    assert chat.sampling_wire(512)["max_tokens"] == 7
    assert chat.messages[0].as_wire() == {"role": "system", "content": "be brief"}


def test_the_openapi_body_states_the_bounds() -> None:
    schema = chat_request_openapi()["requestBody"]["content"]["application/json"]["schema"]
    props = schema["properties"]
    assert schema["required"] == ["messages"]
    assert props["messages"]["maxItems"] == MAX_MESSAGES and props["messages"]["minItems"] == 1
    assert "$ref" not in str(schema)  # self-contained: it sits inside one operation
    bounded = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed"}
    for name in bounded | {"min_tokens", "n"}:
        (number,) = [s for s in props[name]["anyOf"] if s.get("type") != "null"]
        assert "maximum" in number and ("minimum" in number or "exclusiveMinimum" in number)
    assert props["n"]["anyOf"][0]["maximum"] == 1
    stop = [s for s in props["stop"]["anyOf"] if s.get("type") != "null"]
    assert {s["type"] for s in stop} == {"string", "array"}
    assert [s["maxItems"] for s in stop if s["type"] == "array"] == [MAX_STOP_STRINGS]


@pytest.mark.parametrize(
    ("raw", "declared", "fragment"),
    [
        (b"", None, "empty"),
        (b"\xff\xfe", None, "not valid JSON"),
        (b"{", None, "not valid JSON"),
        (b"[1]" + b" " * 2000, None, "larger than"),
        (b"{}", "99999999", "larger than"),
        (b"{}", "-1", "larger than"),
        (b"{}", "abc", "larger than"),
    ],
)
def test_body_reader_bounds(raw: bytes, declared: str | None, fragment: str) -> None:
    import asyncio

    from starlette.requests import Request

    from llmtree.gateway.body import read_json

    headers = [(b"content-type", b"application/json")]
    if declared is not None:
        headers.append((b"content-length", declared.encode()))
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(read_json(Request(scope, receive), max_bytes=1024))
    assert fragment in info.value.message


def test_integral_numbers_count_as_integers_but_nothing_else_does() -> None:
    chat = parse_chat_request(body(max_tokens=3.0, top_k=2.0, seed=1e3, n=1.0))
    assert (chat.max_tokens, chat.top_k, chat.seed, chat.n) == (3, 2, 1000, 1)
    for bad in (3.5, "3", True):
        assert refused(body(max_tokens=bad)).param == "max_tokens"


def test_a_message_names_the_place_without_pydantic_internals() -> None:
    error = refused(body(messages=[user([{"type": "image_url"}])]))
    assert error.param == "messages"
    assert error.message.startswith("messages.0.content.0.type:"), error.message
    assert "constrained" not in refused(body(messages=[user(5)])).message
