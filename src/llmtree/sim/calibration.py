"""The measured throughput curve of one real node and the per-request rates it implies.

``calibration.json`` (next to this file) holds the aggregate output tokens/s that llmtree's
engine reached with C requests in flight (closed loop, 128 output tokens each), the command
that measured them and the machine. Between measured points the curve is linear; past the last
point it stays flat (a batch larger than any measured one is assumed to gain nothing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtree.errors import ConfigError

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")


def load_calibration(path: Path = CALIBRATION_FILE) -> dict[str, Any]:
    """The calibration record: ``points`` plus where they came from."""
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def measured_points(path: Path = CALIBRATION_FILE) -> tuple[tuple[int, float], ...]:
    """``(concurrency, output tokens/s)`` pairs of the curve the simulator uses."""
    points = load_calibration(path)["points"]
    return tuple((int(p["concurrency"]), float(p["output_tokens_per_s"])) for p in points)


@dataclass(frozen=True, slots=True)
class ThroughputCurve:
    """Aggregate tokens/s R(k) of a node running k requests in one continuous batch."""

    points: tuple[tuple[int, float], ...]

    def __post_init__(self) -> None:
        ks = [k for k, _ in self.points]
        if not self.points or ks != sorted(set(ks)) or ks[0] < 1:
            raise ConfigError("curve points need distinct concurrencies >= 1, in order")
        if any(r <= 0 for _, r in self.points):
            raise ConfigError("curve points need tokens/s above 0")

    def aggregate(self, k: int) -> float:
        """R(k): tokens/s of the whole batch; R(k) = k * R(1) below the first point."""
        if k <= 0:
            return 0.0
        k0, r0 = self.points[0]
        if k <= k0:
            return r0 * k / k0
        for (ka, ra), (kb, rb) in zip(self.points, self.points[1:], strict=False):
            if k <= kb:
                return ra + (rb - ra) * (k - ka) / (kb - ka)
        return self.points[-1][1]

    def per_request(self, slots: int, constant: bool = False) -> list[float]:
        """Tokens/s each of k requests gets, for k = 0 .. slots (index 0 unused).

        ``constant``: every request runs at R(1) whatever the batch (an engine whose batching
        costs nothing), the baseline that shows what batching does to latency.
        """
        single = self.aggregate(1)
        rates = [0.0] + [single if constant else self.aggregate(k) / k for k in range(1, slots + 1)]
        return rates

    def capacity_tokens_per_s(self, slots: int, constant: bool = False) -> float:
        """A node's tokens/s with every slot busy."""
        return slots * self.per_request(slots, constant)[slots]
