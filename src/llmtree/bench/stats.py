"""Benchmark arithmetic: one record per request in, one summary per load level out.

Pure and synchronous (no I/O, no clock), so it is unit-tested with hand-made records and shared
by every producer of records: the HTTP load generator (``loadgen``), the in-process engine
driver and the static-batch baseline in ``benchmarks/``.

Times are seconds on one monotonic clock (``time.perf_counter``). Definitions, as in vLLM's
``benchmark_serving``:

* TTFT: first content chunk - request start;
* TPOT: (end - first chunk) / (output tokens - 1), per request;
* ITL:  gaps between successive content chunks, pooled over requests;
* E2E:  end - start.

Latencies are taken over requests that completed; throughput counts every token that arrived
inside the measurement window, so a level cut short by its time cap is still measured fairly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

MAX_ERROR_SAMPLES = 3
"""Distinct error messages kept in a summary, so a failing run says why."""


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation (numpy's default method).

    Raises ValueError on an empty sequence or a ``q`` outside [0, 100].
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside [0, 100]")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(slots=True)
class Dist:
    """Mean and percentiles of one latency, in seconds; all None when nothing was measured."""

    count: int = 0
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None

    @classmethod
    def of(cls, values: Sequence[float]) -> Dist:
        if not values:
            return cls()
        return cls(
            count=len(values),
            mean=sum(values) / len(values),
            p50=percentile(values, 50),
            p90=percentile(values, 90),
            p99=percentile(values, 99),
        )


@dataclass(slots=True)
class RequestRecord:
    """What the client saw of one request. ``end`` stays None while it is still running."""

    start: float
    """When the request was sent."""
    chunk_times: list[float] = field(default_factory=list)
    """Arrival time of each chunk that carried output text (or tokens)."""
    end: float | None = None
    """When the response ended (completed or failed)."""
    output_tokens: int = 0
    """Tokens generated: from the usage report when there is one, else one per chunk."""
    error: str | None = None
    """Why it failed; None for a success (or a request still running)."""

    @property
    def is_ok(self) -> bool:
        return self.end is not None and self.error is None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def tpot(self) -> float | None:
        if self.end is None or not self.chunk_times or self.output_tokens < 2:
            return None
        return (self.end - self.chunk_times[0]) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        times = self.chunk_times
        return [later - earlier for earlier, later in zip(times, times[1:], strict=False)]

    def tokens_until(self, moment: float) -> int:
        """Tokens received by ``moment``: all of them if it ended by then, else one per chunk."""
        if self.end is not None and self.end <= moment:
            return self.output_tokens
        return sum(1 for t in self.chunk_times if t <= moment)


@dataclass(slots=True)
class LevelSummary:
    """One load level: what was offered, what came back, and how fast."""

    label: str
    """``c=8`` (closed loop), ``rate=4/s`` (open loop) or a case's own name."""
    concurrency: int | None = None
    rate: float | None = None
    """Requests per second offered (open loop, Poisson arrivals)."""
    num_ok: int = 0
    num_errors: int = 0
    num_incomplete: int = 0
    """Requests still running when the level's time cap ended them (not errors)."""
    duration_s: float = 0.0
    output_tokens: int = 0
    output_tokens_per_s: float = 0.0
    requests_per_s: float = 0.0
    ttft: Dist = field(default_factory=Dist)
    tpot: Dist = field(default_factory=Dist)
    itl: Dist = field(default_factory=Dist)
    e2e: Dist = field(default_factory=Dist)
    errors: list[str] = field(default_factory=list)
    """A few distinct error messages."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything a driver adds (e.g. ``worker_rss_mb``); reported as it is."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LevelSummary:
        """Inverse of ``to_dict`` (reads a JSON line back)."""
        values = dict(data)
        for name in ("ttft", "tpot", "itl", "e2e"):
            values[name] = Dist(**(values.get(name) or {}))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in known})


def summarize(
    records: Iterable[RequestRecord],
    label: str,
    window_start: float,
    window_end: float | None = None,
    concurrency: int | None = None,
    rate: float | None = None,
) -> LevelSummary:
    """Summarize the records of one level.

    The window runs from ``window_start`` to ``window_end`` (the time cap), or to the last end
    when no cap cut the level short. Throughput is the tokens that arrived in the window over
    its length; requests/s counts requests that completed in it.
    """
    records = list(records)
    ok = [r for r in records if r.is_ok]
    failed = [r for r in records if r.end is not None and r.error is not None]
    incomplete = [r for r in records if r.end is None]
    ends = [r.end for r in records if r.end is not None]
    if window_end is None:
        window_end = max(ends, default=window_start)
    duration = max(window_end - window_start, 0.0)
    tokens = sum(r.tokens_until(window_end) for r in records if r.error is None)
    errors: list[str] = []
    for record in failed:
        if record.error not in errors and len(errors) < MAX_ERROR_SAMPLES:
            errors.append(str(record.error))
    return LevelSummary(
        label=label,
        concurrency=concurrency,
        rate=rate,
        num_ok=len(ok),
        num_errors=len(failed),
        num_incomplete=len(incomplete),
        duration_s=duration,
        output_tokens=tokens,
        output_tokens_per_s=tokens / duration if duration > 0 else 0.0,
        requests_per_s=len(ok) / duration if duration > 0 else 0.0,
        ttft=Dist.of([t for r in ok if (t := r.ttft) is not None]),
        tpot=Dist.of([t for r in ok if (t := r.tpot) is not None]),
        itl=Dist.of([gap for r in ok for gap in r.itls]),
        e2e=Dist.of([r.end - r.start for r in ok if r.end is not None]),
        errors=errors,
    )
