"""The serving node's outbox: token events leave in one ``root.deliver`` call per batch.

The engine thread hands each step's events to ``put`` and goes on computing; one sender thread
drains everything queued so far and delivers it, grouped by root, so a slow network never stalls
the engine and a busy engine sends one call per step, not one per token.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from llmtree.errors import LlmTreeError

logger = logging.getLogger(__name__)

Deliver = Callable[[str, list[dict[str, Any]]], None]


class Outbox:
    """Queue of (root URI, event) pairs drained by one sender thread."""

    def __init__(self, deliver: Deliver, name: str = "outbox") -> None:
        self._deliver = deliver
        self._queue: queue.SimpleQueue[tuple[str, dict[str, Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, root: str, events: list[dict[str, Any]]) -> None:
        """Called by the engine thread after each step; never blocks."""
        for event in events:
            self._queue.put((root, event))

    def stop(self, timeout_s: float = 5.0) -> None:
        """Send what is queued, then end the sender thread."""
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        running = True
        while running:
            item = self._queue.get()
            batch: dict[str, list[dict[str, Any]]] = {}
            while True:
                if item is None:
                    running = False
                else:
                    batch.setdefault(item[0], []).append(item[1])
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            for root, events in batch.items():
                self._send(root, events)

    def _send(self, root: str, events: list[dict[str, Any]]) -> None:
        for attempt in range(3):
            try:
                self._deliver(root, events)
                return
            except LlmTreeError as error:
                logger.warning("delivery to %s failed (try %d): %s", root, attempt + 1, error)
        logger.error("dropped %d events for root %s", len(events), root)
