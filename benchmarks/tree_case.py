"""The tree-overhead case: one serving worker under 1, 2 or 3 levels of forwarding.

For each depth D a fresh chain is started on loopback, each node its own process:
``root -> fwd-1 -> ... -> fwd-(D-1) -> worker``, then the gateway. The ``fwd-*`` nodes are
``forwarder_node.py`` (real nodes whose single slot is always busy, so they always forward).
Before measuring, every node's children are checked to form exactly that chain, and a probe
request must come back served by ``worker``. The private slapd is started once for all depths.

Two measurements per depth: the HTTP load through the gateway (TTFT and the rest, as in the
other cases), and the placement time alone: ``root.submit`` called directly over Pyro5 with a
one-token request, timed until the serving node's name comes back. Events go from the serving
worker straight to the root at any depth, so placement is the only part of TTFT that depends on
the depth, and timing it alone takes the model's prefill (and its noise) out of the difference.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import Pyro5.api
from common import BENCH_DIR
from procs import Proc, http_ok, wait_for

from llmtree.bench.loadgen import Level
from llmtree.bench.stats import Dist, LevelSummary
from llmtree.config import Settings
from llmtree.gateway.keys_cli import ensure_dev_key, ensure_jwt_secret
from llmtree.protocol import GenerateRequest, SamplingParams, unpack_events
from llmtree.registry import Registry
from llmtree.tree.client import Peers

PY = sys.executable
WARMUP_PROBES = 10
Drive = Callable[[str, list[Level], int | None, str], list[LevelSummary]]


def run_tree(
    depths: list[int],
    todo: list[Level],
    work: Path,
    env: dict[str, str],
    drive: Drive,
    num_probes: int = 200,
) -> list[tuple[int, LevelSummary]]:
    """``(depth, summary)`` for each depth; raises when a chain cannot be built."""
    settings = Settings(var_dir=Path(env["LLMTREE_VAR_DIR"]), ldap_url=env["LLMTREE_LDAP_URL"])
    ldap = [PY, "-m", "llmtree", "ldap"]
    started = subprocess.run([*ldap, "start"], env=env, capture_output=True, text=True, timeout=60)
    if started.returncode != 0:
        raise RuntimeError(f"slapd did not start: {started.stderr.strip()[-500:]}")
    results: list[tuple[int, LevelSummary]] = []
    try:
        for depth in depths:
            chain = Chain(depth, env, settings, work / "logs")
            results.append((depth, chain.measure(todo, drive, num_probes)))
    finally:
        subprocess.run([*ldap, "stop"], env=env, capture_output=True, timeout=60)
    return results


class Chain:
    """The processes of one depth, started in order and stopped newest first."""

    def __init__(self, depth: int, env: dict[str, str], settings: Settings, logs: Path) -> None:
        self.depth, self.env, self.settings, self.logs = depth, env, settings, logs
        self.procs: list[Proc] = []
        self.names = ["root", *(f"fwd-{i}" for i in range(1, depth)), "worker"]
        self.peers = Peers(2.0)
        self.registry = Registry(settings)

    def measure(self, todo: list[Level], drive: Drive, num_probes: int) -> LevelSummary:
        self.registry.connect(writer=False)
        try:
            self._start_all()
            url = f"http://127.0.0.1:{self.env['LLMTREE_GATEWAY_PORT']}"
            wait_for(lambda: http_ok(url + "/readyz"), "the gateway", self.procs, 120)
            wait_for(self._is_chain, f"the chain {' -> '.join(self.names)}", self.procs, 60)
            wait_for(lambda: self._probe(url), "a probe served by worker", self.procs, 60)
            summary = drive(url, todo, self.procs[-2].pid, f"(tree {self.depth})")[0]
            placement = self._placement(num_probes)
            summary.extra["placement_ms"] = asdict(placement)
            summary.extra["placement_warmup"] = WARMUP_PROBES
            return summary
        finally:
            for proc in reversed(self.procs):
                proc.stop()
            self.registry.close()
            self.peers.close()

    def _start_all(self) -> None:
        node = [PY, "-m", "llmtree", "node"]
        self._start("root", [*node, "--name", "root", "--root"], 120)
        for parent, name in zip(self.names, self.names[1:-1], strict=False):
            argv = [PY, str(BENCH_DIR / "forwarder_node.py"), "--name", name, "--parent", parent]
            self._start(name, argv, 120)
        self._start("worker", [*node, "--name", "worker", "--parent", self.names[-2]], 900)
        self.env["LLMTREE_JWT_SECRET"] = ensure_jwt_secret(self.settings)
        os.environ["LLMTREE_API_KEY"] = ensure_dev_key(self.settings)  # read by the driver
        self.procs.append(self._spawn("gateway", [PY, "-m", "llmtree", "gateway"]))

    def _spawn(self, name: str, argv: list[str]) -> Proc:
        return Proc(f"tree{self.depth}-{name}", argv, self.env, self.logs)

    def _start(self, name: str, argv: list[str], timeout_s: float) -> None:
        self.procs.append(self._spawn(name, argv))
        wait_for(lambda: self._call(name, "ping") == "pong", f"node {name}", self.procs, timeout_s)

    def _call(self, name: str, method: str) -> Any:
        return self.peers.call(self.registry.lookup(name).uri, method)

    def _is_chain(self) -> bool:
        below = [*self.names[1:], None]
        for name, child in zip(self.names, below, strict=True):
            children = self._call(name, "status")["children"]
            if children != ([child] if child else []):
                return False
        return True

    def _probe(self, url: str) -> bool:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        key = {"Authorization": f"Bearer {os.environ['LLMTREE_API_KEY']}"}
        answer = httpx.post(
            url + "/v1/chat/completions", json=body, headers=key, timeout=60, trust_env=False
        )
        return answer.status_code == 200 and answer.json().get("node", "worker") == "worker"

    def _placement(self, count: int) -> Dist:
        """``root.submit`` round trips (ms) for one-token requests, one at a time.

        The first ``WARMUP_PROBES`` are not timed: they open each hop's connection and start
        its Pyro5 worker thread, which a running tree has done long before."""
        sink = ProbeSink()
        daemon = Pyro5.api.Daemon(host="127.0.0.1", port=0)
        uri = str(daemon.register(sink, "llmtree.bench.sink"))
        thread = threading.Thread(target=daemon.requestLoop, name="probe-sink", daemon=True)
        thread.start()
        root = self.registry.lookup("root").uri
        times = []
        try:
            for index in range(-WARMUP_PROBES, count):
                rid = f"placement-{self.depth}-{index}"
                request = GenerateRequest(
                    rid, [{"role": "user", "content": "hi"}], SamplingParams(max_tokens=1), uri
                )
                start = time.perf_counter()
                served_by = self.peers.call(root, "submit", request.pack())
                if index >= 0:
                    times.append((time.perf_counter() - start) * 1000)
                if served_by != "worker":
                    raise RuntimeError(f"placement probe served by {served_by}, not worker")
                sink.wait(rid, 30.0)
        finally:
            daemon.shutdown()
            thread.join(5)
        return Dist.of(times)


class ProbeSink:
    """Receives the probes' events from the root (as the gateway's sink does)."""

    def __init__(self) -> None:
        self._done: set[str] = set()
        self._cond = threading.Condition()

    @Pyro5.api.expose
    def deliver(self, packed: str | list[dict[str, Any]]) -> int:
        events = unpack_events(packed)
        with self._cond:
            for event in events:
                if isinstance(event, dict) and event.get("finish_reason") is not None:
                    self._done.add(str(event.get("request_id")))
            self._cond.notify_all()
        return len(events)

    def wait(self, request_id: str, timeout_s: float) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: request_id in self._done, timeout_s):
                raise RuntimeError(f"no terminal event for {request_id} in {timeout_s:g} s")
