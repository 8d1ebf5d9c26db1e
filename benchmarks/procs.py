"""Child processes for the benchmark: start on loopback, wait by probing, stop by pid.

Every process the orchestrator starts is a ``Proc`` with its own log file; it is stopped with
SIGTERM (then SIGKILL after a grace period) by its own pid, never by name. Readiness is always a
probe (an HTTP answer, a Pyro5 ping) in a bounded loop that also fails fast, with the end of the
log, when the process died.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx


def free_port() -> int:
    """A loopback TCP port that nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Proc:
    """One child process with its output in ``log_path``."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM, wait, then SIGKILL this process alone."""
        if not self.is_alive():
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)

    def stop_with_children(self, grace_s: float = 20.0) -> None:
        """``stop``, then SIGKILL whichever of its children outlived it (a supervisor's)."""
        children = {pid: _cmdline(pid) for pid in child_pids(self.pid)} if self.is_alive() else {}
        self.stop(grace_s)
        for pid, cmdline in children.items():
            if cmdline and _cmdline(pid) == cmdline:  # still the same process, not a reused pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def wait_for(check: Callable[[], bool], what: str, procs: list[Proc], timeout_s: float) -> None:
    """Probe ``check`` until it is true; raise with the log tail if a process died or time ran out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.is_alive():
                raise RuntimeError(f"{proc.name} exited while waiting for {what}:\n{proc.tail()}")
        try:
            if check():
                return
        except Exception:  # a probe that fails is a "not yet"
            pass
        time.sleep(0.25)
    tails = "\n".join(f"--- {p.name}\n{p.tail()}" for p in procs)
    raise RuntimeError(f"timed out after {timeout_s:g} s waiting for {what}\n{tails}")


def http_ok(url: str) -> bool:
    return httpx.get(url, timeout=2.0, trust_env=False).status_code == 200


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.append(int(entry.name))
    return found


def find_child(pid: int, *needles: str) -> int | None:
    """The child of ``pid`` whose command line holds every needle (e.g. ``--name``, ``w1``)."""
    for child in child_pids(pid):
        argv = _cmdline(child).split(b"\0")
        words = [a.decode(errors="replace") for a in argv]
        if all(n in words for n in needles):
            return child
    return None


def base_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment plus ``extra``, unbuffered, without proxies for loopback."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update({"PYTHONUNBUFFERED": "1", "NO_PROXY": "127.0.0.1,localhost", **extra})
    return env
