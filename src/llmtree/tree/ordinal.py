"""Where a StatefulSet pod goes in the tree: its parent from its ordinal.

Pods of a StatefulSet are named ``<set>-0``, ``<set>-1``, ... Numbered breadth first with fan-out
``K``, the first ``K`` hang under the root and every pod ``<set>-j`` gets the next ``K``::

    K = 2:   root -> w-0, w-1;   w-0 -> w-2, w-3;   w-1 -> w-4, w-5;   w-2 -> w-6, w-7 ...

so pod ``i``'s parent is the root when ``i < K``, else ``<set>-(i // K - 1)``. Scaling the set up
adds leaves under existing nodes; scaling down removes the newest leaves first, as a
StatefulSet does. ``llmtree node --parent-from-ordinal --fanout K`` uses this.
"""

from __future__ import annotations

import os
import re
import socket

from llmtree.errors import ConfigError

_POD_NAME = re.compile(r"^(?P<prefix>[A-Za-z0-9][A-Za-z0-9._-]*)-(?P<ordinal>\d+)$")
MAX_FANOUT = 1024


def split_ordinal(pod_name: str) -> tuple[str, int]:
    """``"worker-12"`` -> ``("worker", 12)``; ConfigError for a name without an ordinal."""
    match = _POD_NAME.match(pod_name)
    if match is None:
        raise ConfigError(
            f"cannot take an ordinal from {pod_name!r}: expected NAME-<number>, like the pods "
            "of a StatefulSet (worker-0, worker-1, ...)"
        )
    return match["prefix"], int(match["ordinal"])


def parent_of(ordinal: int, fanout: int) -> int | None:
    """The parent's ordinal of pod ``ordinal`` in a ``fanout``-ary tree; None: the root."""
    if fanout < 1 or fanout > MAX_FANOUT:
        raise ConfigError(f"fanout must be between 1 and {MAX_FANOUT}, not {fanout}")
    if ordinal < 0:
        raise ConfigError(f"ordinal must not be negative: {ordinal}")
    return None if ordinal < fanout else ordinal // fanout - 1


def place_by_ordinal(name: str | None, fanout: int, root_name: str) -> tuple[str, str]:
    """(this node's name, its parent's name) from ``name``, else the pod's hostname."""
    pod = name or os.environ.get("HOSTNAME") or socket.gethostname()
    prefix, ordinal = split_ordinal(pod.split(".", 1)[0])
    parent = parent_of(ordinal, fanout)
    return f"{prefix}-{ordinal}", root_name if parent is None else f"{prefix}-{parent}"
