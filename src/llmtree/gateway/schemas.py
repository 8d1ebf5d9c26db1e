"""OpenAI request bodies: every parameter bounded here, so the OpenAPI spec states the bounds.

``protocol`` checks the same ranges again on the wire (a peer is no more trusted than a user);
the constants come from there. A violation is an ``InvalidRequest`` whose ``param`` is the
top-level parameter at fault (``messages``, ``max_tokens``, ``stop``...).
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from llmtree.errors import InvalidRequest
from llmtree.protocol import (
    MAX_MESSAGE_CHARS,
    MAX_MESSAGES,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOKENS_LIMIT,
)

MAX_PROMPT_CHARS: Final = 256_000
"""All messages' content together."""
MAX_CONTENT_PARTS: Final = 64
"""Parts of one message given as a list of ``{"type": "text", "text": ...}``."""
MAX_MODEL_CHARS: Final = 256
MAX_TOP_K: Final = 1_000_000
SEED_MIN: Final = -(2**63)
SEED_MAX: Final = 2**63 - 1
MIN_TOP_P: Final = 1e-6
_UNION_TAGS: Final = frozenset({"str", "int", "float", "bool", "list", "none"})


def _integral(value: Any) -> Any:
    """JSON Schema counts 3.0 as an integer; so do we (strict mode still refuses 3.5, "3", true)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Integral = BeforeValidator(_integral)  # after the bounds, so the schema shows them
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
TokenCount = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT), Integral]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str = Field(max_length=MAX_MESSAGE_CHARS)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: (
        Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)]
        | Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS)]
        | None
    ) = ""

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def as_wire(self) -> dict[str, str]:
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``; unknown fields are ignored, unsupported ones refused.

    Strict types: ``"10"`` is not a number and ``1`` is not ``true``.
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = Field(default=None, max_length=MAX_MODEL_CHARS)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=MIN_TOP_P, le=1.0)
    top_k: Annotated[int, Field(ge=-1, le=MAX_TOP_K), Integral] | None = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX), Integral] | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    n: Annotated[int, Field(ge=1, le=1), Integral] | None = Field(
        default=1, description="only 1 is supported"
    )
    min_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS_LIMIT), Integral] | None = None
    ignore_eos: bool | None = None
    logprobs: bool | None = Field(default=None, description="not supported: only false")
    tools: list[Any] | None = Field(default=None, description="not supported: only empty")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> Any:
        items = [value] if isinstance(value, str) else value
        if value is None:
            return value
        if not isinstance(items, list) or len(items) > MAX_STOP_STRINGS:
            raise ValueError(f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS}")
        if not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in items):
            raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("tools are not supported")
        return value

    def sampling_wire(self, default_max_tokens: int) -> dict[str, Any]:
        max_tokens = self.max_completion_tokens or self.max_tokens
        top_k = self.top_k
        return {
            "max_tokens": default_max_tokens if max_tokens is None else max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": 0 if top_k == -1 else top_k,
            "seed": self.seed,
            "stop": self.stop,
            "min_tokens": self.min_tokens,
            "ignore_eos": bool(self.ignore_eos),
        }


def _check_totals(chat: ChatCompletionRequest) -> None:
    for index, message in enumerate(chat.messages):
        if len(message.text()) > MAX_MESSAGE_CHARS:
            raise InvalidRequest(
                f"messages.{index}: content longer than {MAX_MESSAGE_CHARS} characters",
                param="messages",
            )
    total = sum(len(message.text()) for message in chat.messages)
    if total > MAX_PROMPT_CHARS:
        raise InvalidRequest(
            f"the messages hold {total} characters; at most {MAX_PROMPT_CHARS} are accepted",
            param="messages",
        )
    max_tokens = chat.max_completion_tokens or chat.max_tokens
    if chat.min_tokens is not None and max_tokens is not None and chat.min_tokens > max_tokens:
        raise InvalidRequest("'min_tokens' must not exceed 'max_tokens'", param="min_tokens")


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; raises InvalidRequest naming the first bad parameter."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        chat = ChatCompletionRequest.model_validate(body)
    except ValidationError as error:
        first = max(error.errors(), key=lambda e: len(e.get("loc", ())))  # deepest branch
        loc = [
            str(part)
            for part in first.get("loc", ())
            if isinstance(part, int) or (str(part).isidentifier() and part not in _UNION_TAGS)
        ]
        where = ".".join(loc)
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        param = loc[0] if loc else None
        raise InvalidRequest(f"{where}: {message}" if where else message, param) from None
    _check_totals(chat)
    return chat


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {key: _inline(value, defs) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    return node


def chat_request_openapi() -> dict[str, Any]:
    """``openapi_extra`` for the chat route (it reads the raw body itself, to bound its size).

    The body schema is self-contained (its ``$defs`` inlined), so it fits into one operation.
    """
    schema = ChatCompletionRequest.model_json_schema()
    defs = schema.pop("$defs", {})
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _inline(schema, defs)}},
        }
    }
