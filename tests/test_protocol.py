"""Validation of wire messages: bad input from a user or a peer is refused, never crashes."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from llmtree.errors import InvalidRequest
from llmtree.protocol import (
    GenerateRequest,
    SamplingParams,
    is_valid_event,
    make_event,
    pack_events,
    unpack_events,
)


def request(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "request_id": "r1",
        "messages": [{"role": "user", "content": "hi"}],
        "sampling": {},
    }
    base.update(kw)
    return base


def test_round_trip() -> None:
    req = GenerateRequest.from_wire(request(sampling={"max_tokens": 5, "stop": "x", "seed": 3}))
    again = GenerateRequest.from_wire(req.to_wire())
    assert again == req
    assert again.sampling.stop == ["x"] and again.sampling.seed == 3


def test_sampling_wire_form_holds_every_field() -> None:
    """``to_wire`` is written out by hand; a field it forgot would fall back to its default."""
    sampling = SamplingParams(
        max_tokens=9, temperature=0.5, top_p=0.9, top_k=4, seed=7, stop=["x"], min_tokens=2,
        ignore_eos=True,
    )  # fmt: skip
    wire = sampling.to_wire()
    assert wire == dataclasses.asdict(sampling)
    assert SamplingParams.from_wire(wire) == sampling
    wire["stop"].append("y")
    assert sampling.stop == ["x"]  # a copy: the wire form can be changed without the request


@pytest.mark.parametrize(
    ("sampling", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"min_tokens": 9, "max_tokens": 3}, "min_tokens"),
        ({"stop": ["a"] * 5}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"top_k": -1}, "top_k"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_bad_sampling_is_refused(sampling: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        SamplingParams.from_wire(sampling)
    assert info.value.param == param


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        request(request_id=""),
        request(request_id=7),
        request(messages=[]),
        request(messages="hi"),
        request(messages=[{"role": "wizard", "content": "x"}]),
        request(messages=[{"role": "user", "content": 5}]),
        request(messages=[{"role": "user", "content": "x" * 70_000}]),
        request(path="root"),
        request(sink=5),
    ],
)
def test_bad_requests_are_refused(data: Any) -> None:
    with pytest.raises(InvalidRequest):
        GenerateRequest.from_wire(data)


def test_a_packed_request_travels_as_one_json_string_and_comes_back_equal() -> None:
    req = GenerateRequest.from_wire(request(messages=[{"role": "user", "content": 'Hé ✓ "x"'}]))
    packed = req.pack()
    assert isinstance(packed, str)
    assert GenerateRequest.from_wire(packed) == req
    assert GenerateRequest.from_wire(req.to_wire()) == req  # a plain dict is still taken


@pytest.mark.parametrize(
    "payload",
    ["", "{", "[]", "17", "null", "[" * 100_000, " " * (16 * 1024 * 1024 + 1), json.dumps([1])],
)
def test_a_malformed_packed_request_is_refused(payload: str) -> None:
    with pytest.raises(InvalidRequest):
        GenerateRequest.from_wire(payload)


def test_a_lone_surrogate_a_user_may_send_travels_too() -> None:
    """orjson refuses lone surrogates; the standard library's JSON takes them, as before."""
    req = GenerateRequest.from_wire(request(messages=[{"role": "user", "content": "a\ud800b"}]))
    assert GenerateRequest.from_wire(req.pack()) == req
    events = [make_event("r1", 0, text="\udfff", token_ids=[1])]
    assert unpack_events(pack_events(events)) == events


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_not_a_number_is_refused_in_packed_json(constant: str) -> None:
    text = json.dumps(request()).replace('"request_id"', f'"x": {constant}, "request_id"', 1)
    with pytest.raises(InvalidRequest):
        GenerateRequest.from_wire(text)
    with pytest.raises(InvalidRequest):
        unpack_events(f'[{{"seq": {constant}}}, "\ud800"]')


def test_a_packed_request_is_checked_like_a_plain_one() -> None:
    bad = json.dumps(request(messages=[{"role": "wizard", "content": "x"}]))
    with pytest.raises(InvalidRequest, match="role"):
        GenerateRequest.from_wire(bad)


def test_event_validation() -> None:
    assert is_valid_event(make_event("r", 0, "a", [1]))
    assert is_valid_event(make_event("r", 3, finish_reason="stop"))
    assert not is_valid_event({"request_id": "r", "seq": -1})
    assert not is_valid_event({"request_id": "r", "seq": True})
    assert not is_valid_event(make_event("r", 0, finish_reason="exploded"))
    assert not is_valid_event("event")
    assert not is_valid_event({**make_event("r", 0), "finish_reason": []})  # unhashable: no raise
    assert not is_valid_event({**make_event("r", 0), "token_ids": "12"})
    assert not is_valid_event({**make_event("r", 0), "request_id": 5})
    assert not is_valid_event({"request_id": "r", "seq": 1.0})


def test_deliveries_travel_as_one_json_array_and_come_back_equal() -> None:
    events = [
        make_event("r1", 0, text="Hé ✓", token_ids=[1, 2]),
        make_event("r2", 7, finish_reason="stop", usage={"prompt_tokens": 3}, error=None),
    ]
    packed = pack_events(events)
    assert isinstance(packed, str)
    assert unpack_events(packed) == events
    assert unpack_events(events) is events  # a plain list (peers sending lists) passes as is


@pytest.mark.parametrize(
    "payload",
    ["", "{", '{"a": 1}', "17", "null", "[" * 100_000, "x" * (8 * 1024 * 1024 + 1), 3, None, {}],
)
def test_a_malformed_delivery_is_refused(payload: object) -> None:
    with pytest.raises(InvalidRequest):
        unpack_events(payload)
