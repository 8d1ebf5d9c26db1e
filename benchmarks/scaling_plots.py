"""The figures of docs/scaling.md: simulator sweeps at 10,000 nodes, their data and PNG plots.

    python benchmarks/scaling_plots.py                 run every sweep (minutes), then plot
    python benchmarks/scaling_plots.py --plot-only     re-plot from docs/img/scaling.jsonl
    python benchmarks/scaling_plots.py --jobs 2        runs in parallel processes

Every run is ``llmtree.sim.simulate`` with the same defaults as ``llmtree simulate`` except the
fields each sweep names; the JSON lines (one per run, the CLI's format) go to
docs/img/scaling.jsonl and the plots next to them. It also prints the Markdown tables the page
quotes.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from llmtree.sim import SimConfig, simulate
from llmtree.sim.calibration import ThroughputCurve, load_calibration, measured_points
from llmtree.sim.results import config_record
from llmtree.sim.topology import nodes_for_depth

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "img"
NODES = 10_000
FANOUTS = (2, 4, 10, 32, 100, 10_000)
LOADS = (0.5, 0.8, 0.9, 0.95)
POLICIES = ("seed", "p2c", "p2c+sent")
PANELS = (*POLICIES, "weighted-rr")
BASE = SimConfig(nodes=NODES, duration_s=40.0, warmup_s=15.0)
COMPLETE = ((100, 2), (21, 3), (10, 4))  # full trees near 10,000: 10,100, 9,723, 11,110 nodes
Record = dict[str, Any]
TITLES = {
    "seed": "the real rule",
    "p2c": "reports 0-2 s old",
    "p2c+sent": "reports 0-2 s old + own sends",
    "weighted-rr": "round robin weighted by subtree size",
}
plt: Any = None  # matplotlib.pyplot, imported once the runs are done


def sweep() -> list[SimConfig]:
    """Fan-out x load x policy at 10,000 nodes; live reports; staleness; complete trees."""
    runs = [
        replace(BASE, fanout=k, load=x, policy=p) for k in FANOUTS for x in LOADS for p in POLICIES
    ]
    runs += [
        replace(BASE, fanout=k, load=0.9, policy=p, heartbeat_s=0.0)
        for k in FANOUTS
        for p in ("p2c", "least-loaded")
        if not (p == "least-loaded" and k > 100)
    ]
    runs += [
        replace(BASE, fanout=10, load=0.9, policy=p, heartbeat_s=h)
        for h in (0.5, 8.0)
        for p in ("p2c", "p2c+sent")
    ]
    runs += [
        replace(BASE, nodes=nodes_for_depth(d, k), fanout=k, load=x, policy=p)
        for k, d in COMPLETE
        for p in ("seed", "p2c", "p2c+sent")
        for x in (0.9, 0.95)
        if not (p == "p2c" and x == 0.95)
    ]
    # weighted-rr at K=10,000 is the seed rule itself (all children are leaves of weight 1)
    runs += [
        replace(BASE, fanout=k, load=x, policy="weighted-rr")
        for k in FANOUTS
        if k < NODES
        for x in LOADS
    ]
    return runs


def key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


def run_all(jobs: int, data: Path, resume: bool) -> list[Record]:
    """Run the sweep (with ``resume``: only the runs ``data`` does not hold yet)."""
    records: list[Record] = []
    if resume and data.exists():
        records = [json.loads(line) for line in data.read_text().splitlines()]
    done = {key(r["config"]) for r in records}
    configs = [c for c in sweep() if key(config_record(c)) not in done]
    with ProcessPoolExecutor(max_workers=jobs) as pool, data.open("a" if resume else "w") as handle:
        for i, result in enumerate(pool.map(simulate, configs), 1):
            record = result.to_dict()
            records.append(record)
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            c = record["config"]
            print(
                f"[{i}/{len(configs)}] K={c['fanout']} load={c['load']} {c['policy']} "
                f"hb={c['heartbeat_s']}: p99 wait {record['queue_delay_p99_s']:.3f} s, "
                f"{record['wall_s']:.1f} s wall",
                file=sys.stderr,
            )
    return records


def pick(records: list[Record], **want: Any) -> list[Record]:
    """Runs whose config has these values (10,000 nodes unless ``nodes`` is given)."""
    want.setdefault("nodes", NODES)
    return [r for r in records if all(r["config"][k] == v for k, v in want.items())]


def plot_calibration() -> None:
    points = measured_points()
    curve = ThroughputCurve(points)
    ks = list(range(1, 33))
    fig, left = plt.subplots(figsize=(7, 4.2))
    left.plot(ks, [curve.aggregate(k) for k in ks], color="tab:blue", label="R(k) used (measured)")
    left.scatter([k for k, _ in points], [r for _, r in points], color="tab:blue", zorder=3)
    check = load_calibration()["cross-check points"]
    left.scatter(
        [p["concurrency"] for p in check],
        [p["output_tokens_per_s"] for p in check],
        facecolors="none",
        edgecolors="black",
        zorder=4,
        label="make bench, docs/benchmarks.md",
    )
    left.legend(loc="center right", fontsize=8)
    left.set_xlabel("requests in the batch (k)")
    left.set_ylabel("output tokens/s, whole batch", color="tab:blue")
    right = left.twinx()
    right.plot(ks, [curve.aggregate(k) / k for k in ks], color="tab:orange", label="R(k)/k")
    right.set_ylabel("tokens/s each request gets", color="tab:orange")
    left.set_title("Calibration: one real node (SmolLM2-135M, 2 CPU cores)")
    left.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT / "calibration.png", dpi=120)
    plt.close(fig)


def plot_p99_vs_load(records: list[Record]) -> None:
    fig, grid = plt.subplots(2, 2, figsize=(12, 8), sharey=True, sharex=True)
    axes = list(grid.flat)
    for ax, policy in zip(axes, PANELS, strict=True):
        for k in FANOUTS:
            rows = sorted(
                pick(records, fanout=k, policy=policy, heartbeat_s=BASE.heartbeat_s),
                key=lambda r: r["config"]["load"],
            )
            depth = rows[0]["height"] if rows else 0
            ax.plot(
                [r["config"]["load"] for r in rows],
                [max(r["queue_delay_p99_s"], 1e-3) for r in rows],
                marker="o",
                label=f"K={k} (depth {depth})",
            )
        ax.axhline(1.0, color="red", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_title(f"{policy} ({TITLES[policy]})")
        ax.grid(alpha=0.3, which="both")
    for ax in axes[2:]:
        ax.set_xlabel("offered load (fraction of capacity)")
    for ax in axes[::2]:
        ax.set_ylabel("p99 queueing delay, s (log)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(FANOUTS), fontsize=9)
    fig.suptitle("10,000 nodes: p99 wait from arrival to start of service (red: 1 s)")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(OUT / "p99_vs_load.png", dpi=120)
    plt.close(fig)


def plot_p99_vs_fanout(records: list[Record]) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.3))
    series = [
        ("seed", BASE.heartbeat_s, "seed rule"),
        ("p2c", BASE.heartbeat_s, "p2c, reports 0-2 s old"),
        ("p2c+sent", BASE.heartbeat_s, "p2c+sent, reports 0-2 s old"),
        ("weighted-rr", BASE.heartbeat_s, "weighted-rr (no reports)"),
        ("p2c", 0.0, "p2c, live reports"),
        ("least-loaded", 0.0, "least-loaded, live reports"),
    ]
    for policy, heartbeat, label in series:
        rows = sorted(
            pick(records, load=0.9, policy=policy, heartbeat_s=heartbeat),
            key=lambda r: r["config"]["fanout"],
        )
        dashed = policy == "weighted-rr"  # it coincides with least-loaded on live reports
        ax.plot(
            [r["config"]["fanout"] for r in rows],
            [max(r["queue_delay_p99_s"], 1e-3) for r in rows],
            marker="s" if dashed else "o",
            linestyle="--" if dashed else "-",
            linewidth=2.5 if dashed else 1.5,
            zorder=3 if dashed else 2,
            label=label,
        )
    ax.axhline(1.0, color="red", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("fan-out K (10,000 nodes, breadth first)")
    ax.set_ylabel("p99 queueing delay, s (log)")
    ax.set_title("Load 0.9: p99 wait by fan-out and policy")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "p99_vs_fanout.png", dpi=120)
    plt.close(fig)


def plot_utilisation(records: list[Record]) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0), sharey=True)
    width = 0.8 / len(PANELS)
    for ax, k in zip(axes, (4, 10), strict=True):
        for i, policy in enumerate(PANELS):
            rows = pick(records, fanout=k, load=0.9, policy=policy, heartbeat_s=BASE.heartbeat_s)
            if not rows:
                continue
            levels = rows[0]["utilisation_by_depth"]
            xs = [d + 1 + (i - 1.5) * width for d in range(len(levels))]
            ax.bar(xs, levels, width=width, label=policy)
            ax.set_xticks(range(1, len(levels) + 1))
        ax.set_title(f"K={k}, load 0.9")
        ax.set_xlabel("depth (1 = the root's children)")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("mean utilisation (running / slots)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(PANELS), fontsize=9)
    fig.suptitle("10,000 nodes: mean utilisation of the nodes at each depth")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(OUT / "utilisation_by_depth.png", dpi=120)
    plt.close(fig)


def tables(records: list[Record]) -> None:
    print("| K | depth | policy | " + " | ".join(f"load {x}" for x in LOADS) + " |")
    print("| ---: | ---: | --- |" + " ---: |" * len(LOADS))
    for k in FANOUTS:
        for policy in PANELS:
            rows = pick(records, fanout=k, policy=policy, heartbeat_s=BASE.heartbeat_s)
            if not rows:
                continue
            by_load = {r["config"]["load"]: r for r in rows}
            cells = [
                f"{by_load[x]['queue_delay_p99_s']:.3f}" if x in by_load else "" for x in LOADS
            ]
            depth = rows[0]["height"] if rows else ""
            print(f"| {k} | {depth} | {policy} | " + " | ".join(cells) + " |")
    print()
    head = "| K | policy | heartbeat s | p50 wait s | p99 wait s | queued | e2e p99 s"
    print(head + " | util CV | served max/min | calls | wall s |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in sorted(
        pick(records, load=0.9),
        key=lambda r: (r["config"]["fanout"], r["config"]["policy"], r["config"]["heartbeat_s"]),
    ):
        c = r["config"]
        spread = r["served_max_over_min"]
        print(
            f"| {c['fanout']} | {c['policy']} | {c['heartbeat_s']} | {r['queue_delay_p50_s']:.3f}"
            f" | {r['queue_delay_p99_s']:.3f} | {r['queued_fraction']:.1%} | {r['e2e_p99_s']:.1f}"
            f" | {r['utilisation_cv']:.2f} | {'inf' if spread is None else f'{spread:.1f}'}"
            f" | {r['calls_mean']:.1f} | {r['wall_s']:.1f} |"
        )


def complete_table(records: list[Record]) -> None:
    print()
    print("| nodes | K | depth | load | policy | p99 wait s | queued | util CV | wall s |")
    print("| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for k, d in COMPLETE:
        rows = pick(records, nodes=nodes_for_depth(d, k), fanout=k)
        for r in sorted(rows, key=lambda r: (r["config"]["load"], r["config"]["policy"])):
            print(
                f"| {r['config']['nodes']} | {k} | {r['height']} | {r['config']['load']}"
                f" | {r['config']['policy']}"
                f" | {r['queue_delay_p99_s']:.3f} | {r['queued_fraction']:.1%}"
                f" | {r['utilisation_cv']:.2f} | {r['wall_s']:.1f} |"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plot-only", action="store_true", help="re-plot the saved data")
    parser.add_argument("--resume", action="store_true", help="run only what --data lacks")
    parser.add_argument("--jobs", type=int, default=2, help="parallel processes (2)")
    parser.add_argument("--data", type=Path, default=OUT / "scaling.jsonl")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        records = [json.loads(line) for line in args.data.read_text().splitlines()]
    else:
        records = run_all(args.jobs, args.data, args.resume)
    print(f"calibration: {load_calibration()['command']}", file=sys.stderr)
    import matplotlib

    matplotlib.use("Agg")
    global plt
    import matplotlib.pyplot as plt

    plot_calibration()
    plot_p99_vs_load(records)
    plot_p99_vs_fanout(records)
    plot_utilisation(records)
    tables(records)
    complete_table(records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
