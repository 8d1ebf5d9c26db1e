"""The event loop: Poisson arrivals, placement down the tree, a continuous batch per node.

A node running k requests produces tokens at the measured aggregate rate R(k), shared equally,
so each of its requests advances at R(k)/k tokens/s until the next arrival or completion at
that node changes k (processor sharing with a state-dependent rate). Each node keeps a
"virtual token clock" V (tokens every one of its running requests has received so far) and a
heap of the V at which each of them finishes; only the earliest is on the global event heap,
and a stale entry is skipped by its version number. Queued requests start, first come first
served, the moment a slot frees.

Placement is decided at the arrival instant against the current state, as if the synchronous
walk down the tree took no time; the walk's ``submit`` calls (``hop_ms`` each) delay the start
of service instead: a request starts at max(slot free, arrival + calls * hop). The last token
reaches the root one hop after the node makes it.
"""

from __future__ import annotations

import heapq
import math
import random
import time

import numpy as np

from llmtree.errors import ConfigError
from llmtree.sim.calibration import ThroughputCurve, measured_points
from llmtree.sim.params import SimConfig
from llmtree.sim.placement import Placer, make_placer
from llmtree.sim.results import Outcome, SimResult, summarize
from llmtree.sim.state import TreeState
from llmtree.sim.topology import build_tree

HEARTBEAT_GROUPS = 8
"""Nodes heartbeat in this many staggered groups, so reports are 0 .. heartbeat_s old."""


def capacity_rps(config: SimConfig, curve: ThroughputCurve) -> float:
    """Requests/s the tree completes with every slot of every worker busy."""
    per_node = curve.capacity_tokens_per_s(config.slots, config.service == "constant")
    return config.nodes * per_node / config.output_tokens


def draw_arrivals(rate: float, duration_s: float, seed: int) -> list[float]:
    """Poisson arrival times in [0, duration_s)."""
    gen = np.random.default_rng(seed)
    expected = rate * duration_s
    chunk = int(expected + 10 * math.sqrt(expected) + 100)
    times = np.cumsum(gen.exponential(1.0 / rate, size=chunk))
    while times[-1] < duration_s:
        more = np.cumsum(gen.exponential(1.0 / rate, size=chunk)) + times[-1]
        times = np.concatenate([times, more])
    result: list[float] = times[times < duration_s].tolist()
    return result


def draw_outputs(count: int, config: SimConfig) -> list[float]:
    """Output lengths in tokens, at least 1, with the configured mean and distribution."""
    gen = np.random.default_rng(config.seed + 1)
    mean = config.output_tokens
    if config.output_dist == "fixed":
        tokens = np.full(count, max(1, round(mean)))
    elif config.output_dist == "uniform":
        tokens = gen.integers(1, max(2, round(2 * mean)), size=count)
    else:
        tokens = np.maximum(1, np.rint(gen.exponential(mean, size=count)))
    result: list[float] = tokens.astype(float).tolist()
    return result


def simulate(config: SimConfig) -> SimResult:
    """Run one simulation and summarize it."""
    return simulate_detailed(config)[0]


def simulate_detailed(
    config: SimConfig,
    arrivals: list[float] | None = None,
    work: list[float] | None = None,
    reference: bool = False,
) -> tuple[SimResult, Outcome, TreeState]:
    """One run with its raw records and final state.

    ``arrivals`` / ``work``: given arrival times (sorted, within the duration) and output
    lengths instead of drawn ones; ``reference``: place with ``routing.plan`` itself (slow).
    """
    started = time.perf_counter()
    cfg = config.validate()
    curve = ThroughputCurve(cfg.curve or measured_points())
    rates = curve.per_request(cfg.slots, constant=cfg.service == "constant")
    capacity = capacity_rps(cfg, curve)
    rate = cfg.rate if cfg.rate is not None else cfg.load * capacity
    tree = build_tree(cfg.nodes, cfg.fanout)
    state = TreeState(tree, cfg.slots, cfg.max_queue)
    if arrivals is None:
        arrivals = draw_arrivals(rate, cfg.duration_s, cfg.seed)
    if work is None:
        work = draw_outputs(len(arrivals), cfg)
    if len(work) != len(arrivals):
        raise ConfigError("give one output length per arrival")
    calls = [0]
    policy = "reference-seed" if reference and cfg.policy == "seed" else cfg.policy
    fresh = cfg.heartbeat_s == 0
    place = make_placer(state, policy, random.Random(cfg.seed + 2), calls, fresh)
    outcome = _run(cfg, state, rates, arrivals, work, place, calls)
    result = summarize(cfg, tree, outcome, rate, capacity, time.perf_counter() - started)
    return result, outcome, state


def _run(
    cfg: SimConfig,
    state: TreeState,
    rates: list[float],
    arrivals: list[float],
    work: list[float],
    place: Placer,
    calls: list[int],
) -> Outcome:
    parent = state.tree.parent
    running, occ, waiting, sub_occ = state.running, state.occ, state.waiting, state.sub_occ
    total = len(parent)
    slots = cfg.slots
    clock = [0.0] * total  # when each node's V and busy were last brought up to date
    vclock = [0.0] * total
    busy = [0.0] * total  # integral of running requests over time
    version = [0] * total
    finishing: list[list[tuple[float, int]]] = [[] for _ in range(total)]
    count = len(arrivals)
    node_of = [-1] * count
    num_calls = [0] * count
    start = [0.0] * count
    finish = [0.0] * count
    # events: (time, node, version); node -1 = heartbeat of group `version`, -2 = busy snapshot
    events: list[tuple[float, int, int]] = [(cfg.warmup_s, -2, 0), (cfg.duration_s, -2, 1)]
    tick = cfg.heartbeat_s / HEARTBEAT_GROUPS
    if cfg.policy != "seed" and tick > 0:
        events.append((tick, -1, 0))
    heapq.heapify(events)
    push, pop = heapq.heappush, heapq.heappop
    snapshots: list[list[float]] = []
    inf = math.inf
    next_arrival = arrivals[0] if count else inf
    arrived = 0
    num_events = 0

    while True:
        if events and events[0][0] < next_arrival:
            t, s, ver = pop(events)
            num_events += 1
            if s > 0:  # the earliest request of node s finishes, unless the entry is stale
                if ver != version[s]:
                    continue
                k = running[s]
                dt = t - clock[s]
                vclock[s] += dt * rates[k]
                busy[s] += k * dt
                clock[s] = t
                heap = finishing[s]
                finish[pop(heap)[1]] = t
                queue = waiting[s]
                if queue:
                    rid = queue.popleft()
                    push(heap, (vclock[s] + work[rid], rid))
                    start[rid] = t
                else:
                    k -= 1
                    running[s] = k
                occ[s] -= 1
                p = s
                while p >= 0:
                    sub_occ[p] -= 1
                    p = parent[p]
                ver += 1
                version[s] = ver
                if k:
                    left = heap[0][0] - vclock[s]
                    push(events, (t + (left / rates[k] if left > 0 else 0.0), s, ver))
            elif s == -1:
                state.refresh_reports(ver + 1, HEARTBEAT_GROUPS)
                if arrived < count:
                    push(events, (t + tick, -1, (ver + 1) % HEARTBEAT_GROUPS))
            else:
                for n in range(1, total):
                    k = running[n]
                    dt = t - clock[n]
                    vclock[n] += dt * rates[k]
                    busy[n] += k * dt
                    clock[n] = t
                snapshots.append(busy[:])
            continue
        if arrived >= count:
            break
        rid = arrived
        t = next_arrival
        arrived += 1
        next_arrival = arrivals[arrived] if arrived < count else inf
        num_events += 1
        s = place()
        num_calls[rid] = calls[0]
        calls[0] = 0
        if s < 0:
            continue
        node_of[rid] = s
        occ[s] += 1
        p = s
        while p >= 0:
            sub_occ[p] += 1
            p = parent[p]
        k = running[s]
        if k >= slots:
            waiting[s].append(rid)
            continue
        dt = t - clock[s]
        vclock[s] += dt * rates[k]
        busy[s] += k * dt
        clock[s] = t
        heap = finishing[s]
        push(heap, (vclock[s] + work[rid], rid))
        start[rid] = t
        k += 1
        running[s] = k
        ver = version[s] + 1
        version[s] = ver
        push(events, (t + (heap[0][0] - vclock[s]) / rates[k], s, ver))

    return Outcome(
        arrivals=arrivals,
        work=work,
        node_of=node_of,
        calls=num_calls,
        start=start,
        finish=finish,
        busy_at_warmup=snapshots[0],
        busy_at_end=snapshots[1],
        num_events=num_events,
        end_time=max(finish, default=0.0),
    )
