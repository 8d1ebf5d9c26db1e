"""The live state of every simulated node, as flat lists indexed by node (0 = root).

Lists rather than objects because the event loop touches them a few million times a run.
``occ`` is what a real node's ``Snapshot`` calls ``num_running + num_waiting``; ``sub_occ`` and
``sub_cap`` sum it and its bound (slots + max_queue) over each subtree, so "this subtree would
refuse" is one comparison instead of a walk.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from llmtree.sim.topology import Tree


@dataclass(slots=True)
class TreeState:
    """Per-node counters the placement policies read and the event loop keeps current."""

    tree: Tree
    slots: int
    max_queue: int
    running: list[int] = field(default_factory=list)
    occ: list[int] = field(default_factory=list)
    waiting: list[deque[int]] = field(default_factory=list)
    sub_occ: list[int] = field(default_factory=list)
    sub_cap: list[int] = field(default_factory=list)
    next_child: list[int] = field(default_factory=list)
    lazy: list[int] = field(default_factory=list)
    """Round-robin advances owed to every node of a subtree that refused as a whole."""
    reported: list[float] = field(default_factory=list)
    """Each subtree's load (occupancy / bound) as its last heartbeat reported it."""
    sent: list[int] = field(default_factory=list)
    """Requests each node's parent placed in its subtree since that report."""

    def __post_init__(self) -> None:
        total = len(self.tree.parent)
        bound = self.slots + self.max_queue
        self.running = [0] * total
        self.occ = [0] * total
        self.waiting = [deque() for _ in range(total)]
        self.sub_occ = [0] * total
        self.sub_cap = [bound * size for size in self.tree.size]
        self.next_child = [0] * total
        self.lazy = [0] * total
        self.reported = [0.0] * total
        self.sent = [0] * total

    def refresh_reports(self, first: int, step: int) -> None:
        """A heartbeat of nodes first, first + step, ...: they report their subtree's load."""
        sub_occ, sub_cap, reported, sent = self.sub_occ, self.sub_cap, self.reported, self.sent
        for node in range(first, len(sub_occ), step):
            reported[node] = sub_occ[node] / sub_cap[node]
            sent[node] = 0
