"""TreeNode: the Pyro5 object every node process exposes.

One shared instance per process (``instance_mode="single"``), called concurrently from Pyro5's
worker threads, so all state sits behind one lock and no lock is held across a network call.

Roles: the root only forwards, and what becomes of a request once placed (events to the sink,
cancel, failover) is its ``relay.RootRelay``. A worker serves with its engine while it has a free
slot, else forwards round robin to its children (``children.Children``), else queues; what it
serves is booked in ``serving.Serving``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import Pyro5.api

from llmtree.config import Settings
from llmtree.errors import InvalidRequest, NodeUnavailable, Overloaded
from llmtree.protocol import GenerateRequest, is_valid_event, pack_events, unpack_events
from llmtree.tree.children import Children
from llmtree.tree.client import Peers
from llmtree.tree.failover import FlightTable
from llmtree.tree.loads import ChildLoads, parse_report
from llmtree.tree.outbox import Outbox
from llmtree.tree.ports import Directory, EngineLike
from llmtree.tree.relay import RootRelay
from llmtree.tree.routing import Snapshot, plan
from llmtree.tree.serving import Serving

logger = logging.getLogger(__name__)

MAX_EVENTS_PER_CALL = 10_000


@Pyro5.api.behavior(instance_mode="single")
class TreeNode:
    """A node of the tree; see the module docstring for the rule it applies.

    Only the methods marked ``@expose`` are reachable over Pyro5: submit, deliver, cancel,
    attach_child, detach_child, set_parent, status, ping. The rest is for the owning process.
    """

    def __init__(
        self,
        name: str,
        settings: Settings,
        directory: Directory,
        engine: EngineLike | None = None,
        parent: str | None = None,
        on_parent_changed: Callable[[str], None] | None = None,
    ) -> None:
        self._name = name
        self._settings = settings
        self._directory = directory
        self._engine = engine
        self._parent = parent
        self._on_parent_changed = on_parent_changed
        self._peers = Peers(settings.call_timeout_s)
        self._lock = threading.Lock()
        self._children = Children(directory, settings.node_ttl_s)
        self._next_child = 0
        self._serving = Serving(engine)
        self._relay: RootRelay | None = None
        self._flights: FlightTable | None = None
        if engine is None:
            self._relay = RootRelay(
                settings, name, self._peers, self._children, self._place_again, self._drop_child
            )
            self._flights = self._relay.flights
        self._loads = ChildLoads(settings.node_ttl_s)
        self._rng = random.Random()
        self._draining = False
        self.on_drain: Callable[[], None] | None = None
        """Set by the owning process: starts the drain (``llmtree.tree.drain``)."""
        self._started = time.monotonic()
        self.uri = ""
        self._outbox = Outbox(self._deliver_to_root, name=f"{name}-outbox")
        self._outbox.start()

    # -- identity ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def is_root(self) -> bool:
        return self._engine is None

    @property
    def parent(self) -> str | None:
        return self._parent

    # -- the request path -------------------------------------------------------------------
    @Pyro5.api.expose
    def submit(self, request: str | dict[str, Any]) -> str:
        """Place a request (``GenerateRequest.pack``'s JSON, or a dict) in this subtree; returns
        the serving node's name.

        Called by the gateway (on the root) or by the parent node. Raises ``Overloaded`` when
        nothing below can take it, ``InvalidRequest`` for a malformed request.
        """
        req = GenerateRequest.from_wire(request)
        if not self.is_root:
            if self._name in req.path:
                raise InvalidRequest(f"routing loop through {self._name}: {req.path}")
            req.path.append(self._name)
            return self._place(req)
        if not req.sink:
            raise InvalidRequest("request has no sink to deliver events to", param="sink")
        assert self._flights is not None
        req.prefix_ids, req.attempt = [], 0
        wire = req.to_wire()
        self._flights.open(req.request_id, wire, req.sink)
        req.root, req.path = self.uri, [self._name]
        try:
            node = self._place(req)
        except BaseException:
            self._flights.forget([req.request_id])
            raise
        self._flights.placed(req.request_id, node)
        logger.info("request %s placed on %s", req.request_id, node)
        return node

    def _place_again(self, request: dict[str, Any]) -> str:
        """Failover: place a lost request again from the root (its prefix rides along)."""
        req = GenerateRequest.from_wire(request)
        req.root, req.path = self.uri, [self._name]
        return self._place(req)

    def _place(self, req: GenerateRequest) -> str:
        if self._draining:  # the parent passes over it and tries the next child
            raise Overloaded(f"{self._name} is draining; it takes no new requests")
        with self._lock:
            engine = self._engine
            policy = self._settings.policy
            children = tuple(self._children.names())
            if draining := self._loads.draining(children):
                children = tuple(c for c in children if c not in draining)
            running, waiting = self._serving.occupancy()
            snapshot = Snapshot(
                is_root=engine is None,
                num_running=running,
                num_waiting=waiting,
                slots=engine.slots if engine else 0,
                max_queue=self._settings.max_queue,
                children=children,
                next_child=self._next_child,
                policy=policy,
                loads=self._loads.loads(children) if policy == "p2c" else (),
                sizes=self._loads.sizes(children) if policy == "weighted-rr" else (),
                credits=self._loads.credits(children) if policy == "weighted-rr" else (),
                draws=(self._rng.getrandbits(32), self._rng.getrandbits(32)),
            )
            decision = plan(snapshot)
            if decision.serve:
                self._serving.reserved += 1
            elif decision.forward_to:
                self._next_child = (self._next_child + 1) % len(decision.forward_to)
                if decision.credits:
                    self._loads.set_credits(children, decision.credits)
        if decision.serve:
            return self._serve(req, reserved=True)
        for child in decision.forward_to:
            uri = self._children.uri_of(child)
            if uri is None:
                continue
            try:
                served_by: str = self._peers.call(uri, "submit", req.pack())
                with self._lock:
                    self._loads.sent(child)
                return served_by
            except Overloaded:
                continue
            except NodeUnavailable as error:
                logger.warning("child %s unavailable, dropping it: %s", child, error)
                self._drop_child(child)
        if decision.queue:
            return self._serve(req, reserved=False)
        where = "its children" if self.is_root else f"{self._name} and its children"
        raise Overloaded(f"no capacity left in {where}; retry later")

    def _serve(self, req: GenerateRequest, reserved: bool) -> str:
        """Hands ``req`` to the engine (see ``Serving.admit``)."""
        assert self._engine is not None
        with self._lock:
            self._serving.admit(req.request_id, req.root, reserved)
        try:
            self._engine.submit(req)
        except BaseException:
            with self._lock:
                self._serving.forget(req.request_id)
            raise
        return self._name

    def on_engine_events(self, events: list[dict[str, Any]]) -> None:
        """Engine callback, once per step on the engine thread: route events to their roots."""
        with self._lock:
            by_root = self._serving.route(events)
        for root, batch in by_root.items():
            self._outbox.put(root, batch)

    def _deliver_to_root(self, root: str, events: list[dict[str, Any]]) -> None:
        self._peers.call(root, "deliver", pack_events(events))

    @Pyro5.api.expose
    def deliver(self, packed: str | list[dict[str, Any]]) -> int:
        """Root only: events from a serving node (a JSON array, see ``pack_events``), passed on
        to the sinks (``relay.RootRelay``); returns how many."""
        if self._relay is None:
            raise InvalidRequest(f"{self._name} is not a root; deliver events to the root")
        events = unpack_events(packed)
        return self._relay.deliver([e for e in events[:MAX_EVENTS_PER_CALL] if is_valid_event(e)])

    @Pyro5.api.expose
    def cancel(self, request_id: str) -> bool:
        """Stop a request: the root finds the serving node; that node frees the slot at once."""
        if not isinstance(request_id, str):
            raise InvalidRequest("request_id must be a string", param="request_id")
        if self._relay is not None:
            return self._relay.cancel(request_id)
        assert self._engine is not None
        return self._engine.cancel(request_id)

    @Pyro5.api.expose
    def holds(self, request_ids: list[str]) -> list[str]:
        """Worker: the ones of ``request_ids`` it serves now (running or queued)."""
        if not isinstance(request_ids, list):
            raise InvalidRequest("request_ids must be a list", param="request_ids")
        with self._lock:
            held = self._serving.roots
            return [rid for rid in request_ids[:MAX_EVENTS_PER_CALL] if rid in held]

    # -- the tree's shape -------------------------------------------------------------------
    @Pyro5.api.expose
    def attach_child(self, name: str, report: dict[str, Any] | None = None) -> dict[str, Any]:
        """Called by a node that names this one as its parent; it must be in the directory.

        ``report``: the child's subtree load (``llmtree.tree.loads``), sent on every heartbeat.
        """
        if not isinstance(name, str) or name == self._name:
            raise InvalidRequest("a node cannot be its own child", param="name")
        parsed = parse_report(report) if report is not None else None
        self._children.attach(name)
        if parsed is not None:
            with self._lock:
                self._loads.report(name, parsed)
        return {"parent": self._name, "root": self.is_root, "grandparent": self._parent}

    @Pyro5.api.expose
    def detach_child(self, name: str) -> bool:
        """Called by a child that leaves or moves, or by this node when a child is gone."""
        with self._lock:
            self._loads.forget(name)
        return self._children.detach(name)

    def _drop_child(self, name: str) -> None:
        """``name`` cannot be reached: out until it attaches itself again."""
        with self._lock:
            self._loads.forget(name)
        self._children.drop(name)

    def adopt_parent(self, name: str) -> None:
        """The owning process moved this node under ``name`` (tree repair)."""
        self._parent = name

    @Pyro5.api.expose
    def set_parent(self, name: str) -> dict[str, Any]:
        """Move this node (and its subtree) under ``name``; used by ``llmtree parent N P``."""
        if self.is_root:
            raise InvalidRequest("the root has no parent")
        if not isinstance(name, str) or name == self._name:
            raise InvalidRequest("a node cannot be its own parent", param="parent")
        ancestor: str | None = name
        for _ in range(64):
            if ancestor is None:
                break
            if ancestor == self._name:
                raise InvalidRequest(f"{name} is below {self._name}; that would make a cycle")
            ancestor = self._directory.lookup(ancestor).parent
        record = self._directory.lookup(name)
        old, self._parent = self._parent, name
        if self._on_parent_changed is not None:
            self._on_parent_changed(name)
        self._peers.call(str(record.uri), "attach_child", self._name)
        if old and old != name and (old_uri := self._children.uri_of(old)):
            with contextlib.suppress(NodeUnavailable):
                self._peers.call(old_uri, "detach_child", self._name)
        logger.info("moved from parent %s to %s", old, name)
        return {"parent": name, "previous": old}

    def refresh_children(self, names: list[str]) -> None:
        """Heartbeat: the directory's view of this node's children."""
        with self._lock:
            keep = set(self._serving.roots.values())
        self._children.refresh(names, keep)

    # -- elasticity -------------------------------------------------------------------------
    @Pyro5.api.expose
    def drain(self) -> dict[str, Any]:
        """Stop taking new requests, finish the ones held, then leave (``llmtree drain N``)."""
        if self.is_root:
            raise InvalidRequest("the root cannot be drained; drain its workers")
        with self._lock:
            started = not self._draining
            self._draining = True
            held = len(self._serving.roots)
        if started:
            logger.warning("draining: no new requests; %d held ones finish first", held)
            if self.on_drain is not None:
                self.on_drain()
        return {"name": self._name, "draining": True, "held": held}

    @property
    def draining(self) -> bool:
        return self._draining

    def held(self) -> int:
        """Requests this node serves now (running or queued, or being admitted)."""
        with self._lock:
            return self._serving.held()

    def children_now(self) -> list[str]:
        return self._children.names()

    def load_report(self) -> dict[str, Any]:
        """This subtree's load, for the parent (sent with ``attach_child``)."""
        with self._lock:
            engine = self._engine
            capacity = (engine.slots + self._settings.max_queue) if engine else 0
            return self._loads.subtree(
                tuple(self._children.names()),
                sum(self._serving.occupancy()),
                capacity,
                self._draining,
            )

    # -- introspection ----------------------------------------------------------------------
    @Pyro5.api.expose
    def ping(self) -> str:
        return "pong"

    @Pyro5.api.expose
    def status(self) -> dict[str, Any]:
        """name, parent, children, slots, running, queued, served, uptime (and a bit more)."""
        with self._lock:
            engine = self._engine
            return {
                "name": self._name,
                "root": engine is None,
                "parent": self._parent,
                "children": self._children.names(),
                "slots": engine.slots if engine else 0,
                "running": engine.num_running if engine else 0,
                "queued": engine.num_waiting if engine else 0,
                "served": self._serving.finished,
                "in_flight": len(self._flights)
                if self._flights is not None
                else len(self._serving.roots),
                "failovers": self._flights.failovers if self._flights is not None else 0,
                "model": engine.model_name if engine else "",
                "uptime_s": round(time.monotonic() - self._started, 1),
                "policy": self._settings.policy,
                "draining": self._draining,
                "uri": self.uri,
            }

    def close(self) -> None:
        if self._flights is not None:
            self._flights.stop()
        self._outbox.stop()
