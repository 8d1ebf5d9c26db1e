"""The rule, with real node processes on loopback, a real slapd and the real model.

Tree: root -> {a, b}, a -> {c}; one slot per node, one queue place. Long requests placed in
order land on a, b, c, then wait in b's queue (the issue's example); then c's and a's queues
fill and the root refuses the seventh with Overloaded.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from llmtree.config import Settings
from llmtree.errors import Overloaded, UnknownNode
from llmtree.registry import Registry
from llmtree.tree.client import Peers, node_uri

from cluster import CollectorServer, Proc, free_port, llmtree_env, wait_for

pytestmark = [pytest.mark.ldap, pytest.mark.model, pytest.mark.slow]


class Tree:
    def __init__(self, settings: Settings, procs: dict[str, Proc], root_uri: str) -> None:
        self.settings = settings
        self.procs = procs
        self.root_uri = root_uri
        self.peers = Peers(10.0)
        self.registry = Registry(settings)
        self.registry.connect(writer=False)

    def uri(self, name: str) -> str:
        return str(self.registry.lookup(name).uri)

    def status(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.peers.call(self.uri(name), "status")
        return result


@pytest.fixture(scope="module")
def tree(slapd_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tree]:
    logs = tmp_path_factory.mktemp("tree-logs")
    env = llmtree_env(slapd_settings, LLMTREE_THREADS="1", LLMTREE_MAX_QUEUE="1")
    port = free_port()
    procs: dict[str, Proc] = {}
    registry = Registry(slapd_settings)
    registry.connect(writer=False)
    peers = Peers(5.0)

    def start(name: str, *args: str) -> None:
        procs[name] = Proc(name, ["node", "--name", name, *args], env, logs)

    def ready(name: str) -> None:
        def check() -> bool:
            assert procs[name].alive(), procs[name].output()[-3000:]
            return bool(peers.call(registry.lookup(name).uri, "ping") == "pong")

        wait_for(check, 300, f"node {name}")

    try:
        start("root", "--root", "--port", str(port))
        ready("root")
        for name in ("a", "b"):
            start(name, "--parent", "root", "--slots", "1")
        ready("a")
        start("c", "--parent", "a", "--slots", "1")  # its parent must be in the directory
        for name in ("b", "c"):
            ready(name)
        root_uri = node_uri("127.0.0.1", port)
        wait_for(lambda: peers.call(root_uri, "status")["children"] == ["a", "b"], 30, "root")
        wait_for(
            lambda: peers.call(registry.lookup("a").uri, "status")["children"] == ["c"], 30, "a"
        )
        yield Tree(slapd_settings, procs, root_uri)
    finally:
        for proc in reversed(list(procs.values())):
            proc.stop()
        registry.close()


@pytest.fixture
def sink() -> Iterator[CollectorServer]:
    server = CollectorServer()
    yield server
    server.close()


def long_request(sink_uri: str) -> dict[str, Any]:
    return {
        "request_id": f"t-{uuid.uuid4().hex[:8]}",
        "messages": [{"role": "user", "content": "Count from one to one thousand."}],
        "sampling": {"max_tokens": 1500, "ignore_eos": True, "temperature": 0},
        "sink": sink_uri,
    }


def test_placement_follows_the_rule(tree: Tree, sink: CollectorServer) -> None:
    requests = [long_request(sink.uri) for _ in range(7)]
    placed = [tree.peers.call(tree.root_uri, "submit", r) for r in requests[:4]]
    assert placed == ["a", "b", "c", "b"]
    wait_for(lambda: tree.status("b")["running"] == 1 and tree.status("b")["queued"] == 1, 30, "b")
    for name in ("a", "c"):
        status = tree.status(name)
        assert (status["running"], status["queued"]) == (1, 0), status

    ids = [r["request_id"] for r in requests]
    collector = sink.collector
    collector.wait(lambda: all(collector.text(i) for i in ids[:3]), 60)
    assert collector.text(ids[3]) == ""  # queued: nothing generated yet
    first = sorted(collector.events[ids[0]], key=lambda e: e["seq"])
    assert [e["seq"] for e in first] == list(range(len(first)))
    assert {e["node"] for e in first} == {"a"}

    # the rest of the queues fill up, then the root refuses
    placed += [tree.peers.call(tree.root_uri, "submit", r) for r in requests[4:6]]
    assert placed[4:] == ["c", "a"]
    with pytest.raises(Overloaded):
        tree.peers.call(tree.root_uri, "submit", requests[6])

    # cancel: every request ends with exactly one "cancelled" event and the slots free up
    for rid in ids[:6]:
        tree.peers.call(tree.root_uri, "cancel", rid)
    collector.wait(lambda: all(collector.finish(i) == "cancelled" for i in ids[:6]), 30)
    for rid in ids[:6]:
        assert sum(e["finish_reason"] is not None for e in collector.events[rid]) == 1
    for name in ("a", "b", "c"):
        wait_for(lambda n=name: tree.status(n)["running"] + tree.status(n)["queued"] == 0, 30, name)
    assert tree.status("root")["in_flight"] == 0


def test_status_reports_the_node(tree: Tree) -> None:
    status = tree.status("a")
    assert status["name"] == "a" and status["parent"] == "root"
    assert status["children"] == ["c"] and status["slots"] == 1
    assert {"running", "queued", "served", "uptime_s"} <= set(status)


def test_move_a_node_and_kill_it(tree: Tree) -> None:
    result = tree.peers.call(tree.uri("c"), "set_parent", "b")
    assert result == {"parent": "b", "previous": "a"}
    wait_for(lambda: tree.status("b")["children"] == ["c"], 10, "c under b")
    wait_for(lambda: tree.status("a")["children"] == [], 10, "a without c")
    assert tree.registry.lookup("c").parent == "b"

    tree.procs["c"].stop(signal.SIGKILL)

    def gone() -> bool:
        try:
            tree.registry.lookup("c")
        except UnknownNode:
            return True
        return False

    wait_for(gone, 3 * tree.settings.node_ttl_s + 5, "c's entry to expire")
    wait_for(lambda: tree.status("b")["children"] == [], 10, "b to drop c")
