"""50 long requests abandoned by their clients after 0.5 s free every slot across the tree.

Half are abandoned the way the gateway does on a client disconnect or the stop button
(``root.cancel``), half by their sink vanishing (the gateway itself gone): the root then cancels
them when it cannot deliver their events. Tree: the package's ``chain`` (root -> w1 -> w2).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from .harness import TreeHarness
from cluster import REPO, wait_for

pytestmark = [pytest.mark.ldap, pytest.mark.model, pytest.mark.slow]

SINK = (
    "import sys; sys.path.insert(0, 'tests'); from cluster import CollectorServer;"
    "s = CollectorServer(); print(s.uri, flush=True); s.thread.join()"
)


def test_abandoned_requests_free_their_slots(
    chain: TreeHarness, figure: Callable[[str], None]
) -> None:
    tree = chain
    gone_sink = subprocess.Popen(
        [sys.executable, "-c", SINK], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert gone_sink.stdout is not None
    gone_uri = gone_sink.stdout.readline().strip()
    requests = []
    for i in range(50):
        request = tree.request(f"gone-{i}", "Count from one to one thousand.", 1500)
        request["sampling"]["ignore_eos"] = True
        if i % 2:
            request["sink"] = gone_uri
        requests.append(request)
    placed = tree.submit_all(requests)
    assert set(placed) <= {"w1", "w2"} and "w2" in placed
    time.sleep(0.5)
    running = sum(tree.status(n)["running"] + tree.status(n)["queued"] for n in ("w1", "w2"))
    abandoned = time.monotonic()
    gone_sink.send_signal(signal.SIGKILL)  # the gateway of half of them vanishes
    gone_sink.wait()
    for request in requests[::2]:
        tree.peers.call(tree.root_uri, "cancel", request["request_id"])

    def all_free() -> bool:
        return all(
            tree.status(n)["running"] == 0 and tree.status(n)["queued"] == 0 for n in ("w1", "w2")
        )

    wait_for(all_free, 30, "every slot to be free")
    freed_s = time.monotonic() - abandoned
    started = time.monotonic()
    fresh = tree.request("after-abandon", "Say hello.", 16)
    tree.submit(fresh)
    tree.wait_finished(["after-abandon"], 10)
    answered_s = time.monotonic() - started
    assert tree.finish("after-abandon") in ("stop", "length")
    for request in requests[::2]:
        assert tree.finish(str(request["request_id"])) == "cancelled"
    wait_for(lambda: tree.status("root")["in_flight"] == 0, 10, "the root's table to empty")
    status = {n: tree.status(n) for n in ("w1", "w2")}
    assert all(s["running"] == 0 and s["queued"] == 0 for s in status.values()), status
    figure(
        f"50 long requests ({running} running or queued on w1+w2) abandoned after 0.5 s: "
        f"every node at 0 running {freed_s:.2f} s later; a new request answered in "
        f"{answered_s:.2f} s; root in_flight 0"
    )
    assert answered_s < 5
