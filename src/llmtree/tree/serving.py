"""What a worker node serves: the requests it holds, the roots their events go to, its counts.

It has no lock of its own: ``TreeNode`` uses it under its one lock, so that placement reads these
counts, reads the children's loads and reserves a place in a single step.
"""

from __future__ import annotations

from typing import Any

from llmtree.errors import InvalidRequest
from llmtree.tree.ports import EngineLike


class Serving:
    """A node's book of the requests its engine serves (empty on the root, which has none)."""

    def __init__(self, engine: EngineLike | None) -> None:
        self.engine = engine
        self.roots: dict[str, str] = {}
        """request_id -> URI of the root that placed it, for each request held here."""
        self.reserved = 0
        """Places taken by a placement that has not yet handed its request to the engine."""
        self.finished = 0

    def held(self) -> int:
        """Requests served here or about to be."""
        return len(self.roots) + self.reserved

    def occupancy(self) -> tuple[int, int]:
        """(running, waiting), for placement and load reports.

        The engine's own counts, or what this node holds if that is more: a request being
        handed to the engine is held here and maybe already in the engine's queue, so the
        two are never added. The engine's counts also cover slots it fills itself (the tree
        bench's always-busy forwarder, whose requests never pass through ``admit``)."""
        engine = self.engine
        if engine is None:
            return 0, 0
        running = engine.num_running
        total = max(self.held(), running + engine.num_waiting)
        return running, total - running

    def admit(self, request_id: str, root: str, reserved: bool) -> None:
        """``request_id`` goes to the engine now; its reserved place (if any) becomes its own
        in one step, so ``held`` counts it once all along (it used to stay reserved until the
        engine returned: a burst of 20 on a 24-slot worker then counted some twice and sent
        one on to a child while slots were free)."""
        if reserved:
            self.reserved -= 1
        if request_id in self.roots:
            raise InvalidRequest(
                f"request {request_id!r} is already running here", param="request_id"
            )
        self.roots[request_id] = root

    def forget(self, request_id: str) -> None:
        """The engine refused ``request_id``."""
        self.roots.pop(request_id, None)

    def route(self, events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        """A step's events by the root each goes to (events of requests not held here are left
        out); a finished request is no longer held."""
        by_root: dict[str, list[dict[str, Any]]] = {}
        for event in events:
            rid = event["request_id"]
            root = self.roots.get(rid)
            if root is None:
                continue
            if event.get("finish_reason") is not None:
                del self.roots[rid]
                self.finished += 1
            by_root.setdefault(root, []).append(event)
        return by_root
