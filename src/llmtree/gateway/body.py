"""Reading a JSON request body with a size bound; every failure is a 400 in OpenAI shape."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from llmtree.errors import InvalidRequest


async def read_json(request: Request, max_bytes: int) -> Any:
    """The decoded body; InvalidRequest if it is too large, not UTF-8 or not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise InvalidRequest(f"request body larger than {max_bytes} bytes")
    body = bytearray()
    async for piece in request.stream():
        body.extend(piece)
        if len(body) > max_bytes:
            raise InvalidRequest(f"request body larger than {max_bytes} bytes")
    if not body:
        raise InvalidRequest("request body is empty; send a JSON object")
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidRequest(f"request body is not valid JSON: {error}") from None
