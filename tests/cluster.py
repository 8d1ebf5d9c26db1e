"""Test helpers: real llmtree processes on loopback, and a Pyro5 collector of token events."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import Pyro5.api

from llmtree.config import Settings
from llmtree.protocol import unpack_events

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def model_cache() -> str:
    return os.environ.get("LLMTREE_MODEL_CACHE") or str(REPO / "var" / "models")


def llmtree_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for a child llmtree process that uses the test's directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTREE_")}
    env.update(
        LLMTREE_VAR_DIR=str(settings.var_dir),
        LLMTREE_LDAP_URL=settings.ldap_url,
        LLMTREE_LDAP_BASE=settings.ldap_base,
        LLMTREE_LDAP_DIR=str(settings.ldap_data_dir),
        LLMTREE_LDAP_PASSWORD=settings.service_password(),
        LLMTREE_NODE_TTL_S=str(settings.node_ttl_s),
        LLMTREE_HEARTBEAT_S="0.5",
        LLMTREE_MODEL_CACHE=model_cache(),
        LLMTREE_DEFAULT_TIER="admin",  # no per-user limits unless a test sets tiers itself
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def wait_for(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll ``check`` until it returns something truthy (readiness by probing, not sleeping)."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except AssertionError:
            raise
        except Exception as error:  # noqa: BLE001 - keep polling until the deadline
            last = error
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


class Proc:
    """One llmtree process with its output kept in a log file."""

    def __init__(
        self,
        name: str,
        args: list[str],
        env: dict[str, str],
        log_dir: Path,
        prefix: list[str] | None = None,
        log_name: str | None = None,
    ) -> None:
        """``prefix`` runs the command through another (e.g. ``ip netns exec NS``)."""
        self.name = name
        self.log = log_dir / f"{log_name or name}.out"
        self._file = self.log.open("wb")
        self.popen = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "llmtree", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._file,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._file.close()
        return self.popen.returncode


@Pyro5.api.behavior(instance_mode="single")
class Collector:
    """Receives token events as the gateway's sink would, and lets a test wait on them."""

    def __init__(self) -> None:
        self.events: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._cond = threading.Condition()

    @Pyro5.api.expose
    def deliver(self, packed: str | list[dict[str, Any]]) -> int:
        events = unpack_events(packed)
        with self._cond:
            for event in events:
                self.events[event["request_id"]].append(event)
            self._cond.notify_all()
        return len(events)

    def wait(self, check: Callable[[], bool], timeout_s: float) -> None:
        with self._cond:
            if not self._cond.wait_for(check, timeout_s):
                raise AssertionError(f"events did not arrive in {timeout_s} s: {dict(self.events)}")

    def finish(self, request_id: str) -> str | None:
        for event in self.events.get(request_id, []):
            if event["finish_reason"] is not None:
                return str(event["finish_reason"])
        return None

    def text(self, request_id: str) -> str:
        ordered = sorted(self.events.get(request_id, []), key=lambda e: e["seq"])
        return "".join(e["text"] for e in ordered)


class CollectorServer:
    def __init__(self) -> None:
        self.collector = Collector()
        self.daemon = Pyro5.api.Daemon(host="127.0.0.1", port=0)
        self.uri = str(self.daemon.register(self.collector, "llmtree.sink"))
        self.thread = threading.Thread(target=self.daemon.requestLoop, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.daemon.shutdown()
        self.thread.join(5)
