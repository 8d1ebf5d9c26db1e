"""The directory (slapd) stops for 10 s under load: the running tree keeps serving from the
references it holds, and when slapd returns every node is back in the directory by itself.

This test runs its own slapd (TTL 3 s), root and two workers, so stopping slapd touches nothing
else.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from llmtree.config import Settings
from llmtree.registry import Registry
from llmtree.slapd import PrivateSlapd

from .harness import TreeHarness
from cluster import free_port, wait_for

pytestmark = [pytest.mark.ldap, pytest.mark.model, pytest.mark.slow]

TTL_S = 3
OUTAGE_S = 10


class Load:
    """Keeps up to ``concurrency`` short requests in flight, at most ``limit`` in all."""

    def __init__(self, tree: TreeHarness, concurrency: int = 6, limit: int = 400) -> None:
        self.tree = tree
        self.concurrency = concurrency
        self.limit = limit
        self.ids: list[str] = []
        self.submit_errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _in_flight(self) -> int:
        return sum(1 for rid in self.ids if not self.tree.finish(rid))

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.ids) < self.limit:
            if self._in_flight() >= self.concurrency:
                time.sleep(0.05)
                continue
            rid = f"load-{len(self.ids)}"
            try:
                self.tree.submit(self.tree.request(rid, "Name three colours.", 24))
                self.ids.append(rid)
            except Exception as error:  # noqa: BLE001 - a failure is what the test counts
                self.submit_errors.append(f"{rid}: {type(error).__name__}: {error}")
                time.sleep(0.1)


@pytest.fixture
def own_slapd(tmp_path: Path) -> Iterator[tuple[Settings, PrivateSlapd]]:
    settings = Settings(
        var_dir=tmp_path,
        ldap_url=f"ldap://127.0.0.1:{free_port()}",
        ldap_password="",
        node_ttl_s=TTL_S,
        heartbeat_s=0.5,
    )
    server = PrivateSlapd(settings, nosync=True)
    server.init()
    server.popen()
    server.wait_ready()
    try:
        yield settings, server
    finally:
        server.stop()


def directory_current(settings: Settings, since: datetime, names: set[str]) -> bool:
    registry = Registry(settings)
    try:
        registry.connect(writer=False)
        fresh = {
            r.name
            for r in registry.list_nodes()
            if r.heartbeat is not None and r.heartbeat >= since.replace(microsecond=0)
        }
        return names <= fresh
    finally:
        registry.close()


def test_directory_outage_under_load(
    own_slapd: tuple[Settings, PrivateSlapd],
    tmp_path: Path,
    figure: Callable[[str], None],
) -> None:
    settings, slapd = own_slapd
    tree = TreeHarness(settings, tmp_path, slots=8)
    load = Load(tree)
    try:
        tree.start_root()
        for name in ("w1", "w2"):
            tree.start_worker(name, "root")
        for name in ("w1", "w2"):
            tree.wait_ready(name)
        tree.wait_children("root", ["w1", "w2"])
        load.start()
        wait_for(lambda: len(load.ids) >= 6, 60, "load to start")
        assert slapd.stop()
        stopped = time.monotonic()
        before = len(load.ids)
        time.sleep(OUTAGE_S)
        during = len(load.ids) - before
        slapd.popen()
        slapd.wait_ready()
        back = datetime.now(UTC)
        returned = time.monotonic()
        wait_for(
            lambda: directory_current(settings, back, {"root", "w1", "w2"}),
            30,
            "every node back in the directory",
        )
        current_s = time.monotonic() - returned
        time.sleep(1)
        load.stop()
        tree.wait_finished(load.ids, 60)
        failed = [rid for rid in load.ids if tree.finish(rid) not in ("stop", "length")]
        assert not load.submit_errors, load.submit_errors[:5]
        assert not failed, [tree.events(rid)[-1] for rid in failed[:3]]
        assert tree.status("root")["children"] == ["w1", "w2"]
        for name in ("root", "w1", "w2"):
            assert tree.procs[name].alive()
            log = tree.procs[name].output()
            assert log.count("directory unreachable") == 1, name  # logged once, not per beat
        figure(
            f"slapd stopped {returned - stopped:.1f} s "
            f"under load: {len(load.ids)} requests, {during} of them submitted during the "
            f"outage, 0 failed; directory current again {current_s:.1f} s after slapd "
            f"returned (TTL {TTL_S} s)"
        )
        assert current_s <= TTL_S
    finally:
        load.stop()
        tree.close()
