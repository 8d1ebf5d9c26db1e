"""LazyEngine's bookkeeping with a stand-in engine (no model): pending, cancel, bounds, unload.

The real model's load and release (VmRSS) is in tests/test_elastic.py.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from llmtree.config import Settings
from llmtree.engine import lazy
from llmtree.errors import InvalidRequest, Overloaded
from llmtree.protocol import GenerateRequest


class StandIn:
    """Engine's face: starts after ``gate`` opens; refuses ids starting with 'bad'."""

    gate = threading.Event()
    made: list[StandIn] = []

    def __init__(self, settings: Settings, node_name: str, on_events: Any) -> None:
        self.submitted: list[str] = []
        self.stopped = False
        self.observer: Any = None
        StandIn.made.append(self)

    def start(self, progress: Any = None) -> None:
        assert StandIn.gate.wait(5)

    def stop(self) -> None:
        self.stopped = True

    def submit(self, request: GenerateRequest) -> int:
        if request.request_id.startswith("bad"):
            raise InvalidRequest("refused by the engine")
        self.submitted.append(request.request_id)
        return 1

    def cancel(self, request_id: str) -> bool:
        return False

    num_running = 0
    num_waiting = 0
    model_name = "stand-in"


def req(rid: str) -> GenerateRequest:
    return GenerateRequest.from_wire(
        {"request_id": rid, "messages": [{"role": "user", "content": "hi"}], "sampling": {}}
    )


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    monkeypatch.setattr(lazy, "Engine", StandIn)
    StandIn.gate.clear()
    StandIn.made.clear()
    return []


def test_requests_wait_for_the_load_then_run(events: list[dict[str, Any]]) -> None:
    engine = lazy.LazyEngine(Settings(slots=1, max_queue=2), "n", events.extend)
    engine.start()
    assert not engine.loaded
    for rid in ("r1", "bad", "r2"):
        assert engine.submit(req(rid)) == 0  # returns at once; the load runs in a thread
    assert engine.num_waiting == 3
    with pytest.raises(Overloaded):
        engine.submit(req("r4"))  # slots + queue pending already
    assert engine.cancel("r2") is True
    assert [(e["request_id"], e["finish_reason"]) for e in events] == [("r2", "cancelled")]
    StandIn.gate.set()
    deadline = time.monotonic() + 5
    while not engine.loaded and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.loaded and len(StandIn.made) == 1 and engine.loads == 1
    assert StandIn.made[0].submitted == ["r1"]
    assert events[-1]["request_id"] == "bad" and events[-1]["finish_reason"] == "error"
    assert events[-1]["error"] == "refused by the engine"
    engine.submit(req("r5"))
    assert StandIn.made[0].submitted == ["r1", "r5"]
    engine.stop()
    assert StandIn.made[0].stopped


def test_idle_engine_is_released_and_loads_again(events: list[dict[str, Any]]) -> None:
    StandIn.gate.set()
    engine = lazy.LazyEngine(Settings(idle_unload_s=0.2), "n", events.extend)
    engine.start()
    engine.submit(req("r1"))
    deadline = time.monotonic() + 5
    while not engine.loaded and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.loaded
    while engine.loaded and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.loaded and StandIn.made[0].stopped  # released after 0.2 s idle
    engine.submit(req("r2"))
    while not engine.loaded and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(StandIn.made) == 2 and StandIn.made[1].submitted == ["r2"]
    engine.stop()
