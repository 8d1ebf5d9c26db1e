"""Calling other nodes over Pyro5: per-thread proxies, timeouts, one error type.

Pyro5 proxies belong to the thread that made them, so ``Peers`` keeps one proxy per (thread,
URI). Every call has a timeout; any Pyro5 communication failure becomes ``NodeUnavailable``, and
llmtree errors raised by the peer (``Overloaded``, ``InvalidRequest``...) pass through unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import Pyro5
import Pyro5.api
import Pyro5.errors

from llmtree.errors import LlmTreeError, NodeUnavailable, register_remote_errors

logger = logging.getLogger(__name__)

OBJECT_ID = "llmtree.node"
SINK_ID = "llmtree.sink"

register_remote_errors()


def configure_pyro(threadpool_size: int) -> None:
    """Process-wide Pyro5 settings: serpent only, a thread server, bounded messages."""
    Pyro5.config.SERIALIZER = "serpent"
    Pyro5.config.SERVERTYPE = "thread"
    Pyro5.config.THREADPOOL_SIZE = threadpool_size
    Pyro5.config.THREADPOOL_SIZE_MIN = min(8, threadpool_size)
    Pyro5.config.MAX_MESSAGE_SIZE = 16 * 1024 * 1024
    Pyro5.config.DETAILED_TRACEBACK = False


def node_uri(host: str, port: int, object_id: str = OBJECT_ID) -> str:
    return f"PYRO:{object_id}@{host}:{port}"


class Peers:
    """Thread-safe access to remote objects by URI; safe to share between threads."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._local = threading.local()

    def _proxy(self, uri: str) -> Any:
        cache: dict[str, Any] | None = getattr(self._local, "proxies", None)
        if cache is None:
            cache = self._local.proxies = {}
        proxy = cache.get(uri)
        if proxy is None:
            try:
                proxy = Pyro5.api.Proxy(uri)
            except Pyro5.errors.PyroError as error:
                raise NodeUnavailable(f"bad node URI {uri!r}: {error}") from error
            proxy._pyroTimeout = self.timeout_s
            cache[uri] = proxy
        return proxy

    def forget(self, uri: str) -> None:
        """Drop this thread's proxy to ``uri`` (after a failure, so the next call reconnects)."""
        cache: dict[str, Any] | None = getattr(self._local, "proxies", None)
        if cache and (proxy := cache.pop(uri, None)) is not None:
            with contextlib.suppress(Exception):  # releasing a broken proxy must not fail
                proxy._pyroRelease()

    def call(self, uri: str, method: str, *args: Any) -> Any:
        """Call ``method`` on the object at ``uri``; raises NodeUnavailable or the peer's error."""
        proxy = self._proxy(uri)
        try:
            return getattr(proxy, method)(*args)
        except LlmTreeError:
            raise
        except Pyro5.errors.CommunicationError as error:
            self.forget(uri)
            raise NodeUnavailable(f"node at {uri} is unavailable: {error}") from error
        except Pyro5.errors.PyroError as error:
            self.forget(uri)
            raise NodeUnavailable(f"call {method} to {uri} failed: {error}") from error

    def close(self) -> None:
        """Release this thread's proxies."""
        for uri in list(getattr(self._local, "proxies", {}) or {}):
            self.forget(uri)
