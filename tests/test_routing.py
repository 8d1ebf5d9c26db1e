"""The placement rule as a pure function (no network)."""

from __future__ import annotations

from llmtree.tree.routing import Plan, Snapshot, plan


def snap(**kw: object) -> Snapshot:
    base: dict[str, object] = {
        "is_root": False,
        "num_running": 0,
        "num_waiting": 0,
        "slots": 1,
        "max_queue": 2,
        "children": (),
        "next_child": 0,
    }
    base.update(kw)
    return Snapshot(**base)  # type: ignore[arg-type]


def test_idle_node_serves() -> None:
    assert plan(snap()) == Plan(serve=True, forward_to=(), queue=False)


def test_root_never_serves_and_never_queues() -> None:
    decision = plan(snap(is_root=True, slots=0, children=("a", "b")))
    assert not decision.serve and not decision.queue
    assert decision.forward_to == ("a", "b")


def test_busy_node_forwards_round_robin_from_next_child() -> None:
    assert plan(snap(num_running=1, children=("a", "b", "c"), next_child=1)).forward_to == (
        "b",
        "c",
        "a",
    )
    assert plan(snap(num_running=1, children=("a", "b"), next_child=5)).forward_to == ("b", "a")


def test_busy_leaf_queues_until_the_queue_is_full() -> None:
    assert plan(snap(num_running=1, num_waiting=0)) == Plan(False, (), True)
    assert plan(snap(num_running=1, num_waiting=1)).queue
    assert not plan(snap(num_running=1, num_waiting=2)).queue


def test_waiting_requests_count_against_free_slots() -> None:
    assert not plan(snap(slots=2, num_running=1, num_waiting=1)).serve
    assert plan(snap(slots=2, num_running=1, num_waiting=0)).serve


# -- the load-aware policies (``--policy``) --------------------------------------------------


def test_seed_is_the_default_and_ignores_loads() -> None:
    busy = snap(num_running=1, children=("a", "b"), loads=(0.9, 0.0), draws=(0, 0))
    assert plan(busy).forward_to == ("a", "b")


def test_weighted_rr_follows_subtree_sizes() -> None:
    """Subtrees of 3 and 1 nodes: 'a' gets 3 of every 4 requests, spread smoothly."""
    credits: tuple[int, ...] = ()
    firsts = []
    for _ in range(8):
        decision = plan(
            snap(
                num_running=1,
                children=("a", "b"),
                policy="weighted-rr",
                sizes=(3, 1),
                credits=credits,
            )
        )
        credits = decision.credits
        firsts.append(decision.forward_to[0])
        assert set(decision.forward_to) == {"a", "b"}  # the other is still tried after
    assert firsts == ["a", "a", "b", "a"] * 2


def test_weighted_rr_equal_sizes_is_round_robin() -> None:
    credits: tuple[int, ...] = ()
    firsts = []
    for _ in range(6):
        decision = plan(
            snap(
                num_running=1,
                children=("a", "b", "c"),
                policy="weighted-rr",
                sizes=(1, 1, 1),
                credits=credits,
            )
        )
        credits = decision.credits
        firsts.append(decision.forward_to[0])
    assert firsts == ["a", "b", "c"] * 2


def test_p2c_tries_the_less_loaded_of_the_two_drawn_first() -> None:
    base = {"num_running": 1, "children": ("a", "b", "c"), "policy": "p2c"}
    # draws (0, 1): children 0 and 2 (the second draw skips the first's index)
    decision = plan(snap(**base, loads=(0.8, 0.0, 0.3), draws=(0, 1)))
    assert decision.forward_to[0] == "c"
    assert set(decision.forward_to) == {"a", "b", "c"}
    assert plan(snap(**base, loads=(0.1, 0.0, 0.3), draws=(0, 1))).forward_to[0] == "a"
    # a tie keeps the first drawn; a child with no report counts as idle
    assert plan(snap(**base, loads=(0.5, 0.5, 0.5), draws=(2, 0))).forward_to[0] == "c"
    assert plan(snap(**base, loads=(0.5,), draws=(0, 0))).forward_to[0] == "b"


def test_policies_keep_serve_and_queue() -> None:
    for policy in ("weighted-rr", "p2c"):
        assert plan(snap(policy=policy, children=("a",))).serve
        decision = plan(snap(policy=policy, num_running=1, children=("a",)))
        assert decision.forward_to == ("a",) and decision.queue
        assert not plan(snap(policy=policy, is_root=True, slots=0, children=())).forward_to


def test_child_loads_reports_sends_and_subtree() -> None:
    from llmtree.tree.loads import ChildLoads, parse_report

    loads = ChildLoads(ttl_s=60)
    loads.report("a", parse_report({"size": 3, "held": 2, "capacity": 8}))
    loads.report("b", parse_report({"size": 1, "held": 0, "capacity": 4, "draining": True}))
    loads.sent("a")
    loads.sent("a")
    assert loads.loads(("a", "b", "new")) == (0.5, 0.0, 0.0)
    assert loads.sizes(("a", "b", "new")) == (3, 1, 1)
    assert loads.draining(("a", "b")) == {"b"}
    # a draining child's subtree is not counted in what this node reports up
    assert loads.subtree(("a", "b"), held=1, capacity=4, draining=False) == {
        "size": 4,
        "held": 3,
        "capacity": 12,
        "draining": False,
    }
    loads.report("a", parse_report({"size": 3, "held": 1, "capacity": 8}))  # sends reset
    assert loads.loads(("a",)) == (0.125,)


def test_bad_load_reports_are_refused() -> None:
    import pytest

    from llmtree.errors import InvalidRequest
    from llmtree.tree.loads import parse_report

    for bad in (
        [],
        {"size": 0, "held": 0, "capacity": 1},
        {"size": 1, "held": -1, "capacity": 1},
        {"size": 1, "held": 0, "capacity": "x"},
        {"size": True, "held": 0, "capacity": 1},
        {"size": 1, "held": 0, "capacity": 1, "draining": "yes"},
    ):
        with pytest.raises(InvalidRequest):
            parse_report(bad)
