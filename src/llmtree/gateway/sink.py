"""The gateway's event sink: a Pyro5 object the root delivers token events to.

``EventSink.deliver`` runs on Pyro5 worker threads; it hands each event to the asyncio loop of
the request's ``RequestStream``, which puts events back in ``seq`` order and drops duplicates
(deliveries can overtake each other), so the HTTP handler reads one ordered stream per request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import Pyro5.api

from llmtree.protocol import is_valid_event, unpack_events
from llmtree.tree.client import SINK_ID, configure_pyro

logger = logging.getLogger(__name__)


class RequestStream:
    """One request's events, in order, on one asyncio loop.

    Everything but ``push_threadsafe`` runs on that loop. A streamed answer passes a few hundred
    events through here, one per engine step, so the hand-over is a deque and one future rather
    than an ``asyncio.Queue``, and the idle limit is one timer per quiet spell (re-armed only
    when it fires) rather than a timeout armed around every wait.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.loop = loop
        self._ready: deque[dict[str, Any]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._pending: dict[int, dict[str, Any]] = {}
        self._next_seq = 0
        self._last_event = loop.time()
        self.finished = False

    def push_threadsafe(self, events: list[dict[str, Any]]) -> None:
        """Hands a delivery's events for this request to its loop (one wake-up per batch)."""
        self.loop.call_soon_threadsafe(self.push_all, events)

    def push_all(self, events: list[dict[str, Any]]) -> None:
        """On the loop: take events in any order; they come out in ``seq`` order, once each."""
        for event in events:
            self._push(event)

    def _push(self, event: dict[str, Any]) -> None:
        seq = event["seq"]
        if seq < self._next_seq or seq in self._pending or self.finished:
            return
        self._last_event = self.loop.time()
        self._pending[seq] = event
        while self._next_seq in self._pending:
            ready = self._pending.pop(self._next_seq)
            self._next_seq += 1
            self._put(ready)
            if ready.get("finish_reason") is not None:
                self.finished = True
                self._pending.clear()
                break

    def _put(self, event: dict[str, Any]) -> None:
        self._ready.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def fail(self, message: str) -> None:
        """End the stream from the gateway side (timeout, lost node): one terminal error event."""
        self._end("error", error=message, timeout=True)

    def stop(self) -> None:
        """End the stream from the gateway side at a user's request: one terminal cancelled event
        (the caller cancels the request on the tree)."""
        self._end("cancelled")

    def _end(self, reason: str, **extra: Any) -> None:
        if not self.finished:
            self.finished = True
            self._put(
                {
                    "request_id": self.request_id,
                    "seq": self._next_seq,
                    "text": "",
                    "token_ids": [],
                    "finish_reason": reason,
                    "usage": None,
                    "local": True,
                    **extra,
                }
            )

    def _watch(self, idle_timeout_s: float) -> None:
        """The idle timer: fails the stream after ``idle_timeout_s`` with no new event."""
        if self.finished:
            return
        quiet = self.loop.time() - self._last_event
        if quiet >= idle_timeout_s:
            self.fail(f"no output for {idle_timeout_s:g} s; the serving node may be lost")
        else:
            self._watchdog = self.loop.call_later(
                idle_timeout_s - quiet, self._watch, idle_timeout_s
            )

    async def events(self, idle_timeout_s: float) -> AsyncIterator[dict[str, Any]]:
        """Yield events until the terminal one; ends with an error event once no event has
        come for ``idle_timeout_s``."""
        self._last_event = self.loop.time()
        self._watchdog = self.loop.call_later(idle_timeout_s, self._watch, idle_timeout_s)
        try:
            while True:
                while not self._ready:
                    self._waiter = self.loop.create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
                event = self._ready.popleft()
                yield event
                if event.get("finish_reason") is not None:
                    return
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None


@Pyro5.api.behavior(instance_mode="single")
class EventSink:
    """The Pyro5 side: the root calls ``deliver(events)``; streams are opened by the gateway."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, RequestStream] = {}
        self.observer: Any = None
        """Sees every request open, each delivered event and the close (gateway/metrics.py)."""

    def open(self, request_id: str) -> RequestStream:
        stream = RequestStream(request_id, asyncio.get_running_loop())
        with self._lock:
            self._streams[request_id] = stream
        if self.observer is not None:
            self.observer.opened(request_id)
        return stream

    def close(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
        if self.observer is not None:
            self.observer.closed(request_id)

    @property
    def num_open(self) -> int:
        with self._lock:
            return len(self._streams)

    @Pyro5.api.expose
    def deliver(self, packed: str | list[dict[str, Any]]) -> int:
        """Called by the root with a batch of events (a JSON array, see ``pack_events``);
        unknown or malformed ones are dropped."""
        batches: dict[RequestStream, list[dict[str, Any]]] = {}
        with self._lock:
            for event in unpack_events(packed):
                if is_valid_event(event):
                    stream = self._streams.get(event["request_id"])
                    if stream is not None:
                        batches.setdefault(stream, []).append(event)
        if not batches:
            return 0
        if self.observer is not None:  # first: the reader may close the stream at once
            self.observer.events([event for events in batches.values() for event in events])
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, list[Any]]]] = {}
        for stream, events in batches.items():
            by_loop.setdefault(stream.loop, []).append((stream, events))
        for loop, items in by_loop.items():  # one wake-up of each loop per delivery
            loop.call_soon_threadsafe(_push_each, items)
        return sum(len(events) for events in batches.values())


def _push_each(items: list[tuple[RequestStream, list[dict[str, Any]]]]) -> None:
    for stream, events in items:
        stream.push_all(events)


class SinkServer:
    """Runs the EventSink in a Pyro5 daemon thread inside the gateway process."""

    def __init__(self, host: str, port: int = 0) -> None:
        self.sink = EventSink()
        self._host, self._port = host, port
        self._daemon: Pyro5.api.Daemon | None = None
        self._thread: threading.Thread | None = None
        self.uri = ""

    def start(self) -> str:
        configure_pyro(256)
        self._daemon = Pyro5.api.Daemon(host=self._host, port=self._port)
        self.uri = str(self._daemon.register(self.sink, SINK_ID))
        self._thread = threading.Thread(target=self._daemon.requestLoop, name="sink", daemon=True)
        self._thread.start()
        return self.uri

    def stop(self) -> None:
        if self._daemon is not None:
            self._daemon.shutdown()
        if self._thread is not None:
            self._thread.join(5)
