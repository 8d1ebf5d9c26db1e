"""The placement rule, as a pure function over a snapshot of the node's state.

A node with a free slot serves the request itself. Otherwise it forwards to its children, round
robin, starting at the next child; a child that is full (``Overloaded``) or gone is passed over.
When no child takes it, a node that serves (not the root) queues it if its bounded queue has
room; otherwise the request is refused with ``Overloaded``. The root only forwards.

That is the ``seed`` policy (the default). Two others change only which child is tried first
(``docs/scaling.md`` has the simulator's case for them; ``llmtree.sim.placement`` the same logic):

* ``weighted-rr``: smooth weighted round robin (as nginx does it), each child weighted by the size
  of its subtree, so a deep subtree gets its share and a lone leaf is not overrun. The credits
  are state the caller keeps: ``plan`` returns the new ones in ``Plan.credits``.
* ``p2c``: power of two choices over the load the children report (subtree occupancy, from their
  last report) plus what this node sent each of them since that report; the two children are
  drawn by the caller (``Snapshot.draws``) so that ``plan`` stays a pure function.

After the first choice the rest follow in round-robin order, as in the seed rule.
"""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("seed", "weighted-rr", "p2c")


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
    policy: str = "seed"
    loads: tuple[float, ...] = ()
    """p2c: per child, its reported subtree occupancy (0..1) plus what was sent since."""
    sizes: tuple[int, ...] = ()
    """weighted-rr: per child, the number of nodes in its subtree (at least 1)."""
    credits: tuple[int, ...] = ()
    """weighted-rr: per child, its current credit (the caller keeps them between calls)."""
    draws: tuple[int, int] = (0, 0)
    """p2c: two random numbers (any size); the caller draws them, ``plan`` reduces them."""

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
    credits: tuple[int, ...] = ()
    """weighted-rr: the children's credits after this choice (empty: unchanged)."""


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
    credits: tuple[int, ...] = ()
    if len(children) > 1 and snapshot.policy == "weighted-rr":
        first, credits = weighted_choice(snapshot.sizes, snapshot.credits, len(children))
        order = _first(children[first], order)
    elif len(children) > 1 and snapshot.policy == "p2c":
        first = two_choices(snapshot.loads, snapshot.draws, len(children))
        order = _first(children[first], order)
    return Plan(serve=False, forward_to=order, queue=snapshot.can_queue, credits=credits)


def _first(child: str, order: tuple[str, ...]) -> tuple[str, ...]:
    return (child, *(c for c in order if c != child))


def weighted_choice(
    sizes: tuple[int, ...], credits: tuple[int, ...], width: int
) -> tuple[int, tuple[int, ...]]:
    """Smooth weighted round robin: (index chosen, new credits); missing entries count 1 / 0."""
    weights = [max(1, sizes[i]) if i < len(sizes) else 1 for i in range(width)]
    raised = [(credits[i] if i < len(credits) else 0) + weights[i] for i in range(width)]
    best = max(range(width), key=lambda i: (raised[i], -i))
    raised[best] -= sum(weights)
    return best, tuple(raised)


def two_choices(loads: tuple[float, ...], draws: tuple[int, int], width: int) -> int:
    """Power of two choices: of two distinct children picked by ``draws``, the less loaded
    (the first drawn on a tie); a child with no load known counts as idle."""
    i = draws[0] % width
    j = draws[1] % (width - 1)
    j += j >= i

    def load(k: int) -> float:
        return loads[k] if k < len(loads) else 0.0

    return j if load(j) < load(i) else i
