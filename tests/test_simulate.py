"""The simulator's logic: hand-computed queues, the real placement rule, conservation, scale, CLI.

Pure Python, no processes: every test here runs in well under a few seconds.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from llmtree.cli import main
from llmtree.errors import ConfigError
from llmtree.sim import SimConfig, SimResult, simulate_detailed
from llmtree.sim.calibration import ThroughputCurve, load_calibration, measured_points
from llmtree.sim.placement import make_placer
from llmtree.sim.state import TreeState
from llmtree.sim.topology import build_tree, nodes_for_depth
from llmtree.tree.routing import Snapshot, plan

FLAT = ((1, 10.0),)  # one request alone makes 10 tokens/s; a batch of k shares those 10


def tiny(**fields: Any) -> SimConfig:
    """A one-worker tree, 10 tokens/s per slot, no hop latency, everything measured."""
    base = SimConfig(
        nodes=1, fanout=1, curve=FLAT, hop_ms=0.0, warmup_s=0.0, duration_s=10.0, heartbeat_s=0
    )
    return replace(base, **fields)


def test_single_slot_fifo_queue_by_hand() -> None:
    """One node, one slot, queue of 2, 1 s jobs arriving every 0.1 s: waits 0, 0.9, 1.8, refused."""
    config = tiny(slots=1, max_queue=2)
    result, out, state = simulate_detailed(config, [0.0, 0.1, 0.2, 0.3], [10.0] * 4)
    assert out.node_of == [1, 1, 1, -1]
    assert out.start[:3] == pytest.approx([0.0, 1.0, 2.0])
    assert out.finish[:3] == pytest.approx([1.0, 2.0, 3.0])
    assert result.rejected_fraction == pytest.approx(0.25)
    assert result.queue_delay_max_s == pytest.approx(1.8)
    assert result.queue_delay_p50_s == pytest.approx(0.9)
    assert result.queued_fraction == pytest.approx(2 / 3)
    assert state.occ == [0, 0] and state.sub_occ == [0, 0] and state.running == [0, 0]


def test_batch_shares_the_measured_rate() -> None:
    """Two requests in one batch share R(2): 10 tokens each, the second joining at 0.5 s."""
    config = tiny(slots=2, max_queue=0)
    _, out, _ = simulate_detailed(config, [0.0, 0.5], [10.0, 10.0])
    # alone 0..0.5 s at 10 tok/s (5 tokens), then 5 tok/s each: the first ends at 1.5 s,
    # the second has 5 tokens then and finishes alone at 10 tok/s by 2.0 s
    assert out.finish == pytest.approx([1.5, 2.0])
    assert out.start == pytest.approx([0.0, 0.5])


def test_hops_delay_the_start() -> None:
    """Three levels of a chain: the request is served at depth 1; with a busy top it goes to 3."""
    config = tiny(nodes=3, fanout=1, slots=1, max_queue=0, hop_ms=10.0)
    result, out, _ = simulate_detailed(config, [0.0, 0.001, 0.002], [100.0] * 3)
    assert out.node_of == [1, 2, 3]
    assert out.calls == [1, 2, 3]
    assert result.queue_delay_max_s == pytest.approx(0.030)
    assert result.queue_delay_p50_s == pytest.approx(0.020)


def test_seed_round_robin_over_the_roots_children() -> None:
    config = tiny(nodes=3, fanout=3, slots=1, max_queue=1)
    arrivals = [0.01 * i for i in range(7)]
    _, out, _ = simulate_detailed(config, arrivals, [100.0] * 7)
    assert out.node_of == [1, 2, 3, 1, 2, 3, -1]


def test_seed_places_every_request_as_routing_plan_does() -> None:
    """The fast seed placer (subtree shortcuts, owed pointer advances) against plan() itself."""
    config = SimConfig(
        nodes=40, fanout=3, slots=2, max_queue=1, load=1.6, duration_s=60.0, warmup_s=5.0
    )
    fast = simulate_detailed(config)[1]
    reference = simulate_detailed(config, reference=True)[1]
    assert fast.node_of == reference.node_of
    assert fast.calls == reference.calls
    assert -1 in fast.node_of  # overload happened, so the shortcuts were exercised
    assert len(set(fast.node_of)) == 41


def test_seed_placer_matches_plan_on_a_snapshot() -> None:
    """Root with 3 children, the first two at their bound: the third serves; pointer moves."""
    state = TreeState(build_tree(3, 3), slots=1, max_queue=0)
    for node in (1, 2):
        state.occ[node] = state.running[node] = 1
        state.sub_occ[node] = 1
    state.sub_occ[0] = 2
    calls = [0]
    placer = make_placer(state, "seed", random.Random(0), calls, fresh=True)
    decision = plan(Snapshot(False, 1, 0, 1, 0, children=("1", "2", "3"), next_child=0))
    assert decision.forward_to == ("1", "2", "3") and not decision.serve
    assert placer() == 3
    assert state.next_child[0] == 1
    assert calls[0] == 3


@pytest.mark.parametrize("policy", ["seed", "p2c", "p2c+sent", "least-loaded", "weighted-rr"])
def test_every_arrival_is_served_or_refused(policy: str) -> None:
    config = SimConfig(
        nodes=30, fanout=2, policy=policy, load=1.4, max_queue=4, duration_s=30.0, warmup_s=5.0
    )
    result, out, state = simulate_detailed(config)
    served = [i for i, n in enumerate(out.node_of) if n >= 0]
    refused = [i for i, n in enumerate(out.node_of) if n < 0]
    assert len(served) + len(refused) == len(out.arrivals) == result.arrivals
    assert refused and served
    for i in served:
        assert out.arrivals[i] <= out.start[i] < out.finish[i]
    assert sum(state.occ) == sum(state.running) == 0 == state.sub_occ[0]
    assert all(not queue for queue in state.waiting)
    assert result.rejected_fraction > 0


def _uneven(policy: str, heartbeat_s: float) -> SimResult:
    """100 workers at fan-out 4: the last level is a quarter full, so subtrees differ in size."""
    config = SimConfig(nodes=100, fanout=4, policy=policy, load=0.9, heartbeat_s=heartbeat_s)
    return simulate_detailed(config)[0]


def test_load_aware_policies_spread_load_more_evenly_than_seed() -> None:
    seed = _uneven("seed", 2.0)
    aware_policies = (("p2c", 0.0), ("p2c+sent", 2.0), ("least-loaded", 0.0), ("weighted-rr", 2.0))
    for policy, heartbeat in aware_policies:
        aware = _uneven(policy, heartbeat)
        assert aware.utilisation_cv < seed.utilisation_cv, policy
        assert aware.served_max_over_min is not None
        assert seed.served_max_over_min is None or aware.served_max_over_min < (
            seed.served_max_over_min
        )


def test_round_robin_overloads_small_subtrees_and_weighting_fixes_it() -> None:
    """40 workers at fan-out 4: the root's children head subtrees of 21, 9, 5 and 5 nodes.

    The seed rule sends each a quarter of all requests, so the small ones
    sit at their bound while the large one has room; weighting by subtree size does not.
    """
    tree = build_tree(40, 4)
    assert [tree.size[child] for child in tree.children[0]] == [21, 9, 5, 5]
    seed = simulate_detailed(SimConfig(nodes=40, fanout=4, load=0.7))[0]
    weighted = simulate_detailed(SimConfig(nodes=40, fanout=4, load=0.7, policy="weighted-rr"))[0]
    assert seed.queued_fraction > 0.3 and seed.queue_delay_p99_s > 5
    assert weighted.queued_fraction == 0 and weighted.queue_delay_p99_s < 0.01


def test_stale_reports_make_least_loaded_herd() -> None:
    """Every request between two heartbeats goes to the same "least loaded" subtree."""
    live, stale = _uneven("least-loaded", 0.0), _uneven("least-loaded", 2.0)
    assert stale.queued_fraction > live.queued_fraction + 0.1
    assert stale.queue_delay_p99_s > live.queue_delay_p99_s


def test_ten_thousand_nodes_in_bounded_events_and_time() -> None:
    config = SimConfig(nodes=10_000, fanout=10, load=0.7, duration_s=4.0, warmup_s=1.0)
    started = time.perf_counter()
    result, out, _ = simulate_detailed(config)
    elapsed = time.perf_counter() - started
    # each arrival is one event; each served request at most one live completion entry plus
    # one stale entry per batch change at its node, two snapshots besides
    assert result.num_events <= 4 * result.arrivals + 2
    assert result.arrivals > 40_000
    assert result.height == 4
    assert elapsed < 30
    assert all(n >= 0 for n in out.node_of)


def test_curve_interpolates_and_flattens() -> None:
    curve = ThroughputCurve(((1, 40.0), (8, 140.0), (32, 280.0)))
    assert curve.aggregate(1) == 40.0
    assert curve.aggregate(20) == pytest.approx(210.0)
    assert curve.aggregate(64) == 280.0
    rates = curve.per_request(32)
    assert rates[8] == pytest.approx(17.5)
    assert curve.per_request(4, constant=True)[4] == 40.0
    with pytest.raises(ConfigError):
        ThroughputCurve(((8, 1.0), (1, 2.0)))


def test_calibration_file_records_its_source() -> None:
    data = load_calibration()
    assert "engine_alone.py" in data["command"]
    assert all("engine_alone.py" in command for command in data["commands"].values())
    points = measured_points()
    assert points[0][0] == 1 and len(points) >= 3
    assert all(rate > 0 for _, rate in points)


def test_tree_shape_matches_llmtree_up() -> None:
    from llmtree.launcher import tree_parents

    tree = build_tree(10, 3)
    parents = tree_parents(10, 3)
    names = ["root"] + [f"worker-{i}" for i in range(1, 11)]
    for worker, parent in parents.items():
        index = int(worker.removeprefix("worker-"))
        assert names[tree.parent[index]] == parent
    assert nodes_for_depth(3, 10) == 1110
    assert tree.size[0] == 10 and tree.height == 2


def test_cli_prints_a_table_and_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_file = tmp_path / "runs.jsonl"
    argv = ["simulate", "--nodes", "20", "--policy", "seed,p2c", "--duration", "6"]
    argv += ["--warmup", "2", "--json", str(out_file)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "wait p99 s" in printed and "p2c" in printed and "seed" in printed
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [line["config"]["policy"] for line in lines] == ["seed", "p2c"]
    assert {"queue_delay_p99_s", "throughput_rps", "utilisation_cv"} <= set(lines[0])

    assert (
        main(
            [
                "simulate",
                "--depth",
                "2",
                "--fanout",
                "3",
                "--duration",
                "4",
                "--warmup",
                "1",
                "--json",
                "-",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    record = json.loads(captured.out.strip())
    assert record["config"]["nodes"] == 12
    assert "wait p99 s" in captured.err


def test_cli_refuses_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--policy", "fastest"]) == 1
    assert "--policy must be one of" in capsys.readouterr().err
    assert main(["simulate", "--fanout", "two"]) == 1
    assert "comma list" in capsys.readouterr().err
    assert main(["simulate", "--warmup", "50"]) == 1
