"""A node's queue: higher priority is admitted first, and a request that waits longer than
``queue_timeout_s`` ends with an error event whose code is ``queue_timeout``.

Tree: root -> w (one slot, queue timeout 3 s), real model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llmtree.config import Settings

from .harness import TreeHarness
from cluster import wait_for

pytestmark = [pytest.mark.ldap, pytest.mark.model, pytest.mark.slow]


@pytest.fixture
def one_slot(slapd_settings: Settings, tmp_path: Path) -> Iterator[TreeHarness]:
    # its own root name: the package's chain tree (root "root") may still be running
    tree = TreeHarness(
        slapd_settings, tmp_path, slots=1, root_name="qroot", LLMTREE_QUEUE_TIMEOUT_S="3"
    )
    try:
        tree.start_root()
        tree.start_worker("wq", "root")
        tree.wait_ready("wq")
        tree.wait_children("root", ["wq"])
        yield tree
    finally:
        tree.close()


def long_request(tree: TreeHarness, rid: str) -> dict[str, object]:
    request = tree.request(rid, "Count from one to one thousand.", 1500)
    request["sampling"]["ignore_eos"] = True
    return request


def test_priority_and_queue_timeout(one_slot: TreeHarness, figure: Callable[[str], None]) -> None:
    tree = one_slot
    tree.submit(long_request(tree, "busy"))
    wait_for(lambda: tree.events("busy"), 30, "busy to run")
    low = tree.request("low", "Say hi.", 4)
    high = tree.request("high", "Say hi.", 4)
    high["priority"] = 5
    assert tree.submit(low) == "wq" and tree.submit(high) == "wq"
    assert tree.status("wq")["queued"] == 2
    tree.peers.call(tree.root_uri, "cancel", "busy")
    # one slot: the request admitted first runs alone; the other shows nothing meanwhile
    wait_for(lambda: tree.events("high") or tree.events("low"), 30, "the next admission")
    assert tree.events("high") and not tree.events("low")
    tree.wait_finished(["low", "high"], 30)
    assert tree.finish("low") in ("stop", "length") and tree.finish("high") in ("stop", "length")
    served = tree.status("wq")["served"]

    tree.submit(long_request(tree, "busy2"))
    wait_for(lambda: tree.events("busy2"), 30, "busy2 to run")
    started = time.monotonic()
    tree.submit(tree.request("waits", "Say hi.", 4))
    tree.wait_finished(["waits"], 15)
    waited_s = time.monotonic() - started
    last = tree.events("waits")[-1]
    assert last["finish_reason"] == "error" and last.get("code") == "queue_timeout", last
    assert "queue_timeout" in last["error"]
    tree.peers.call(tree.root_uri, "cancel", "busy2")
    tree.wait_finished(["busy2"], 15)
    figure(
        "a priority 5 request admitted before an earlier priority 0 one; "
        f"a request queued behind a busy slot ended with code queue_timeout after "
        f"{waited_s:.1f} s (queue_timeout_s 3); served {served}"
    )
