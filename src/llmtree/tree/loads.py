"""What a node knows of its children's load, for the load-aware routing policies.

Each child sends its subtree's load with the ``attach_child`` call it makes on every heartbeat
(no extra call): ``size`` (nodes in its subtree), ``held`` (requests running or queued there),
``capacity`` (slots plus queue places there) and ``draining``. The parent keeps the last report
per child, counts what it sent each child since that report (``p2c`` adds it: the part of the
load the parent knows for certain between reports) and the children's weighted-rr credits.
Not thread-safe: the node calls it under its own lock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from llmtree.errors import InvalidRequest

MAX_SUBTREE = 1_000_000


@dataclass(slots=True)
class Report:
    size: int = 1
    held: int = 0
    capacity: int = 1
    draining: bool = False
    at: float = field(default_factory=time.monotonic)


def parse_report(value: Any) -> Report:
    """A child's report from the wire; ``InvalidRequest`` when it is malformed."""
    if not isinstance(value, dict):
        raise InvalidRequest("a load report must be an object", param="report")
    numbers = {}
    for key, low in (("size", 1), ("held", 0), ("capacity", 1)):
        number = value.get(key)
        if not isinstance(number, int) or isinstance(number, bool) or not low <= number:
            raise InvalidRequest(f"report.{key} must be an integer >= {low}", param="report")
        numbers[key] = min(number, MAX_SUBTREE * 100_000)
    draining = value.get("draining", False)
    if not isinstance(draining, bool):
        raise InvalidRequest("report.draining must be a boolean", param="report")
    return Report(
        size=min(numbers["size"], MAX_SUBTREE),
        held=numbers["held"],
        capacity=numbers["capacity"],
        draining=draining,
    )


class ChildLoads:
    """Last report, sends since, and weighted-rr credit per child."""

    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._reports: dict[str, Report] = {}
        self._sent: dict[str, int] = {}
        self._credits: dict[str, int] = {}

    def report(self, child: str, report: Report) -> None:
        self._reports[child] = report
        self._sent[child] = 0

    def forget(self, child: str) -> None:
        self._reports.pop(child, None)
        self._sent.pop(child, None)
        self._credits.pop(child, None)

    def sent(self, child: str) -> None:
        self._sent[child] = self._sent.get(child, 0) + 1

    def _fresh(self, child: str, now: float) -> Report | None:
        report = self._reports.get(child)
        return report if report is not None and now - report.at < self._ttl_s else None

    def draining(self, children: tuple[str, ...]) -> set[str]:
        now = time.monotonic()
        return {c for c in children if (r := self._fresh(c, now)) is not None and r.draining}

    def loads(self, children: tuple[str, ...]) -> tuple[float, ...]:
        """Per child: reported occupancy plus sends since the report, over its capacity."""
        now = time.monotonic()
        out = []
        for child in children:
            report = self._fresh(child, now)
            if report is None:  # not reported yet (it just joined): counts as idle
                out.append(0.0)
            else:
                out.append((report.held + self._sent.get(child, 0)) / report.capacity)
        return tuple(out)

    def sizes(self, children: tuple[str, ...]) -> tuple[int, ...]:
        now = time.monotonic()
        return tuple(r.size if (r := self._fresh(c, now)) else 1 for c in children)

    def credits(self, children: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(self._credits.get(c, 0) for c in children)

    def set_credits(self, children: tuple[str, ...], credits: tuple[int, ...]) -> None:
        self._credits = dict(zip(children, credits, strict=False))

    def subtree(
        self, children: tuple[str, ...], held: int, capacity: int, draining: bool
    ) -> dict[str, Any]:
        """This node's own report to its parent: itself plus its children's fresh reports."""
        now = time.monotonic()
        size = 1
        for child in children:
            report = self._fresh(child, now)
            if report is not None and not report.draining:
                size += report.size
                held += report.held
                capacity += report.capacity
            elif report is None:
                size += 1
        return {
            "size": min(size, MAX_SUBTREE),
            "held": held,
            "capacity": max(1, capacity),
            "draining": draining,
        }
