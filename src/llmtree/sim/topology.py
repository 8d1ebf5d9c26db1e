"""The tree's shape: node 0 is the root, nodes 1..N the workers, filled breadth first.

Worker i's parent is node (i - 1) // fanout, the same shape ``llmtree up --workers N
--fanout K`` starts (``llmtree.launcher.tree_parents``); children are attached in index order.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmtree.errors import ConfigError

MAX_NODES = 1_000_000


def nodes_for_depth(depth: int, fanout: int) -> int:
    """Workers in a full tree with ``depth`` levels below the root: K + K^2 + ... + K^depth."""
    if depth < 1 or fanout < 1:
        raise ConfigError("--depth and --fanout must be at least 1")
    total = sum(int(fanout**level) for level in range(1, depth + 1))
    if total > MAX_NODES:
        raise ConfigError(f"depth {depth} at fan-out {fanout} is {total} nodes; max {MAX_NODES}")
    return total


@dataclass(frozen=True, slots=True)
class Tree:
    """Parents, children, depths and subtree sizes, indexed by node (0 = root)."""

    parent: list[int]
    children: list[list[int]]
    depth: list[int]
    size: list[int]
    """Workers in the subtree of each node, itself included (the root counts 0 for itself)."""

    @property
    def num_workers(self) -> int:
        return len(self.parent) - 1

    @property
    def height(self) -> int:
        """Levels of workers below the root."""
        return max(self.depth)


def build_tree(nodes: int, fanout: int) -> Tree:
    """A breadth-first tree of ``nodes`` workers under one root."""
    if nodes < 1 or fanout < 1:
        raise ConfigError("--nodes and --fanout must be at least 1")
    if nodes > MAX_NODES:
        raise ConfigError(f"--nodes must be at most {MAX_NODES}")
    total = nodes + 1
    parent = [-1] + [(i - 1) // fanout for i in range(1, total)]
    children: list[list[int]] = [[] for _ in range(total)]
    depth = [0] * total
    for i in range(1, total):
        children[parent[i]].append(i)
        depth[i] = depth[parent[i]] + 1
    size = [0] + [1] * nodes
    for i in range(total - 1, 0, -1):
        size[parent[i]] += size[i]
    return Tree(parent=parent, children=children, depth=depth, size=size)
