"""The gateway's handle on the root node: finds it in the directory, calls it over Pyro5.

Blocking calls; the gateway runs them in worker threads. A failed call re-resolves the root's
URI in LDAP and retries once (the root may have restarted on another port).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from llmtree.config import Settings
from llmtree.errors import LlmTreeError, NodeUnavailable
from llmtree.registry import NodeRecord, Registry
from llmtree.tree.client import Peers, node_uri

logger = logging.getLogger(__name__)


class RootClient:
    """Thread-safe; share one per gateway."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = Registry(settings)
        self._peers = Peers(settings.call_timeout_s)
        self._lock = threading.Lock()
        self._uri: str | None = None
        self._connected = False

    def _ensure_registry(self) -> None:
        with self._lock:
            if self._connected:
                return
            self.registry.connect(writer=False)
            self._connected = True

    def root_uri(self, refresh: bool = False) -> str:
        """The root's URI from the directory, else the configured root address."""
        with self._lock:
            if self._uri is not None and not refresh:
                return self._uri
        try:
            self._ensure_registry()
            uri = str(self.registry.lookup(self.settings.root_name).uri)
        except LlmTreeError as error:
            logger.debug("root not in the directory (%s); using the configured address", error)
            uri = node_uri(self.settings.root_host, self.settings.root_port)
        with self._lock:
            self._uri = uri
        return uri

    def call(self, method: str, *args: Any) -> Any:
        try:
            return self._peers.call(self.root_uri(), method, *args)
        except NodeUnavailable:
            return self._peers.call(self.root_uri(refresh=True), method, *args)

    def submit(self, request: str) -> str:
        """Place a request packed by ``GenerateRequest.pack``; returns the serving node."""
        node: str = self.call("submit", request)
        return node

    def cancel(self, request_id: str) -> bool:
        return bool(self.call("cancel", request_id))

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.call("status")
        return status

    def list_nodes(self) -> list[NodeRecord]:
        self._ensure_registry()
        return self.registry.list_nodes()

    def lookup(self, name: str) -> NodeRecord:
        self._ensure_registry()
        return self.registry.lookup(name)

    def close(self) -> None:
        self._peers.close()
        if self._connected:
            self.registry.close()
