"""Routing policies over the simulator's live state: where does the next request go?

Every policy keeps the real rule's first and last steps: a node with a free slot serves the
request itself (the root never serves), and a node whose children all refuse queues it if its
bounded queue has room, else refuses (``Overloaded``). They differ in which child is tried first:

* ``seed``: the real rule (``llmtree.tree.routing.plan``), round robin from the node's pointer,
  which advances by one every time the node forwards. ``reference_seed`` calls ``plan`` itself
  on a ``Snapshot`` per visit; ``seed`` mirrors it with two shortcuts that change nothing (a
  test checks both place every request alike): a subtree at its bound refuses without a walk,
  and the pointer advances every node of it would have made are owed (``lazy``) and paid the
  next time the walk passes.
* ``p2c``: power of two choices. Two distinct random children; the one whose subtree reported
  the lower load (occupancy / bound, as of its last heartbeat) first, then the other, then the
  rest in round-robin order.
* ``p2c+sent``: p2c over the report plus the requests this node sent that child since the
  report came (what a parent knows for certain between heartbeats).
* ``weighted-rr``: the seed rule with each child weighted by its subtree's size (smooth
  weighted round robin, as nginx does it); no load reports at all.
* ``least-loaded``: the child whose subtree reported the lowest load first (O(fan-out) a hop),
  then the rest in round-robin order.

A placer returns the serving node (or -1 for refused) and counts the ``submit`` calls the walk
made (nodes visited, the root excluded) in ``calls[0]``: a refusing subtree costs one call per
node, because the real walk visits each of them before ``Overloaded`` comes back.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from llmtree.sim.state import TreeState
from llmtree.tree.routing import Snapshot, plan

Placer = Callable[[], int]


def make_placer(
    state: TreeState, policy: str, rng: random.Random, calls: list[int], fresh: bool
) -> Placer:
    """A function placing one request from the root; ``fresh``: load reports are live."""
    if policy == "seed":
        return _seed(state, calls)
    if policy == "reference-seed":
        return _reference_seed(state, calls)
    if policy == "weighted-rr":
        return _weighted_round_robin(state, calls)
    return _load_aware(state, policy, rng, calls, fresh)


def _seed(state: TreeState, calls: list[int]) -> Placer:
    children, size = state.tree.children, state.tree.size
    occ, sub_occ, sub_cap = state.occ, state.sub_occ, state.sub_cap
    next_child, lazy, slots = state.next_child, state.lazy, state.slots

    def visit(n: int) -> int:
        if sub_occ[n] >= sub_cap[n]:  # every node below would refuse: each forwards once
            if children[n]:
                lazy[n] += 1
            calls[0] += size[n]
            return -1
        if n:
            calls[0] += 1
            if occ[n] < slots:
                return n
        kids = children[n]
        if kids:
            owed = lazy[n]
            if owed:
                lazy[n] = 0
                for child in kids:
                    if children[child]:
                        lazy[child] += owed
            width = len(kids)
            start = (next_child[n] + owed) % width
            next_child[n] = (start + 1) % width
            for i in range(start, width):
                served = visit(kids[i])
                if served >= 0:
                    return served
            for i in range(start):
                served = visit(kids[i])
                if served >= 0:
                    return served
        return n if n else -1  # not at its bound, children refused: it has queue room

    return lambda: visit(0)


def _reference_seed(state: TreeState, calls: list[int]) -> Placer:
    """The real rule, ``plan`` on a ``Snapshot`` at every node visited; slow, for tests."""
    children, running, occ = state.tree.children, state.running, state.occ
    next_child = state.next_child

    def visit(n: int) -> int:
        if n:
            calls[0] += 1
        snapshot = Snapshot(
            is_root=n == 0,
            num_running=running[n],
            num_waiting=occ[n] - running[n],
            slots=state.slots,
            max_queue=state.max_queue,
            children=tuple(str(child) for child in children[n]),
            next_child=next_child[n],
        )
        decision = plan(snapshot)
        if decision.serve:
            return n
        if decision.forward_to:
            next_child[n] = (next_child[n] + 1) % len(decision.forward_to)
        for child in decision.forward_to:
            served = visit(int(child))
            if served >= 0:
                return served
        return n if decision.queue else -1

    return lambda: visit(0)


def _load_aware(
    state: TreeState, policy: str, rng: random.Random, calls: list[int], fresh: bool
) -> Placer:
    children, size = state.tree.children, state.tree.size
    occ, sub_occ, sub_cap = state.occ, state.sub_occ, state.sub_cap
    next_child, slots, reported, sent = state.next_child, state.slots, state.reported, state.sent
    getrandbits = rng.getrandbits

    def randbelow(n: int) -> int:  # rng.randrange(n) without its argument checks: same draws
        k = n.bit_length()
        r: int = getrandbits(k)
        while r >= n:
            r = getrandbits(k)
        return r

    two_choices = policy != "least-loaded"
    counts_sent = policy == "p2c+sent"

    def live(n: int) -> float:
        return sub_occ[n] / sub_cap[n]

    def reported_and_sent(n: int) -> float:
        return reported[n] + sent[n] / sub_cap[n]

    load = live if fresh else reported_and_sent if counts_sent else reported.__getitem__

    def visit(n: int) -> int:
        if sub_occ[n] >= sub_cap[n]:
            calls[0] += size[n]
            return -1
        if n:
            calls[0] += 1
            if occ[n] < slots:
                return n
        kids = children[n]
        width = len(kids)
        if width:
            if width == 1:
                first = second = kids[0]
            elif two_choices:
                i = randbelow(width)
                j = randbelow(width - 1)
                j += j >= i
                first, second = kids[i], kids[j]
                if load(second) < load(first):
                    first, second = second, first
            else:
                first = second = min(kids, key=load)
            served = visit(first)
            if served >= 0:
                sent[first] += 1
                return served
            if second != first:
                served = visit(second)
                if served >= 0:
                    sent[second] += 1
                    return served
            start = next_child[n] % width
            next_child[n] = (start + 1) % width
            for child in kids[start:] + kids[:start]:
                if child != first and child != second:
                    served = visit(child)
                    if served >= 0:
                        return served
        return n if n else -1

    return lambda: visit(0)


def _weighted_round_robin(state: TreeState, calls: list[int]) -> Placer:
    children, size = state.tree.children, state.tree.size
    occ, sub_occ, sub_cap, slots = state.occ, state.sub_occ, state.sub_cap, state.slots
    credit = [0] * len(children)

    def visit(n: int) -> int:
        if sub_occ[n] >= sub_cap[n]:
            calls[0] += size[n]
            return -1
        if n:
            calls[0] += 1
            if occ[n] < slots:
                return n
        kids = children[n]
        if kids:
            total = size[n] - (1 if n else 0)
            best = kids[0]
            for child in kids:
                credit[child] += size[child]
                if credit[child] > credit[best]:
                    best = child
            credit[best] -= total
            served = visit(best)
            if served >= 0:
                return served
            for child in kids:
                if child != best:
                    served = visit(child)
                    if served >= 0:
                        return served
        return n if n else -1

    return lambda: visit(0)
