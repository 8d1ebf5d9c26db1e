"""Wire vocabulary: what crosses Pyro5 between the gateway and the nodes.

Only plain dicts, lists, str, int, float, bool and None travel. Each message is a dataclass here
with ``to_wire()`` and a validating ``from_wire()``, so input from a peer is checked the same way
as input from a user before anything acts on it.

Events (node -> root -> gateway) are plain dicts built by ``make_event``::

    {"request_id", "seq", "text", "token_ids", "finish_reason", "node", "usage"}

``seq`` counts from 0 per request; ``finish_reason`` is None until the one terminal event
(``stop``, ``length``, ``cancelled`` or ``error``); receivers order by ``seq`` and drop duplicates.
A serving node's events also carry the request's ``attempt`` (the root drops those of an
abandoned placement and renumbers ``seq`` so a failed-over stream stays continuous); an ``error``
event may carry a ``code`` (e.g. ``queue_timeout``, ``retries_exhausted``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from llmtree.errors import InvalidRequest

FINISH_REASONS: Final = ("stop", "length", "cancelled", "error")
_FINISHES: Final = (None, *FINISH_REASONS)  # a tuple: `in` must not hash what a peer sent
_NO_TOKENS: Final[list[int]] = []
ROLES: Final = ("system", "user", "assistant")

MAX_MESSAGES: Final = 256
MAX_MESSAGE_CHARS: Final = 64_000
MAX_STOP_STRINGS: Final = 4
MAX_STOP_CHARS: Final = 64
MAX_TOKENS_LIMIT: Final = 8192
MAX_ID_CHARS: Final = 128
MAX_PRIORITY: Final = 1000
MAX_TOKEN_ID: Final = 2**31 - 1
MAX_ATTEMPTS: Final = 1000
MAX_PACKED_REQUEST_CHARS: Final = 16 * 1024 * 1024
"""Largest JSON text one ``submit`` call may carry (Pyro5's message limit here too)."""


def _require(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise InvalidRequest(message, param=param)


def _number(data: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = data.get(key, default)
    if value is None:
        return default
    _require(
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value),
        f"'{key}' must be a number",
        key,
    )
    _require(low <= value <= high, f"'{key}' must be between {low:g} and {high:g}", key)
    return float(value)


def _integer(
    data: dict[str, Any], key: str, default: int | None, low: int, high: int
) -> int | None:
    value = data.get(key, default)
    if value is None:
        return default
    _require(
        isinstance(value, int) and not isinstance(value, bool), f"'{key}' must be an integer", key
    )
    _require(low <= value <= high, f"'{key}' must be between {low} and {high}", key)
    return int(value)


@dataclass(slots=True)
class SamplingParams:
    """How to sample one request's tokens (OpenAI names, plus vLLM's min_tokens/ignore_eos)."""

    max_tokens: int = 256
    """Most tokens to generate."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    seed: int | None = None
    """Seed for a reproducible sample of this request alone."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the answer; they are not part of it."""
    min_tokens: int = 0
    """Generate at least this many tokens before EOS or a stop string may end the answer."""
    ignore_eos: bool = False
    """Keep going past the end-of-sequence token (for benchmarks)."""

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> SamplingParams:
        _require(isinstance(data, dict), "sampling parameters must be an object", "sampling")
        stop = data.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        _require(isinstance(stop, list), "'stop' must be a string or a list of strings", "stop")
        _require(len(stop) <= MAX_STOP_STRINGS, f"'stop' takes at most {MAX_STOP_STRINGS}", "stop")
        for item in stop:
            _require(
                isinstance(item, str) and 0 < len(item) <= MAX_STOP_CHARS,
                f"each stop string must have 1 to {MAX_STOP_CHARS} characters",
                "stop",
            )
        max_tokens = _integer(data, "max_tokens", 256, 1, MAX_TOKENS_LIMIT)
        min_tokens = _integer(data, "min_tokens", 0, 0, MAX_TOKENS_LIMIT)
        assert max_tokens is not None and min_tokens is not None
        _require(
            min_tokens <= max_tokens, "'min_tokens' must not exceed 'max_tokens'", "min_tokens"
        )
        ignore_eos = data.get("ignore_eos", False)
        _require(isinstance(ignore_eos, bool), "'ignore_eos' must be true or false", "ignore_eos")
        return cls(
            max_tokens=max_tokens,
            temperature=_number(data, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(data, "top_p", 1.0, 1e-6, 1.0),
            top_k=_integer(data, "top_k", 0, 0, 1_000_000) or 0,
            seed=_integer(data, "seed", None, -(2**63), 2**63 - 1),
            stop=list(stop),
            min_tokens=min_tokens,
            ignore_eos=ignore_eos,
        )

    def to_wire(self) -> dict[str, Any]:
        """The fields as a plain dict, built by hand: ``dataclasses.asdict`` copies deeply, and
        with it ``GenerateRequest.pack``, paid at every hop, took 22 us instead of 3."""
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": list(self.stop),
            "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos,
        }


@dataclass(slots=True)
class GenerateRequest:
    """One chat completion on its way down the tree."""

    request_id: str
    """Made once by the gateway, carried everywhere."""
    messages: list[dict[str, str]]
    """The conversation: ``[{"role": ..., "content": ...}]``."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    sink: str = ""
    """Pyro5 URI of the gateway's event sink (the root delivers events there)."""
    root: str = ""
    """Pyro5 URI of the root; the serving node sends its events straight there."""
    path: list[str] = field(default_factory=list)
    """Names of the nodes the request passed through, root first."""
    priority: int = 0
    """Higher is admitted first where requests wait (FIFO within one priority)."""
    prefix_ids: list[int] = field(default_factory=list)
    """Answer tokens already streamed (failover): the engine continues after them."""
    attempt: int = 0
    """Which placement of the request this is (the root counts re-submissions)."""

    @classmethod
    def from_wire(cls, data: Any) -> GenerateRequest:
        """A request from a peer: a JSON object in a string (``pack``) or a plain dict."""
        if isinstance(data, str):
            data = _from_json(data, MAX_PACKED_REQUEST_CHARS)
        _require(isinstance(data, dict), "request must be an object", "request")
        request_id = data.get("request_id")
        _require(
            isinstance(request_id, str) and 0 < len(request_id) <= MAX_ID_CHARS,
            "'request_id' must be a short string",
            "request_id",
        )
        messages = data.get("messages")
        _require(
            isinstance(messages, list) and 0 < len(messages) <= MAX_MESSAGES,
            f"'messages' must be a list of 1 to {MAX_MESSAGES} messages",
            "messages",
        )
        clean: list[dict[str, str]] = []
        for message in messages:
            _require(isinstance(message, dict), "each message must be an object", "messages")
            role, content = message.get("role"), message.get("content")
            _require(role in ROLES, f"message role must be one of {', '.join(ROLES)}", "messages")
            _require(
                isinstance(content, str) and len(content) <= MAX_MESSAGE_CHARS,
                f"message content must be a string of at most {MAX_MESSAGE_CHARS} characters",
                "messages",
            )
            clean.append({"role": str(role), "content": content})
        path = data.get("path") or []
        _require(
            isinstance(path, list) and len(path) <= 64 and all(isinstance(p, str) for p in path),
            "'path' must be a list of node names",
            "path",
        )
        sink, root = data.get("sink", ""), data.get("root", "")
        _require(isinstance(sink, str) and len(sink) <= 256, "'sink' must be a URI", "sink")
        _require(isinstance(root, str) and len(root) <= 256, "'root' must be a URI", "root")
        prefix = data.get("prefix_ids") or []
        _require(
            isinstance(prefix, list)
            and len(prefix) <= MAX_TOKENS_LIMIT
            and all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_TOKEN_ID
                for t in prefix
            ),
            f"'prefix_ids' must be a list of at most {MAX_TOKENS_LIMIT} token ids",
            "prefix_ids",
        )
        priority = _integer(data, "priority", 0, -MAX_PRIORITY, MAX_PRIORITY) or 0
        attempt = _integer(data, "attempt", 0, 0, MAX_ATTEMPTS) or 0
        return cls(
            request_id=request_id,
            messages=clean,
            sampling=SamplingParams.from_wire(data.get("sampling") or {}),
            sink=sink,
            root=root,
            path=list(path),
            priority=priority,
            prefix_ids=list(prefix),
            attempt=attempt,
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "messages": self.messages,
            "sampling": self.sampling.to_wire(),
            "sink": self.sink,
            "root": self.root,
            "path": self.path,
            "priority": self.priority,
            "prefix_ids": self.prefix_ids,
            "attempt": self.attempt,
        }

    def pack(self) -> str:
        """The wire form as one JSON object in a string: what ``submit`` calls carry.

        For the same reason as ``pack_events``: serpent encodes a dict in Python and decodes it
        with ``ast.literal_eval`` (about 190 us for a short chat request), a string costs it
        next to nothing, and orjson (``_dumps``) does the rest in a few us. Every hop down the
        tree pays this once.
        """
        return _dumps(self.to_wire())


def make_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def make_event(
    request_id: str,
    seq: int,
    text: str = "",
    token_ids: list[int] | None = None,
    finish_reason: str | None = None,
    node: str = "",
    usage: dict[str, int] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """A token event; ``usage`` (and ``error`` when finish_reason is "error") ride on the last."""
    event: dict[str, Any] = {
        "request_id": request_id,
        "seq": seq,
        "text": text,
        "token_ids": token_ids or [],
        "finish_reason": finish_reason,
        "node": node,
        "usage": usage,
    }
    if error is not None:
        event["error"] = error
    return event


def is_valid_event(event: Any) -> bool:
    """True for a well-formed event from a peer; anything else is dropped by the receiver.

    Every event passes here at the root and again at the gateway, so it is written for speed:
    ``type(seq) is int`` also refuses a bool (a subclass of int)."""
    if type(event) is not dict:
        return False
    seq = event.get("seq")
    return (
        type(seq) is int
        and seq >= 0
        and type(event.get("request_id")) is str
        and type(event.get("text", "")) is str
        and type(event.get("token_ids", _NO_TOKENS)) is list
        and event.get("finish_reason") in _FINISHES
    )


MAX_PACKED_EVENTS_CHARS: Final = 8 * 1024 * 1024
"""Largest JSON text one ``deliver`` call may carry."""


def _dumps(value: Any) -> str:
    """JSON text of plain values: by orjson (13x the standard library's speed here: 9 against
    117 us for a step's 32 events), or by the standard library for the one thing orjson refuses,
    a lone surrogate in a string (which JSON from a user may hold)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _from_json(payload: str, limit: int) -> Any:
    """The value of a peer's JSON text, or None when it is too long or not JSON. orjson reads it
    (2.4x the standard library's speed), the standard library what orjson refuses (a lone
    surrogate); both refuse NaN and infinities, and build plain values only."""
    if len(payload) > limit:
        return None
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(payload, parse_constant=_not_a_number)
    except (ValueError, RecursionError):
        return None


def _not_a_number(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def pack_events(events: list[dict[str, Any]]) -> str:
    """A batch of events as one JSON array in a string, the form ``deliver`` calls carry.

    Pyro5's serpent decodes a list of dicts with ``ast.literal_eval``, which costs more than the
    rest of a delivery; one string literal is nearly free to decode, and orjson (in Rust, see
    ``_dumps``) reads what it holds. Both decoders only build plain values.
    """
    return _dumps(events)


def unpack_events(payload: Any) -> list[Any]:
    """The events of a ``deliver`` call: a JSON array in a string, or a plain list (peers that
    send a list, as before); InvalidRequest for anything else. Events are validated one by one
    by the caller (``is_valid_event``)."""
    if isinstance(payload, list):
        return payload
    if isinstance(payload, str) and isinstance(
        value := _from_json(payload, MAX_PACKED_EVENTS_CHARS), list
    ):
        return value
    raise InvalidRequest("events must be a JSON array or a list", param="events")
