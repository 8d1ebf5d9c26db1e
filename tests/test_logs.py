"""JSON log lines (pure logic): the fields, and where request_id comes from."""

from __future__ import annotations

import json
import logging

from llmtree.logs import REQUEST_ID, ContextFilter, JsonFormatter, request_id_of


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("llmtree.x", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def _line(record: logging.LogRecord) -> dict[str, object]:
    ContextFilter("worker-3").filter(record)
    parsed: dict[str, object] = json.loads(JsonFormatter().format(record))
    return parsed


def test_a_line_is_one_json_object_with_node_and_request_id() -> None:
    line = _line(_record("request %s admitted: %d prompt tokens", "chatcmpl-abc123", 12))
    assert line["node"] == "worker-3" and line["level"] == "INFO"
    assert line["message"] == "request chatcmpl-abc123 admitted: 12 prompt tokens"
    assert line["request_id"] == "chatcmpl-abc123"
    assert str(line["ts"]).endswith("Z") and line["logger"] == "llmtree.x"


def test_request_id_sources_in_order() -> None:
    assert request_id_of(_record("x", request_id="given")) == "given"
    token = REQUEST_ID.set("from-context")
    try:
        assert request_id_of(_record("request %s ended", "r-9")) == "from-context"
    finally:
        REQUEST_ID.reset(token)
    assert request_id_of(_record("request %s ended", "r-9")) == "r-9"  # named by the message
    assert request_id_of(_record("%d events for chatcmpl-%s", 3, "x")) is None
    assert request_id_of(_record("child %s on %s", "n1", "chatcmpl-f00d")) == "chatcmpl-f00d"
    assert request_id_of(_record("cancel request_id=%s failed: %s", "q-1", "boom")) == "q-1"
    assert request_id_of(_record("heartbeat failed: %s", "timeout")) is None


def test_extra_fields_and_exceptions_are_kept() -> None:
    try:
        raise ValueError("bad")
    except ValueError:
        import sys

        record = _record("failed", attempt=2)
        record.exc_info = sys.exc_info()
    line = _line(record)
    assert line["attempt"] == 2 and line["request_id"] is None
    assert "ValueError: bad" in str(line["exception"])
