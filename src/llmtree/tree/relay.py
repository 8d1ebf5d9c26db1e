"""The root's side of a request once placed: its events to the sink, cancel, failover.

The root computes nothing. Serving nodes deliver their token events straight to it; it passes
them to the sink (the gateway) that submitted each request, keeps each request's answer so far
in its in-flight table (``failover.FlightTable``) and, when a serving node is lost, places the
request again with that answer as a prefix. Thread-safe: called from Pyro5's worker threads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from llmtree.config import Settings
from llmtree.errors import LlmTreeError, NodeUnavailable
from llmtree.protocol import pack_events
from llmtree.tree.children import Children
from llmtree.tree.client import Peers
from llmtree.tree.failover import FlightTable

logger = logging.getLogger(__name__)


class RootRelay:
    """Events, cancels and failover of the requests a root has placed."""

    def __init__(
        self,
        settings: Settings,
        name: str,
        peers: Peers,
        children: Children,
        place: Callable[[dict[str, Any]], str],
        lost: Callable[[str], None],
    ) -> None:
        """``place`` places a lost request again from the root; ``lost`` is told of a serving
        node that is gone."""
        self._peers = peers
        self._children = children
        self.flights = FlightTable(
            settings,
            name,
            place=place,
            probe=self._probe,
            send=self._send_to_sink,
            lost=lost,
            cancel_on=self.cancel_on,
        )

    def deliver(self, events: list[dict[str, Any]]) -> int:
        """Valid events from a serving node, passed on to their sinks; returns how many."""
        by_sink, orphans = self.flights.deliver(events)
        if orphans:  # e.g. a node that was cut off and came back: its work is not wanted
            logger.info("cancelling %d orphaned requests", len(orphans))
            self.cancel_async(list(orphans))
        for sink, batch in by_sink.items():
            try:
                self._peers.call(sink, "deliver", pack_events(batch))
            except NodeUnavailable as error:
                logger.warning("sink %s unavailable, cancelling its requests: %s", sink, error)
                self.cancel_async(self.flights.abandon_sink(sink))
        return sum(len(batch) for batch in by_sink.values())

    def cancel(self, request_id: str) -> bool:
        """Stop a request on the node serving it (one being placed is cancelled once placed)."""
        node = self.flights.cancel(request_id)
        if node is None:
            return False
        return self.cancel_on(node, request_id)

    def cancel_on(self, node: str, request_id: str) -> bool:
        uri = self._children.uri_of(node)
        if uri is None:
            return False
        try:
            return bool(self._peers.call(uri, "cancel", request_id))
        except NodeUnavailable as error:
            logger.warning("cancel %s: serving node %s unavailable: %s", request_id, node, error)
            return False

    def cancel_async(self, targets: list[tuple[str | None, str]]) -> None:
        """Cancels each (node, request_id) from a thread of its own (None: not placed yet; the
        flight is marked cancelled and is cancelled once placed)."""

        def run() -> None:
            for node, rid in targets:
                if node is not None:
                    self.cancel_on(node, rid)
            self._peers.close()

        if any(node is not None for node, _ in targets):
            threading.Thread(target=run, name="cancel", daemon=True).start()

    def _probe(self, node: str, request_ids: list[str]) -> list[str]:
        """Which of ``request_ids`` ``node`` still holds; NodeUnavailable if it is gone."""
        try:
            uri = self._children.uri_of(node)
        except LlmTreeError as error:
            raise NodeUnavailable(f"cannot find {node}: {error}") from error
        if uri is None:
            raise NodeUnavailable(f"{node} is no longer in the directory")
        held = self._peers.call(uri, "holds", request_ids)
        return [rid for rid in held if isinstance(rid, str)] if isinstance(held, list) else []

    def _send_to_sink(self, sink: str, events: list[dict[str, Any]]) -> None:
        self._peers.call(sink, "deliver", events)
