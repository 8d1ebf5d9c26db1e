"""Draining a node: no new work, finish what it holds, hand its children up, leave.

``TreeNode.drain()`` (exposed; ``llmtree drain N`` calls it) marks the node draining: from then
on its ``submit`` raises ``Overloaded``, so a parent that still tries it passes on to its next
child, and its next load report (sent at once, then with every heartbeat) says ``draining`` so
the parent's routing skips it. ``Drainer`` then, in a thread of its own:

1. reports to the parent right away;
2. moves each child under this node's parent (``set_parent`` on the child; that becomes the
   child's home parent, so it does not come back);
3. waits until every request it held has sent its last event (bounded by ``queue_timeout_s``
   plus ``request_timeout_s``: a request that long is beyond saving);
4. stops the node: detaches from the parent, unregisters, and the process exits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from llmtree.config import Settings
from llmtree.errors import LlmTreeError
from llmtree.registry import Registry
from llmtree.tree.client import Peers
from llmtree.tree.node import TreeNode

logger = logging.getLogger(__name__)


class Drainer:
    """Runs one node's drain; ``start`` once from ``TreeNode.on_drain``."""

    def __init__(
        self,
        node: TreeNode,
        settings: Settings,
        registry: Registry,
        report: Callable[[], None],
        stop: Callable[[], None],
    ) -> None:
        self._node = node
        self._settings = settings
        self._registry = registry
        self._report = report
        self._stop = stop
        self._peers = Peers(settings.call_timeout_s)

    def start(self) -> None:
        threading.Thread(target=self._run, name="drain", daemon=True).start()

    def _run(self) -> None:
        started = time.monotonic()
        try:
            self._report()
        except LlmTreeError as error:  # it refuses submits anyway; the parent passes over it
            logger.warning("drain: could not tell the parent yet: %s", error)
        self._move_children()
        limit = self._settings.queue_timeout_s + self._settings.request_timeout_s
        while self._node.held() > 0 and time.monotonic() - started < limit:
            time.sleep(0.1)
        left = self._node.held()
        if left:
            logger.warning("drain: %d requests still held after %.0f s; leaving", left, limit)
        logger.warning("drained in %.1f s; leaving the tree", time.monotonic() - started)
        self._stop()

    def _move_children(self) -> None:
        parent = self._node.parent
        if parent is None:
            return
        for child in self._node.children_now():
            try:
                uri = self._registry.lookup(child).uri
                self._peers.call(uri, "set_parent", parent)
                self._node.detach_child(child)
                logger.info("drain: moved child %s under %s", child, parent)
            except LlmTreeError as error:
                logger.warning("drain: could not move child %s: %s", child, error)


def drain_node(settings: Settings, name: str, wait_s: float) -> dict[str, Any]:
    """``llmtree drain N``: start the drain; with ``wait_s`` > 0 wait until N has left."""
    from llmtree.errors import NodeUnavailable, UnknownNode

    registry = Registry(settings)
    registry.connect(writer=False)
    peers = Peers(settings.call_timeout_s)
    try:
        record = registry.lookup(name)
        result: dict[str, Any] = peers.call(record.uri, "drain")
        deadline = time.monotonic() + wait_s
        result["left"] = False
        while time.monotonic() < deadline:
            try:
                registry.lookup(name)
                peers.call(record.uri, "ping")
            except (UnknownNode, NodeUnavailable):
                result["left"] = True
                break
            time.sleep(0.2)
        return result
    finally:
        peers.close()
        registry.close()
