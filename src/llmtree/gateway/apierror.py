"""``ApiError``: an HTTP error of the chat product's API with its own ``code``, in OpenAI shape."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """Raised by the ``/api`` routes; ``create_app`` turns it into a JSON error response."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.kind, self.param, self.headers = kind, param, headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found", "not_found_error")


def not_authenticated() -> ApiError:
    return ApiError(401, "not_authenticated", "log in first", "authentication_error")
