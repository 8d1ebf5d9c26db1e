"""What a run measured: latencies, throughput and how evenly the nodes were loaded.

Only requests that arrive in the measurement window [warmup_s, duration_s) count; the tree
drains after the last arrival, so every one of them has finished (or was refused) and no
latency is cut short. Utilisation is the time-average of running / slots over the window.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from llmtree.sim.params import SimConfig
from llmtree.sim.topology import Tree


@dataclass(slots=True)
class Outcome:
    """Raw per-request and per-node records of one run (the event loop's output)."""

    arrivals: list[float]
    work: list[float]
    node_of: list[int]
    """Serving node of each request, -1 when refused (``Overloaded``)."""
    calls: list[int]
    start: list[float]
    finish: list[float]
    busy_at_warmup: list[float]
    busy_at_end: list[float]
    num_events: int
    end_time: float


@dataclass(slots=True)
class SimResult:
    """The summary of one run; ``to_dict`` is its JSON line."""

    config: SimConfig
    height: int
    capacity_rps: float
    offered_rps: float
    arrivals: int
    measured: int
    rejected_fraction: float
    throughput_rps: float
    """Requests of the window that were served, per second of the window (goodput)."""
    tokens_per_s: float
    completed_in_window_rps: float
    """Completions that fell inside the window, per second: below ``throughput_rps`` while
    queues are still filling up."""
    queued_fraction: float
    queue_delay_p50_s: float
    queue_delay_p90_s: float
    queue_delay_p99_s: float
    queue_delay_max_s: float
    e2e_p50_s: float
    e2e_p99_s: float
    calls_mean: float
    calls_p99: float
    utilisation_mean: float
    utilisation_min: float
    utilisation_max: float
    utilisation_cv: float
    utilisation_by_depth: list[float]
    served_cv: float
    served_max_over_min: float | None
    num_events: int
    sim_time_s: float
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["config"] = config_record(self.config)
        return data


def config_record(config: SimConfig) -> dict[str, Any]:
    """A config as its JSON line shows it (no ``curve`` unless one was given)."""
    return {k: v for k, v in asdict(config).items() if k != "curve" or v is not None}


def _cv(values: np.ndarray[Any, Any]) -> float:
    mean = float(values.mean()) if values.size else 0.0
    return float(values.std() / mean) if mean > 0 else 0.0


def summarize(
    cfg: SimConfig, tree: Tree, out: Outcome, rate: float, capacity: float, wall_s: float
) -> SimResult:
    """Percentiles and spread over the measurement window."""
    arrival = np.asarray(out.arrivals)
    node = np.asarray(out.node_of, dtype=np.int64)
    start = np.asarray(out.start)
    finish = np.asarray(out.finish)
    hop = cfg.hop_ms / 1000.0
    in_window = arrival >= cfg.warmup_s
    measured = int(in_window.sum())
    placed = in_window & (node >= 0)
    reach = arrival + np.asarray(out.calls) * hop  # when the walk reached the serving node
    begin = np.maximum(start, reach)
    delay = (begin - arrival)[placed]
    e2e = (begin - arrival + finish - start + hop)[placed]
    window = cfg.duration_s - cfg.warmup_s
    done = (finish >= cfg.warmup_s) & (finish < cfg.duration_s) & (node >= 0)
    workers = slice(1, None)
    served = np.bincount(node[placed], minlength=len(tree.parent))[workers]
    busy = np.asarray(out.busy_at_end) - np.asarray(out.busy_at_warmup)
    util = busy[workers] / (cfg.slots * window)
    depth = np.asarray(tree.depth)[workers]
    by_depth = [float(util[depth == d].mean()) for d in range(1, tree.height + 1)]

    def pct(values: np.ndarray[Any, Any], q: float) -> float:
        return float(np.percentile(values, q)) if values.size else 0.0

    calls = np.asarray(out.calls)[in_window]
    return SimResult(
        config=cfg,
        height=tree.height,
        capacity_rps=capacity,
        offered_rps=rate,
        arrivals=len(out.arrivals),
        measured=measured,
        rejected_fraction=float((in_window & (node < 0)).sum() / measured) if measured else 0.0,
        throughput_rps=float(placed.sum() / window),
        tokens_per_s=float(np.asarray(out.work)[placed].sum() / window),
        completed_in_window_rps=float(done.sum() / window),
        queued_fraction=float((start > arrival)[placed].mean()) if placed.any() else 0.0,
        queue_delay_p50_s=pct(delay, 50),
        queue_delay_p90_s=pct(delay, 90),
        queue_delay_p99_s=pct(delay, 99),
        queue_delay_max_s=float(delay.max()) if delay.size else 0.0,
        e2e_p50_s=pct(e2e, 50),
        e2e_p99_s=pct(e2e, 99),
        calls_mean=float(calls.mean()) if calls.size else 0.0,
        calls_p99=pct(calls, 99),
        utilisation_mean=float(util.mean()),
        utilisation_min=float(util.min()),
        utilisation_max=float(util.max()),
        utilisation_cv=_cv(util),
        utilisation_by_depth=by_depth,
        served_cv=_cv(served.astype(float)),
        served_max_over_min=float(served.max() / served.min()) if served.min() > 0 else None,
        num_events=out.num_events,
        sim_time_s=out.end_time,
        wall_s=wall_s,
    )
