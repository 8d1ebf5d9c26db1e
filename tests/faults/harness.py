"""A tree of real llmtree node processes for the fault tests, and greedy request helpers."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

from llmtree.config import Settings
from llmtree.registry import Registry
from llmtree.tree.client import Peers, node_uri

from cluster import CollectorServer, Proc, free_port, llmtree_env, wait_for

TOPICS = [
    "lighthouse keeper", "red fox", "clockmaker", "dragon", "sailor", "robot", "baker",
    "mountain goat", "astronaut", "painter", "wizard", "gardener", "detective", "whale",
    "knight", "owl", "inventor", "river", "desert city", "violin player",
]  # fmt: skip


class NodeProc(Proc):
    """One node process (optionally inside a network namespace); a restart gets a new log."""

    def __init__(
        self, name: str, args: list[str], env: dict[str, str], logs: Path, netns: str = ""
    ) -> None:
        super().__init__(
            name,
            ["node", "--name", name, *args],
            env,
            logs,
            prefix=["ip", "netns", "exec", netns] if netns else None,
            log_name=f"{name}-{time.monotonic_ns()}",
        )


class TreeHarness:
    """Starts and watches a root and workers; talks to them the way the gateway does."""

    def __init__(
        self,
        settings: Settings,
        logs: Path,
        host: str = "127.0.0.1",
        slots: int = 24,
        root_name: str = "root",
        **env: str,
    ) -> None:
        self.settings = settings
        self.logs = logs
        self.host = host
        self.slots = slots
        self.root_name = root_name
        """The root's registered name; ``"root"`` in this harness's calls means it."""
        self.env = llmtree_env(
            settings,
            LLMTREE_THREADS="1",
            LLMTREE_STALL_TIMEOUT_S="2",
            LLMTREE_CALL_TIMEOUT_S="2",
            LLMTREE_LOG_LEVEL="INFO",
            LLMTREE_BATCH_INVARIANT="1",  # greedy answers comparable across batches
            LLMTREE_ROOT_NAME=root_name,
            **env,
        )
        self.procs: dict[str, NodeProc] = {}
        self.peers = Peers(10.0)
        self.registry = Registry(settings)
        self.registry.connect(writer=False)
        self.root_port = free_port()
        self.root_uri = node_uri(host, self.root_port)
        self.sink = CollectorServer()

    # -- processes --------------------------------------------------------------------------
    def start_root(self) -> None:
        args = ["--root", "--host", self.host, "--port", str(self.root_port)]
        env = {**self.env, "LLMTREE_ROOT_HOST": self.host}
        self.procs["root"] = NodeProc(self.root_name, args, env, self.logs)
        self.wait_ready("root")

    def start_worker(self, name: str, parent: str, netns: str = "", host: str = "") -> None:
        parent = self.root_name if parent == "root" else parent
        args = ["--parent", parent, "--slots", str(self.slots), "--host", host or self.host]
        self.procs[name] = NodeProc(name, args, self.env, self.logs, netns=netns)

    def kill(self, name: str) -> None:
        self.procs[name].stop(signal.SIGKILL)

    def wait_ready(self, name: str, timeout_s: float = 300) -> None:
        proc = self.procs[name]

        def check() -> bool:
            assert proc.alive(), proc.output()[-3000:]
            status = self.status(name)
            return bool(status.get("uptime_s", 0) >= 0 and status["uri"])

        wait_for(check, timeout_s, f"node {name}")

    def wait_children(self, name: str, children: list[str], timeout_s: float = 30) -> None:
        wait_for(lambda: self.status(name)["children"] == children, timeout_s, f"{name} children")

    def status(self, name: str) -> dict[str, Any]:
        uri = self.root_uri if name == "root" else str(self.registry.lookup(name).uri)
        result: dict[str, Any] = self.peers.call(uri, "status")
        return result

    def close(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()
        self.sink.close()
        self.registry.close()

    # -- requests ---------------------------------------------------------------------------
    def request(
        self, request_id: str, content: str, max_tokens: int, **sampling: Any
    ) -> dict[str, Any]:
        return {
            "request_id": request_id,
            "messages": [{"role": "user", "content": content}],
            "sampling": {"max_tokens": max_tokens, "temperature": 0, **sampling},
            "sink": self.sink.uri,
        }

    def submit(self, request: dict[str, Any]) -> str:
        served_by: str = self.peers.call(self.root_uri, "submit", request)
        return served_by

    def submit_all(self, requests: list[dict[str, Any]]) -> list[str]:
        """Submit from several threads at once (as many gateway requests would)."""
        placed: list[str] = [""] * len(requests)
        errors: list[BaseException] = []

        def one(index: int) -> None:
            peers = Peers(10.0)
            try:
                placed[index] = peers.call(self.root_uri, "submit", requests[index])
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)
            finally:
                peers.close()

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors, errors
        return placed

    def events(self, request_id: str) -> list[dict[str, Any]]:
        with self.sink.collector._cond:
            return sorted(self.sink.collector.events.get(request_id, []), key=lambda e: e["seq"])

    def text(self, request_id: str) -> str:
        return "".join(e["text"] for e in self.events(request_id))

    def finish(self, request_id: str) -> str | None:
        return self.sink.collector.finish(request_id)

    def wait_finished(self, request_ids: list[str], timeout_s: float) -> None:
        collector = self.sink.collector
        collector.wait(lambda: all(collector.finish(i) for i in request_ids), timeout_s)


def check_stream(events: list[dict[str, Any]]) -> None:
    """One continuous stream: seq 0..n-1 once each, one terminal event, at the end."""
    assert [e["seq"] for e in events] == list(range(len(events))), [e["seq"] for e in events]
    assert [e["finish_reason"] is not None for e in events].count(True) == 1
    assert events[-1]["finish_reason"] is not None
