"""A node's children: who is in its round robin, where they are, and who was dropped.

A child is in while the directory names this node as its parent or it attached itself within
the last TTL. A child that cannot be reached is dropped and stays out until it attaches itself
again (it does on every heartbeat while it lives). Thread-safe; no lock is held across a
directory lookup.
"""

from __future__ import annotations

import logging
import threading
import time

from llmtree.errors import RegistryError, UnknownNode
from llmtree.tree.ports import Directory

logger = logging.getLogger(__name__)


class Children:
    """The children of one node, and the URIs of the nodes it talks to."""

    def __init__(self, directory: Directory, ttl_s: float) -> None:
        self._directory = directory
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._names: list[str] = []
        """In the round robin, sorted: a stable order."""
        self._uris: dict[str, str] = {}
        self._attached_at: dict[str, float] = {}
        self._dropped: set[str] = set()

    def names(self) -> list[str]:
        with self._lock:
            return list(self._names)

    def uri_of(self, name: str) -> str | None:
        """``name``'s URI, remembered or looked up; None when the directory does not know it."""
        with self._lock:
            uri = self._uris.get(name)
        if uri is not None:
            return uri
        try:
            uri = str(self._directory.lookup(name).uri)
        except UnknownNode:
            return None
        with self._lock:
            self._uris[name] = uri
        return uri

    def attach(self, name: str) -> str:
        """``name`` attaches itself now; returns its URI. It must be in the directory (with the
        directory down, a child known already may stay): else UnknownNode or RegistryError."""
        try:
            uri = str(self._directory.lookup(name).uri)
        except UnknownNode:
            raise
        except RegistryError:
            with self._lock:
                known = self._uris.get(name)
            if known is None:
                raise
            uri = known
        with self._lock:
            self._uris[name] = uri
            self._attached_at[name] = time.monotonic()
            self._dropped.discard(name)
            if name not in self._names:
                self._names = sorted([*self._names, name])
                logger.info("child %s attached (%s)", name, uri)
        return uri

    def detach(self, name: str) -> bool:
        """``name`` left, moved or is gone; True if it was a child."""
        with self._lock:
            self._uris.pop(name, None)
            self._attached_at.pop(name, None)
            if name in self._names:
                self._names.remove(name)
                logger.info("child %s detached", name)
                return True
        return False

    def drop(self, name: str) -> None:
        """``name`` cannot be reached: out until it attaches itself again."""
        with self._lock:
            if name in self._names or name in self._attached_at:
                self._dropped.add(name)
        self.detach(name)

    def refresh(self, names: list[str], keep: set[str]) -> None:
        """Heartbeat: ``names`` are the directory's children of this node; the URIs of nodes
        that are not children any more are forgotten, but those in ``keep``."""
        now = time.monotonic()
        with self._lock:
            recent = {n for n, at in self._attached_at.items() if now - at < self._ttl_s}
            for stale in set(self._attached_at) - recent:
                del self._attached_at[stale]
            self._names = sorted((set(names) | recent) - self._dropped)
            for gone in set(self._uris) - set(self._names) - keep:
                self._uris.pop(gone, None)
