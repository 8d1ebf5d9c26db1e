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
