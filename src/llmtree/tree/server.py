"""One node process: Pyro5 daemon + directory entry + heartbeat + (for workers) an engine.

``NodeServer.start()`` checks the directory first (parent exists, name free) so that a bad
command fails in a second, before the model loads; then it loads the engine, opens the daemon,
registers, attaches to the parent, and heartbeats until ``stop()``.

The heartbeat also repairs: it re-adds an entry that expired (after a directory outage), and a
worker whose parent is gone moves under its grandparent (which the parent named when it was
attached), then back to its own parent once that one returns. While the directory is down the
node goes on serving from the references it holds; the failure is logged once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import Pyro5.api

from llmtree.config import Settings
from llmtree.errors import LlmTreeError, NameTaken, NodeUnavailable, RegistryError, UnknownNode
from llmtree.metrics import NodeMetrics, start_node_metrics
from llmtree.registry import NodeRecord, Registry
from llmtree.tree.client import OBJECT_ID, Peers, configure_pyro, configure_tls
from llmtree.tree.node import TreeNode

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


class NodeServer:
    """Owns one TreeNode and everything around it; ``start`` / ``wait`` / ``stop``."""

    def __init__(
        self,
        settings: Settings,
        name: str,
        parent: str | None,
        is_root: bool,
        progress: Progress | None = None,
    ) -> None:
        if is_root == (parent is not None):
            raise ValueError("a node is either the root or has a parent")
        self.settings = settings
        self.name = name
        self.parent = parent
        self.is_root = is_root
        self._progress = progress or (lambda message: logger.info("%s", message))
        self.registry = Registry(settings)
        self.node: TreeNode | None = None
        self.engine: Any = None
        self._daemon: Pyro5.api.Daemon | None = None
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._registered = False
        self._threads: list[threading.Thread] = []
        self.metrics: NodeMetrics | None = None
        self._peers = Peers(settings.call_timeout_s)
        self._home_parent = parent
        """The parent this node was started under; it goes back there when it returns."""
        self._grandparent: str | None = None
        self._parent_uri: str | None = None
        self._directory_down = False
        self._parent_down = False

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> str:
        """Bring the node up; returns its URI. Raises an LlmTreeError that says what to do."""
        self._progress(f"connecting to the directory at {self.settings.ldap_url}")
        self.registry.connect(writer=True)
        self._check_name_free()
        if self.parent is not None:
            self.registry.lookup(self.parent)
        if not self.is_root:
            self._start_engine()
        configure_pyro(512 if self.is_root else 128)
        configure_tls(self.settings)  # with settings.tls: mutual TLS, our CA only
        host = self.settings.root_host if self.is_root else self.settings.node_host
        port = self.settings.root_port if self.is_root else self.settings.node_port
        try:
            self._daemon = Pyro5.api.Daemon(host=host, port=port)
        except OSError as error:
            raise NodeUnavailable(
                f"cannot listen on {host}:{port}: {error}; is another node using that port?"
            ) from error
        self.node = TreeNode(
            self.name,
            self.settings,
            self.registry,
            engine=self.engine,
            parent=self.parent,
            on_parent_changed=self._on_parent_changed,
        )
        uri = str(self._daemon.register(self.node, OBJECT_ID))
        self.node.uri = uri
        self.node.on_drain = self._start_drain
        self.metrics = start_node_metrics(
            self.name, self.node.status, self.engine, self._daemon, host, self.settings.metrics_port
        )
        self._spawn(self._daemon.requestLoop, "pyro-daemon")
        self.registry.register(self._record(), is_alive=self._is_alive)
        self._registered = True
        if self.is_root:
            self.node.refresh_children([c.name for c in self.registry.children(self.name)])
        else:
            self._attach()
        self._spawn(self._heartbeat_loop, "heartbeat")
        self._progress(f"node {self.name} ready at {uri}")
        return uri

    def _start_engine(self) -> None:
        if self.settings.lazy_load:  # the model loads on the first request
            from llmtree.engine.lazy import LazyEngine

            self.engine = LazyEngine(self.settings, self.name, on_events=self._on_engine_events)
            self.engine.start(progress=self._progress)
            return
        from llmtree.engine.engine import Engine

        self._progress(f"loading model {self.settings.model}")
        self.engine = Engine(self.settings, self.name, on_events=self._on_engine_events)
        self.engine.start(progress=self._progress)

    def _start_drain(self) -> None:
        from llmtree.tree.drain import Drainer

        assert self.node is not None
        Drainer(self.node, self.settings, self.registry, self._attach, self.stop).start()

    def _check_name_free(self) -> None:
        try:
            existing = self.registry.lookup(self.name)
        except UnknownNode:
            return
        if self._is_alive(existing.uri):
            raise NameTaken(
                f"node name {self.name!r} is already registered and alive at {existing.uri}; "
                "pick another --name or stop that node"
            )

    def run(self) -> None:
        """``start``, then serve until SIGTERM or SIGINT, then ``stop`` (the process's main)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop())
        try:
            self.start()
            self.wait()
        finally:
            self.stop()
            self._stopped.wait(30)  # a drain stops from its own thread: let it finish

    def wait(self) -> None:
        """Block until ``stop()`` is called (from a signal handler or another thread)."""
        while not self._stopping.wait(0.5):
            pass

    def stop(self) -> None:
        """Leave the tree cleanly: detach, unregister, stop the engine and the daemon."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self.parent and self._registered:
            with contextlib.suppress(LlmTreeError):
                self._peers.call(self.registry.lookup(self.parent).uri, "detach_child", self.name)
        if self._registered:
            try:
                self.registry.unregister(self.name)
            except LlmTreeError as error:
                logger.warning("could not unregister %s: %s", self.name, error)
        if self.engine is not None:
            self.engine.stop()
        if self.node is not None:
            self.node.close()
        if self._daemon is not None:
            self._daemon.shutdown()
        if self.metrics is not None:
            self.metrics.close()
        self.registry.close()
        self._stopped.set()
        logger.info("node %s stopped", self.name)

    # -- helpers ----------------------------------------------------------------------------
    def _spawn(self, target: Callable[[], Any], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _record(self) -> NodeRecord:
        assert self.node is not None
        status = self.node.status()
        busy = status["running"] + status["queued"] >= status["slots"] > 0
        return NodeRecord(
            name=self.name,
            uri=self.node.uri,
            host=self.settings.root_host if self.is_root else self.settings.node_host,
            parent=self.parent,
            capacity=status["slots"],
            load=status["running"] + status["queued"],
            status="busy" if busy else "idle",
            model=status["model"],
        )

    def _is_alive(self, uri: str) -> bool:
        if self.node is not None and uri == self.node.uri:
            return False
        try:
            self._peers.call(uri, "ping")
            return True
        except LlmTreeError:
            return False

    def _attach(self) -> None:
        if self.parent is None:
            return
        try:
            parent_uri = self.registry.lookup(self.parent).uri
        except RegistryError:
            if self._parent_uri is None:
                raise
            parent_uri = self._parent_uri  # directory down: the reference held
        report = self.node.load_report() if self.node is not None else None
        result = self._peers.call(parent_uri, "attach_child", self.name, report)
        self._parent_uri = parent_uri
        if isinstance(result, dict) and isinstance(result.get("grandparent"), str):
            self._grandparent = result["grandparent"]

    def _on_engine_events(self, events: list[dict[str, Any]]) -> None:
        if self.node is not None:
            self.node.on_engine_events(events)

    def _on_parent_changed(self, parent: str) -> None:
        self.parent = parent
        self._home_parent = parent  # an explicit move (or a drain) makes it home
        self.registry.set_parent(self.name, parent)

    def _heartbeat_loop(self) -> None:
        while not self._stopping.wait(self.settings.heartbeat_s):
            self._beat()
            if not self.is_root:
                try:
                    self._keep_parent()
                except Exception:
                    logger.exception("parent check crashed; continuing")

    def _beat(self) -> None:
        """Refresh the entry (re-adding it if it expired); a directory outage is logged once."""
        try:
            self._heartbeat_once()
        except RegistryError as error:
            if not self._directory_down:
                logger.warning("directory unreachable, serving on from what is known: %s", error)
            self._directory_down = True
            with contextlib.suppress(LlmTreeError):  # fresh connections for the next beat
                self.registry.connect(writer=True)
        except LlmTreeError as error:
            logger.warning("heartbeat failed: %s", error)
        except Exception:
            logger.exception("heartbeat crashed; continuing")

    def _heartbeat_once(self) -> None:
        assert self.node is not None
        record = self._record()
        try:
            self.registry.heartbeat(self.name, record.load, record.status, record.capacity)
        except UnknownNode:
            logger.warning("entry for %s expired; registering again", self.name)
            self.registry.register(record, is_alive=self._is_alive)
        if self._directory_down:
            logger.warning("directory reachable again; entry of %s refreshed", self.name)
            self._directory_down = False
        self.node.refresh_children([c.name for c in self.registry.children(self.name)])

    def _keep_parent(self) -> None:
        """Attach to the parent; if it is gone, move under the grandparent (and back later)."""
        home = self._home_parent
        if home is not None and self.parent != home and self._reachable(home):
            self._move_to(home)
            return
        try:
            self._attach()
        except NodeUnavailable as error:
            if not self._parent_down:
                logger.warning("parent %s unreachable: %s", self.parent, error)
            self._parent_down = True
            target = self._grandparent
            if target and target not in (self.parent, self.name) and self._reachable(target):
                self._move_to(target)
            return
        except LlmTreeError as error:  # e.g. the directory is down and no reference is held
            logger.debug("cannot attach to %s now: %s", self.parent, error)
            return
        if self._parent_down:
            logger.warning("parent %s reachable again", self.parent)
            self._parent_down = False

    def _reachable(self, name: str) -> bool:
        try:
            return bool(self._peers.call(self.registry.lookup(name).uri, "ping") == "pong")
        except LlmTreeError:
            return False

    def _move_to(self, parent: str) -> None:
        """Tree repair: re-attach under ``parent`` (the directory is updated too)."""
        assert self.node is not None
        old, old_uri = self.parent, self._parent_uri
        self.parent, self._parent_uri = parent, None
        self.node.adopt_parent(parent)
        with contextlib.suppress(LlmTreeError):
            self.registry.set_parent(self.name, parent)
        try:
            self._attach()
        except LlmTreeError as error:
            logger.warning("could not attach to %s yet: %s", parent, error)
        if old_uri is not None:
            with contextlib.suppress(LlmTreeError):
                self._peers.call(old_uri, "detach_child", self.name)
        self._parent_down = False
        logger.warning("moved from parent %s to %s", old, parent)
