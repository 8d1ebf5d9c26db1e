"""``llmtree simulate``: run the tree model, one run or a sweep, and print a table and JSON.

    llmtree simulate                                       100 nodes, fan-out 4, load 0.8, seed
    llmtree simulate --nodes 10000 --fanout 4,10,100 --policy seed,p2c --load 0.9
    llmtree simulate --depth 3 --fanout 10 --rate 1500 --json runs.jsonl
    llmtree simulate --nodes 1000 --output-dist exponential --heartbeat 0 --json -

Flags that take a comma list (``--nodes``, ``--depth``, ``--fanout``, ``--policy``, ``--load``,
``--rate``) sweep every combination, one table row and one JSON line per run. ``--json -``
prints the JSON lines on stdout (the table then goes to stderr).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.table import Table

from llmtree.errors import ConfigError
from llmtree.sim.model import simulate
from llmtree.sim.params import OUTPUT_DISTRIBUTIONS, POLICIES, SERVICE_MODELS, SimConfig
from llmtree.sim.results import SimResult
from llmtree.sim.topology import nodes_for_depth

T = TypeVar("T")
DEFAULTS = SimConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``llmtree simulate`` flags (called by ``llmtree.cli.build_parser``)."""
    add = parser.add_argument
    add("--nodes", metavar="N,...", help=f"serving nodes, root excluded ({DEFAULTS.nodes})")
    add("--depth", metavar="D,...", help="levels below the root; nodes = K + K^2 + .. + K^D")
    add("--fanout", metavar="K,...", help=f"children per node ({DEFAULTS.fanout})")
    add("--policy", metavar="P,...", help=f"{', '.join(POLICIES)} ({DEFAULTS.policy})")
    add("--load", metavar="X,...", help=f"arrivals as a multiple of capacity ({DEFAULTS.load})")
    add("--rate", metavar="R,...", help="arrivals in requests/s (Poisson); overrides --load")
    add("--slots", type=int, default=DEFAULTS.slots, help=f"batch slots ({DEFAULTS.slots})")
    add("--max-queue", type=int, default=DEFAULTS.max_queue, help="queue bound per node (64)")
    add("--output-tokens", type=float, default=DEFAULTS.output_tokens, help="mean length (128)")
    add(
        "--output-dist",
        choices=OUTPUT_DISTRIBUTIONS,
        default=DEFAULTS.output_dist,
        help="output lengths: all the mean, uniform 1..2x mean, exponential (fixed)",
    )
    add(
        "--service",
        choices=SERVICE_MODELS,
        default=DEFAULTS.service,
        help="measured: per-request speed falls as the batch grows (calibrated); constant: not",
    )
    add("--hop-ms", type=float, default=DEFAULTS.hop_ms, help="one submit call (0.8 ms)")
    add("--heartbeat", type=float, default=DEFAULTS.heartbeat_s, help="report age, s (2; 0=live)")
    add("--duration", type=float, default=DEFAULTS.duration_s, help="arrival window, s (40)")
    add("--warmup", type=float, default=DEFAULTS.warmup_s, help="unmeasured start, s (15)")
    add("--seed", type=int, default=DEFAULTS.seed, help="random seed (0)")
    add("--json", metavar="PATH", help="write one JSON line per run here ('-': stdout)")


def _list(text: str | None, kind: Callable[[str], T], default: T, flag: str) -> list[T]:
    if text is None:
        return [default]
    try:
        return [kind(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes a comma list, got {text!r}") from None


def configs(args: argparse.Namespace) -> list[SimConfig]:
    """Every combination the flags ask for, validated."""
    base = SimConfig(
        slots=args.slots,
        max_queue=args.max_queue,
        output_tokens=args.output_tokens,
        output_dist=args.output_dist,
        service=args.service,
        hop_ms=args.hop_ms,
        heartbeat_s=args.heartbeat,
        duration_s=args.duration,
        warmup_s=args.warmup,
        seed=args.seed,
    )
    fanouts = _list(args.fanout, int, base.fanout, "--fanout")
    if args.depth is not None and args.nodes is not None:
        raise ConfigError("give --nodes or --depth, not both")
    shapes: list[tuple[int, int]] = []
    for fanout in fanouts:
        if args.depth is not None:
            depths = _list(args.depth, int, 1, "--depth")
            shapes += [(nodes_for_depth(d, fanout), fanout) for d in depths]
        else:
            shapes += [(n, fanout) for n in _list(args.nodes, int, base.nodes, "--nodes")]
    policies = _list(args.policy, str, base.policy, "--policy")
    rates: list[tuple[float, float | None]]
    if args.rate is not None:
        rates = [(base.load, r) for r in _list(args.rate, float, 1.0, "--rate")]
    else:
        rates = [(x, None) for x in _list(args.load, float, base.load, "--load")]
    return [
        replace(base, nodes=n, fanout=k, policy=p, load=x, rate=r).validate()
        for (n, k), p, (x, r) in itertools.product(shapes, policies, rates)
    ]


def render_table(results: list[SimResult]) -> Table:
    table = Table(title="llmtree simulate", title_justify="left")
    heads = ["nodes", "K", "depth", "policy", "load", "offered/s", "served/s", "refused", "queued"]
    heads += ["wait p50 s", "wait p99 s", "e2e p50 s", "e2e p99 s", "util", "util CV"]
    heads += ["served max/min", "events", "wall s"]
    for head in heads:
        table.add_column(head, justify="left" if head == "policy" else "right")
    for r in results:
        c = r.config
        spread = r.served_max_over_min
        table.add_row(
            str(c.nodes),
            str(c.fanout),
            str(r.height),
            c.policy,
            f"{r.offered_rps / r.capacity_rps:.2f}",
            f"{r.offered_rps:.1f}",
            f"{r.throughput_rps:.1f}",
            f"{r.rejected_fraction:.1%}",
            f"{r.queued_fraction:.1%}",
            f"{r.queue_delay_p50_s:.3f}",
            f"{r.queue_delay_p99_s:.3f}",
            f"{r.e2e_p50_s:.2f}",
            f"{r.e2e_p99_s:.2f}",
            f"{r.utilisation_mean:.2f}",
            f"{r.utilisation_cv:.2f}",
            "inf" if spread is None else f"{spread:.2f}",
            f"{r.num_events:,}",
            f"{r.wall_s:.2f}",
        )
    return table


def run_simulate(args: argparse.Namespace) -> int:
    """Run every configuration the flags name; exit 0."""
    runs = configs(args)
    to_stdout = args.json == "-"
    console = Console(stderr=to_stdout, width=200)
    out = sys.stdout if to_stdout else None
    path = None if args.json in (None, "-") else Path(args.json)
    results: list[SimResult] = []
    handle = path.open("w") if path else None
    try:
        for config in runs:
            result = simulate(config)
            results.append(result)
            line = json.dumps(result.to_dict())
            if handle:
                handle.write(line + "\n")
                handle.flush()
            if out:
                print(line, file=out, flush=True)
    finally:
        if handle:
            handle.close()
    console.print(render_table(results))
    if path:
        console.print(f"wrote {len(results)} JSON line(s) to {path}")
    return 0
