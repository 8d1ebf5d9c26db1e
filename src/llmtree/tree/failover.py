"""The root's in-flight table: who serves what, what was streamed, and failover.

For every request in flight the root keeps the serving node, the placement number (``attempt``)
and the answer streamed so far (token ids and text). Events pass through ``deliver``: those of
an abandoned placement are dropped, the rest are put in order and renumbered, so the client sees
one continuous ``seq`` whatever happened underneath.

A monitor thread looks for requests that got no event for ``stall_timeout_s``. It asks the
serving node whether it still holds them (a request waiting in a queue legitimately sends
nothing); a node that cannot be reached, or that no longer holds a request, has lost it. A lost
request is placed again through the normal routing with the tokens already streamed as a prefix,
at most ``max_retries`` times, then it ends with an ``error`` event (code ``retries_exhausted``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmtree.config import Settings
from llmtree.errors import InvalidRequest, LlmTreeError, Overloaded
from llmtree.protocol import make_event

logger = logging.getLogger(__name__)

MAX_PENDING = 4096
"""Out-of-order events held per request at most (a peer cannot make the root hoard memory)."""
MAX_PLACE_FAILURES = 20
"""Failed re-placements (e.g. every queue full) before a lost request ends with an error."""
REPLACE_DELAY_S = 0.5
"""Pause before trying again to place a lost request that found no room."""
MAX_ORPHANS = 4096
"""Orphans (events of requests no longer in the table) remembered, so each is cancelled once."""

Place = Callable[[dict[str, Any]], str]
Probe = Callable[[str, list[str]], list[str]]
Send = Callable[[str, list[dict[str, Any]]], None]
Lost = Callable[[str], None]
CancelOn = Callable[[str, str], object]


@dataclass(slots=True)
class Flight:
    """One request in flight: where it runs and what the client has seen of it."""

    request: dict[str, Any]
    """The request as the gateway submitted it (wire form)."""
    sink: str
    node: str | None = None
    attempt: int = 0
    retries: int = 0
    place_failures: int = 0
    moving: bool = True
    """Being placed (or checked) right now: the monitor leaves it alone."""
    cancelled: bool = False
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    next_seq: int = 0
    """The client-facing ``seq`` of the next event."""
    expect: int = 0
    """The engine ``seq`` expected next from the current placement."""
    pending: dict[int, dict[str, Any]] = field(default_factory=dict)
    last_event: float = field(default_factory=time.monotonic)

    @property
    def max_tokens(self) -> int:
        sampling = self.request.get("sampling") or {}
        value = sampling.get("max_tokens", 256)
        return value if isinstance(value, int) else 256

    def accept(self, event: dict[str, Any], now: float) -> list[dict[str, Any]]:
        """Takes one event of this request; returns those now ready for the client, renumbered."""
        if event.get("attempt", 0) != self.attempt:
            return []  # from a placement given up on (e.g. a node that came back)
        seq = event["seq"]
        if seq < self.expect or seq in self.pending or len(self.pending) >= MAX_PENDING:
            return []
        self.last_event = now
        self.pending[seq] = event
        ready = []
        while self.expect in self.pending:
            out = dict(self.pending.pop(self.expect))
            self.expect += 1
            self.token_ids += [t for t in out.get("token_ids") or [] if type(t) is int]
            self.text.append(out.get("text") or "")
            out["seq"] = self.next_seq
            self.next_seq += 1
            ready.append(out)
            if out.get("finish_reason") is not None:
                self.pending.clear()
                break
        return ready

    def next_request(self) -> dict[str, Any]:
        """The wire request of the next placement: the answer so far becomes its prefix."""
        self.attempt += 1
        self.expect = 0
        self.pending.clear()
        self.node = None
        request = dict(self.request)
        request.update(prefix_ids=list(self.token_ids), attempt=self.attempt, path=[])
        return request

    def final(self, request_id: str, node: str, reason: str, error: str = "") -> dict[str, Any]:
        """A terminal event made by the root itself (the serving node cannot send one)."""
        event = make_event(
            request_id, self.next_seq, finish_reason=reason, node=node, error=error or None
        )
        self.next_seq += 1
        return event


class FlightTable:
    """The root's table and its monitor thread; every method is thread-safe."""

    def __init__(
        self,
        settings: Settings,
        name: str,
        place: Place,
        probe: Probe,
        send: Send,
        lost: Lost,
        cancel_on: CancelOn,
    ) -> None:
        self._settings = settings
        self._name = name
        self._place = place
        self._probe = probe
        self._send = send
        self._lost = lost
        self._cancel_on = cancel_on
        self._lock = threading.Lock()
        self._flights: dict[str, Flight] = {}
        self._orphans: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._stopped = threading.Event()
        self.failovers = 0
        """Re-placements made so far (status shows it)."""
        self._thread = threading.Thread(target=self._monitor, name=f"{name}-monitor", daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        with self._lock:
            return len(self._flights)

    def stop(self) -> None:
        self._stopped.set()

    # -- the request path --------------------------------------------------------------------
    def open(self, request_id: str, request: dict[str, Any], sink: str) -> None:
        """Records a new request before it is placed; InvalidRequest if the id is in flight."""
        with self._lock:
            if request_id in self._flights:
                raise InvalidRequest(f"request_id {request_id!r} is already in flight")
            self._flights[request_id] = Flight(request=request, sink=sink)

    def placed(self, request_id: str, node: str) -> None:
        """The first placement went to ``node``."""
        with self._lock:
            flight = self._flights.get(request_id)
            if flight is None:
                return
            flight.node, flight.moving = node, False
            flight.last_event = time.monotonic()
            cancelled = flight.cancelled
        if cancelled:
            self._cancel_on(node, request_id)

    def forget(self, request_ids: set[str] | list[str]) -> None:
        with self._lock:
            for request_id in request_ids:
                self._flights.pop(request_id, None)

    def cancel(self, request_id: str) -> str | None:
        """Marks the request cancelled; returns the node serving it now (None: none known)."""
        with self._lock:
            flight = self._flights.get(request_id)
            if flight is None:
                return None
            flight.cancelled = True
            return flight.node

    def abandon_sink(self, sink: str) -> list[tuple[str | None, str]]:
        """The sink is gone: marks its requests cancelled; returns (node, request_id) of each."""
        with self._lock:
            found = [
                (flight.node, rid)
                for rid, flight in self._flights.items()
                if flight.sink == sink and not flight.cancelled
            ]
            for _, rid in found:
                self._flights[rid].cancelled = True
        return found

    def deliver(
        self, events: list[dict[str, Any]]
    ) -> tuple[dict[str, list[dict[str, Any]]], list[tuple[str, str]]]:
        """Valid events from serving nodes -> the ones to pass on, grouped by sink, and the
        (node, request_id) of orphans: requests a node still runs that nobody waits for."""
        by_sink: dict[str, list[dict[str, Any]]] = {}
        orphans: list[tuple[str, str]] = []
        now = time.monotonic()
        with self._lock:
            for event in events:
                rid, node = event["request_id"], event.get("node")
                flight = self._flights.get(rid)
                if flight is None or event.get("attempt", 0) != flight.attempt:
                    if (
                        event["finish_reason"] is None
                        and isinstance(node, str)
                        and node
                        and (flight is None or node != flight.node)
                        and self._orphan(node, rid)
                    ):
                        orphans.append((node, rid))
                    continue
                for ready in flight.accept(event, now):
                    if ready["finish_reason"] is not None:
                        del self._flights[event["request_id"]]
                    by_sink.setdefault(flight.sink, []).append(ready)
        return by_sink, orphans

    def _orphan(self, node: str, request_id: str) -> bool:
        """True the first time (node, request_id) is seen as an orphan (under the lock)."""
        key = (node, request_id)
        if key in self._orphans:
            return False
        self._orphans[key] = None
        if len(self._orphans) > MAX_ORPHANS:
            self._orphans.popitem(last=False)
        return True

    # -- failover ----------------------------------------------------------------------------
    def _monitor(self) -> None:
        stall = self._settings.stall_timeout_s
        while not self._stopped.wait(min(1.0, stall / 4)):
            now = time.monotonic()
            stalled: dict[str | None, list[str]] = {}
            with self._lock:
                for request_id, flight in self._flights.items():
                    if not flight.moving and now - flight.last_event >= stall:
                        flight.moving = True  # claimed; the check below releases it
                        stalled.setdefault(flight.node, []).append(request_id)
            for node, request_ids in stalled.items():
                threading.Thread(
                    target=self._check, args=(node, request_ids), name="failover", daemon=True
                ).start()

    def _check(self, node: str | None, request_ids: list[str]) -> None:
        """Asks ``node`` about its stalled requests; fails over the ones it lost."""
        lost = list(request_ids)
        if node is not None:
            try:
                held = set(self._probe(node, request_ids))
                lost = [rid for rid in request_ids if rid not in held]
            except LlmTreeError as error:
                logger.warning("serving node %s is gone (%s); failing over", node, error)
                self._lost(node)
        now = time.monotonic()
        with self._lock:
            for request_id in set(request_ids) - set(lost):
                if (flight := self._flights.get(request_id)) is not None:
                    flight.moving, flight.last_event = False, now  # queued or slow, but alive
        for request_id in lost:
            self.fail_over(request_id)

    def fail_over(self, request_id: str) -> None:
        """Places a lost request again with its answer so far as prefix, or ends it."""
        final: dict[str, Any] | None = None
        with self._lock:
            flight = self._flights.get(request_id)
            if flight is None:
                return
            old = flight.node
            if flight.cancelled:
                final = flight.final(request_id, self._name, "cancelled")
            elif flight.retries >= self._settings.max_retries and old is not None:
                final = flight.final(
                    request_id,
                    self._name,
                    "error",
                    f"retries_exhausted: the serving node was lost {flight.retries + 1} times",
                )
                final["code"] = "retries_exhausted"
            elif flight.place_failures >= MAX_PLACE_FAILURES:
                final = flight.final(
                    request_id, self._name, "error", "no_capacity: no node could take it over"
                )
                final["code"] = "no_capacity"
            elif len(flight.token_ids) >= flight.max_tokens:
                final = flight.final(request_id, self._name, "length")
            if final is not None:
                del self._flights[request_id]
                sink = flight.sink
            else:
                if old is not None:
                    flight.retries += 1
                    self.failovers += 1
                request = flight.next_request()
                sink = ""
        if final is not None:
            self._send_final(sink, final)
            return
        logger.info(
            "request %s: re-submitting after %s was lost (attempt %d, %d tokens kept)",
            request_id,
            old,
            request["attempt"],
            len(request["prefix_ids"]),
        )
        try:
            node = self._place(request)
        except LlmTreeError as error:
            level = logging.INFO if isinstance(error, Overloaded) else logging.WARNING
            logger.log(level, "request %s: re-submission failed: %s", request_id, error)
            with self._lock:
                if (flight := self._flights.get(request_id)) is not None:
                    flight.place_failures += 1
                    flight.moving = False
                    flight.last_event = (
                        time.monotonic() - self._settings.stall_timeout_s + REPLACE_DELAY_S
                    )
            return
        self.placed(request_id, node)

    def _send_final(self, sink: str, event: dict[str, Any]) -> None:
        try:
            self._send(sink, [event])
        except LlmTreeError as error:
            logger.warning("could not end %s at its sink: %s", event["request_id"], error)
