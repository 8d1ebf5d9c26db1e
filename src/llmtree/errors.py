"""The one exception tree of llmtree, translated at the edges.

    LlmTreeError                 base; carries an OpenAI ``error_type`` and an HTTP status
    ├── InvalidRequest           bad input from a user or a peer (400)
    │   └── ContextLengthExceeded   prompt + max_tokens do not fit the model (400)
    ├── NotFound                 an unknown model, node or object (404)
    ├── Overloaded               no node can take the request now (503, Retry-After)
    ├── NodeUnavailable          a Pyro5 peer cannot be reached (503); Pyro5 errors become this
    ├── RegistryError            the LDAP directory failed (503); ldap3 errors become this
    │   ├── NameTaken            a live node already has that name (409)
    │   └── UnknownNode          no node of that name is registered (404)
    ├── EngineError              the model failed while serving (500)
    └── ConfigError              a setting is wrong; the message says what to change

Pyro5 carries these across processes: ``register_remote_errors()`` teaches its serializer to
rebuild exactly these classes (and no others) from the wire.
"""

from __future__ import annotations

from typing import Any, ClassVar


class LlmTreeError(Exception):
    """Base of every error llmtree raises on purpose."""

    error_type: ClassVar[str] = "server_error"
    http_status: ClassVar[int] = 500
    code: ClassVar[str | None] = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(LlmTreeError):
    """A request or parameter is malformed or out of range."""

    error_type = "invalid_request_error"
    http_status = 400


class ContextLengthExceeded(InvalidRequest):
    """The prompt plus ``max_tokens`` do not fit the model's context window."""

    code = "context_length_exceeded"


class NotFound(LlmTreeError):
    """An unknown model, node or object."""

    error_type = "not_found_error"
    http_status = 404
    code = "not_found"


class Overloaded(LlmTreeError):
    """Every slot and queue that could take the request is full; retry later."""

    error_type = "server_overloaded"
    http_status = 503
    code = "overloaded"


class NodeUnavailable(LlmTreeError):
    """A node cannot be reached (dead, refused, timed out)."""

    error_type = "service_unavailable"
    http_status = 503
    code = "node_unavailable"


class RegistryError(LlmTreeError):
    """The LDAP directory could not be read or written."""

    error_type = "service_unavailable"
    http_status = 503
    code = "registry_error"


class NameTaken(RegistryError):
    """A live node already holds this name."""

    error_type = "invalid_request_error"
    http_status = 409
    code = "name_taken"


class UnknownNode(RegistryError):
    """No node of this name is registered."""

    error_type = "not_found_error"
    http_status = 404
    code = "unknown_node"


class EngineError(LlmTreeError):
    """The model failed while serving a request."""

    code = "engine_error"


class ConfigError(LlmTreeError):
    """A setting is missing or wrong; the message says what to change."""

    code = "config_error"


REMOTE_ERRORS: tuple[type[LlmTreeError], ...] = (
    LlmTreeError,
    InvalidRequest,
    ContextLengthExceeded,
    NotFound,
    Overloaded,
    NodeUnavailable,
    RegistryError,
    NameTaken,
    UnknownNode,
    EngineError,
    ConfigError,
)


def register_remote_errors() -> None:
    """Let Pyro5's serializer rebuild llmtree errors raised by a peer (idempotent)."""
    from Pyro5.api import register_class_to_dict, register_dict_to_class

    def to_dict(error: Any) -> dict[str, Any]:
        return {
            "__class__": f"{type(error).__module__}.{type(error).__name__}",
            "__exception__": True,
            "message": str(getattr(error, "message", "")),
            "param": getattr(error, "param", None),
        }

    for cls in REMOTE_ERRORS:

        def from_dict(_name: str, data: dict[str, Any], cls: type[LlmTreeError] = cls) -> Any:
            message = data.get("message")
            param = data.get("param")
            return cls(
                str(message)[:2000] if message is not None else cls.__name__,
                param if isinstance(param, str) else None,
            )

        register_class_to_dict(cls, to_dict)
        register_dict_to_class(f"{cls.__module__}.{cls.__name__}", from_dict)
