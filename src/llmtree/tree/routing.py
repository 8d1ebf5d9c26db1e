"""The placement rule, as a pure function over a snapshot of the node's state.

A node with a free slot serves the request itself. Otherwise it forwards to its children, round
robin, starting at the next child; a child that is full (``Overloaded``) or gone is passed over.
When no child takes it, a node that serves (not the root) queues it if its bounded queue has
room; otherwise the request is refused with ``Overloaded``. The root only forwards.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the rule looks at; taken under the node's lock, no I/O."""

    is_root: bool
    num_running: int
    num_waiting: int
    slots: int
    max_queue: int
    children: tuple[str, ...]
    next_child: int

    @property
    def has_free_slot(self) -> bool:
        return not self.is_root and self.num_running + self.num_waiting < self.slots

    @property
    def can_queue(self) -> bool:
        return (
            not self.is_root and self.num_running + self.num_waiting < self.slots + self.max_queue
        )


@dataclass(frozen=True, slots=True)
class Plan:
    """``serve`` now, else try ``forward_to`` in order, else ``queue`` here (or refuse)."""

    serve: bool
    forward_to: tuple[str, ...]
    queue: bool


def plan(snapshot: Snapshot) -> Plan:
    """Apply the rule; the caller advances its round-robin pointer when it forwards."""
    if snapshot.has_free_slot:
        return Plan(serve=True, forward_to=(), queue=False)
    children = snapshot.children
    if children:
        start = snapshot.next_child % len(children)
        order = children[start:] + children[:start]
    else:
        order = ()
    return Plan(serve=False, forward_to=order, queue=snapshot.can_queue)
