"""``llmtree up``: a whole local tree, each part its own OS process.

Starts (or reuses) the private slapd, then the root, then the workers a level at a time (a
level's workers start together once their parents are up; worker i's parent is node (i-1)//K in
breadth-first order, node 0 being the root), then the gateway. ``make run`` converts the model
before, so workers only load it. Each child's output goes to ``<var>/logs/<name>.log`` and,
prefixed with its name, to this terminal. Ctrl-C (or SIGTERM) stops them all, newest first.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from llmtree.config import Settings
from llmtree.errors import ConfigError, LlmTreeError
from llmtree.registry import Registry
from llmtree.slapd import PrivateSlapd
from llmtree.tree.client import Peers

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0


def tree_parents(workers: int, fanout: int, root: str = "root") -> dict[str, str]:
    """``{worker: parent}`` for a breadth-first tree with ``fanout`` children per node."""
    names = [root] + [f"worker-{i}" for i in range(1, workers + 1)]
    return {names[i]: names[(i - 1) // fanout] for i in range(1, len(names))}


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    lines: list[str] = field(default_factory=list)


class Launcher:
    def __init__(self, settings: Settings, workers: int = 2, fanout: int = 2) -> None:
        if workers < 1 or fanout < 1:
            raise ConfigError("--workers and --fanout must be at least 1")
        self.settings = settings
        self.workers = workers
        self.fanout = fanout
        self.children: list[Child] = []
        self._stop = threading.Event()
        self._slapd = PrivateSlapd(settings)
        self._started_slapd = False
        self._logs = settings.var_dir / "logs"
        self._api_key = ""

    # -- the whole run ----------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        started = time.monotonic()
        try:
            self._start_all()
        except (LlmTreeError, KeyboardInterrupt) as error:
            self.shutdown()
            if isinstance(error, LlmTreeError):
                raise
            return 130
        url = f"http://{self.settings.gateway_host}:{self.settings.gateway_port}"
        self._banner(url, time.monotonic() - started)
        while not self._stop.wait(0.5):
            for child in self.children:
                if child.process is not None and child.process.poll() is not None:
                    logger.warning("%s exited with code %s", child.name, child.process.returncode)
                    child.process = None
        self.shutdown()
        return 0

    def _start_all(self) -> None:
        self._ensure_slapd()
        self._check_free()
        self._logs.mkdir(parents=True, exist_ok=True)
        root = self.settings.root_name
        self._spawn(root, ["node", "--name", root, "--root"])
        self._wait_node(root)
        parents = tree_parents(self.workers, self.fanout, root)
        ready = {root}
        pending = list(parents)
        while pending:  # a level at a time: a worker starts once its parent is up
            batch = [w for w in pending if parents[w] in ready]
            for worker in batch:
                self._spawn(worker, ["node", "--name", worker, "--parent", parents[worker]])
            for worker in batch:
                self._wait_node(worker)
                ready.add(worker)
                pending.remove(worker)
        from llmtree.gateway.keys_cli import ensure_dev_key, ensure_jwt_secret

        jwt_secret = ensure_jwt_secret(self.settings)
        self._api_key = ensure_dev_key(self.settings)
        self._spawn("gateway", ["gateway"], {"LLMTREE_JWT_SECRET": jwt_secret})
        self._wait_gateway()

    def _ensure_slapd(self) -> None:
        if not self._slapd.is_initialized():
            logger.info("initialising the directory in %s", self.settings.ldap_data_dir)
            self._slapd.init()
        if not self._slapd.is_running():
            self._slapd.start()
            self._started_slapd = True
            logger.info("slapd started at %s", self.settings.ldap_url)

    def _check_free(self) -> None:
        registry = Registry(self.settings)
        registry.connect(writer=False)
        try:
            live = [r.name for r in registry.list_nodes()]
        finally:
            registry.close()
        if live:
            raise ConfigError(
                f"nodes {', '.join(live)} are already registered at {self.settings.ldap_url}; "
                "is another `llmtree up` running? stop it first (or wait for their TTL)"
            )

    # -- children ---------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        s = self.settings
        values = {
            "VAR_DIR": str(s.var_dir),
            "LDAP_URL": s.ldap_url,
            "LDAP_BASE": s.ldap_base,
            "MODEL": s.model,
            "MODEL_CACHE": str(s.model_cache_dir),
            "SLOTS": str(s.slots),
            "ROOT_PORT": str(s.root_port),
            "GATEWAY_PORT": str(s.gateway_port),
            "THREADS": str(s.torch_threads(self.workers)),
        }
        env.update({f"LLMTREE_{k}": v for k, v in values.items()})
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _spawn(self, name: str, args: list[str], extra: dict[str, str] | None = None) -> None:
        child = Child(name, [sys.executable, "-m", "llmtree", *args])
        child.log_path = self._logs / f"{name}.log"
        child.process = subprocess.Popen(
            child.argv,
            env={**self._env(), **(extra or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert child.process.stdout is not None
        threading.Thread(target=self._pump, args=(child, child.process.stdout), daemon=True).start()
        self.children.append(child)
        logger.info("started %s (pid %d)", name, child.process.pid)

    def _pump(self, child: Child, stream: IO[bytes]) -> None:
        assert child.log_path is not None
        with child.log_path.open("a", encoding="utf-8") as log:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip()
                log.write(line + "\n")
                log.flush()
                child.lines = (child.lines + [line])[-20:]
                sys.stdout.write(f"{child.name:>10} | {line}\n")
                sys.stdout.flush()

    def _check_alive(self, child: Child) -> None:
        if self._stop.is_set():
            raise KeyboardInterrupt
        if child.process is None or child.process.poll() is not None:
            tail = "\n".join(child.lines[-5:])
            raise ConfigError(f"{child.name} exited during start-up; its last lines:\n{tail}")

    def _wait_node(self, name: str) -> None:
        child = next(c for c in self.children if c.name == name)
        registry = Registry(self.settings)
        registry.connect(writer=False)
        peers = Peers(2.0)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                self._check_alive(child)
                try:
                    if peers.call(registry.lookup(name).uri, "ping") == "pong":
                        return
                except LlmTreeError:
                    pass
                time.sleep(0.2)
        finally:
            registry.close()
        raise ConfigError(
            f"{name} did not come up within {START_TIMEOUT_S:g} s; see {child.log_path}"
        )

    def _wait_gateway(self) -> None:
        child = next(c for c in self.children if c.name == "gateway")
        url = f"http://{self.settings.gateway_host}:{self.settings.gateway_port}/readyz"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self._check_alive(child)
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise ConfigError(f"the gateway did not become ready; see {child.log_path}")

    def _banner(self, url: str, seconds: float) -> None:
        lines = [
            "",
            f"llmtree is up in {seconds:.1f} s: "
            f"root + {self.workers} workers (fanout {self.fanout})",
            f"  web chat:   {url}/",
            f"  API:        {url}/v1/chat/completions  (OpenAI-compatible)",
            f"  API key:    {self._api_key}  (also in {self.settings.var_dir / 'dev-api-key'})",
            f"  try:        curl -N {url}/v1/chat/completions -H 'Content-Type: application/json' "
            f"-H 'Authorization: Bearer {self._api_key}' "
            '-d \'{"messages":[{"role":"user","content":"What is the capital of France?"}],'
            '"stream":true}\'',
            f"  directory:  ldapsearch -x -H {self.settings.ldap_url} -b {self.settings.nodes_dn}",
            "  nodes:      llmtree nodes",
            "  Ctrl-C stops everything.",
            "",
        ]
        print("\n".join(lines), flush=True)

    # -- stopping ---------------------------------------------------------------------------
    def shutdown(self) -> None:
        for child in reversed(self.children):
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for child in reversed(self.children):
            if child.process is None:
                continue
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop; killing it", child.name)
                child.process.kill()
                child.process.wait()
        if self._started_slapd:
            self._slapd.stop()
            logger.info("slapd stopped")
        logger.info("all stopped")
