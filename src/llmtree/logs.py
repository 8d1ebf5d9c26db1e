"""Log lines as text (the default) or as JSON, one object per line, for log collectors.

``LLMTREE_LOG_FORMAT=json`` (or ``llmtree --log-format json ...``) makes every llmtree process log
lines like::

    {"ts": "2026-11-22T06:01:02.345Z", "level": "INFO", "node": "worker-1",
     "logger": "llmtree.engine.engine", "message": "request chatcmpl-9f... admitted: ...",
     "request_id": "chatcmpl-9f..."}

``node`` is the process's name (a node's name, ``gateway``, ``up``). ``request_id`` is, in this
order: the ``request_id`` given with ``extra=``, the one set in ``REQUEST_ID`` (a context variable,
so it follows a request through its asyncio task or thread), or the request id the message names
(an argument like ``chatcmpl-...``, or the one that follows the word "request"). It is ``null``
when none is known.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from contextvars import ContextVar
from typing import Any

REQUEST_ID: ContextVar[str | None] = ContextVar("llmtree_request_id", default=None)
"""The request being handled here; ``REQUEST_ID.set(rid)`` in code that serves one request."""

_GATEWAY_ID = re.compile(r"^chatcmpl-[A-Za-z0-9]+$")
_NAMED_ID = re.compile(r"\brequest(?:_id)?[ =:]+%[sr]")
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "request_id",
    "node",
    "taskName",
}


def request_id_of(record: logging.LogRecord) -> str | None:
    """The request a log record is about, or None (see the module docstring for the order)."""
    given = record.__dict__.get("request_id")
    if isinstance(given, str) and given:
        return given
    current = REQUEST_ID.get()
    if current:
        return current
    args = record.args if isinstance(record.args, tuple) else ()
    for arg in args:
        if isinstance(arg, str) and _GATEWAY_ID.match(arg):
            return arg
    if args and isinstance(record.msg, str) and (match := _NAMED_ID.search(record.msg)):
        index = len(re.findall(r"%[sdrfi]", record.msg[: match.end() - 2]))
        candidate = args[index] if index < len(args) else None
        if isinstance(candidate, str):
            return candidate
    return None


class ContextFilter(logging.Filter):
    """Puts ``node`` and ``request_id`` on every record (for any formatter to use)."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.node
        record.request_id = request_id_of(record)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ms), level, node, logger, message, request_id, and
    the record's ``extra`` fields; ``exception`` holds a traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        created = time.gmtime(record.created)
        body: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", created) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "node": getattr(record, "node", None),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id_of(record),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in body:
                body[key] = value if isinstance(value, str | int | float | bool) else repr(value)
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, ensure_ascii=False)


def configure_json(node: str, level: str) -> None:
    """Send every log record of this process to stderr as JSON lines.

    Python warnings become log records too, and progress bars (model loading) are turned off, so
    that nothing else reaches stderr as plain text.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.captureWarnings(True)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter(node))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def uvicorn_log_config(log_format: str) -> dict[str, Any] | None:
    """uvicorn's ``log_config``: its own text setup, or None (its records go to ours) for JSON."""
    if log_format == "json":
        return None
    from uvicorn.config import LOGGING_CONFIG

    return LOGGING_CONFIG
