"""How a serving node counts what it holds while a burst of requests comes in, and what its
engine holds on its own (no network, no model: stand-in engines)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from llmtree.config import Settings
from llmtree.errors import Overloaded
from llmtree.protocol import GenerateRequest, SamplingParams
from llmtree.tree.node import TreeNode

SLOTS = 24


class SlowEngine:
    """Counts a request as waiting as soon as it has it, then takes a while to return."""

    slots = SLOTS
    model_name = "test"
    num_running = 0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ids: list[str] = []

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return len(self.ids)

    def submit(self, request: GenerateRequest) -> int:
        with self._lock:
            self.ids.append(request.request_id)
        time.sleep(0.05)  # the admission log, the wake-up of the loop thread...
        return 1

    def cancel(self, request_id: str) -> bool:
        return False


class OneChild:
    """A directory that knows one child, at an address nothing listens on."""

    def lookup(self, name: str) -> Any:
        return SimpleNamespace(uri="PYRO:llmtree.node@127.0.0.1:9")

    def children(self, name: str) -> list[Any]:
        return []


def test_a_burst_within_the_slots_is_all_served_here() -> None:
    engine = SlowEngine()
    node = TreeNode("w", Settings(), OneChild(), engine=engine, parent="root")
    try:
        node.attach_child("child")
        placed: list[str] = []
        sampling = SamplingParams(max_tokens=8)
        requests = [
            GenerateRequest(f"r{i}", [{"role": "user", "content": "hi"}], sampling).to_wire()
            for i in range(20)
        ]
        threads = [
            threading.Thread(target=lambda r=r: placed.append(node.submit(r))) for r in requests
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        # 20 of 24 slots: none is passed on to the child (which would drop it: nobody listens)
        assert placed == ["w"] * 20
        assert node.children_now() == ["child"]
        assert sorted(engine.ids) == sorted(f"r{i}" for i in range(20))
        assert node.held() == 20
    finally:
        node.close()


class FullEngine:
    """Its one slot is taken by work the node never handed it; no queue."""

    slots = 1
    model_name = "test"
    num_running = 1
    num_waiting = 0

    def submit(self, request: GenerateRequest) -> int:
        raise AssertionError("a full engine was handed a request")

    def cancel(self, request_id: str) -> bool:
        return False


def test_slots_the_engine_fills_itself_count_as_taken() -> None:
    node = TreeNode("w", Settings(max_queue=0), OneChild(), engine=FullEngine(), parent="root")
    try:
        node.attach_child("child")
        request = GenerateRequest("r", [{"role": "user", "content": "hi"}], SamplingParams())
        # the engine is full: the request goes to the child (nobody listens there, so the node
        # drops it and reports no capacity), never to the engine
        with pytest.raises(Overloaded):
            node.submit(request.to_wire())
        assert node.children_now() == []
        assert node.load_report()["held"] == 1
    finally:
        node.close()
