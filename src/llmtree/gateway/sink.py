"""The gateway's event sink: a Pyro5 object the root delivers token events to.

``EventSink.deliver`` runs on Pyro5 worker threads; it hands each event to the asyncio loop of
the request's ``RequestStream``, which puts events back in ``seq`` order and drops duplicates
(deliveries can overtake each other), so the HTTP handler reads one ordered stream per request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import Pyro5.api

from llmtree.protocol import is_valid_event, unpack_events
from llmtree.tree.client import SINK_ID, configure_pyro

logger = logging.getLogger(__name__)


class RequestStream:
    """One request's events, in order, on one asyncio loop."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self._loop = loop
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._pending: dict[int, dict[str, Any]] = {}
        self._next_seq = 0
        self.finished = False

    def push_threadsafe(self, events: list[dict[str, Any]]) -> None:
        """Hands a delivery's events for this request to its loop (one wake-up per batch)."""
        self._loop.call_soon_threadsafe(self._push_all, events)

    def _push_all(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            self._push(event)

    def _push(self, event: dict[str, Any]) -> None:
        seq = event["seq"]
        if seq < self._next_seq or seq in self._pending or self.finished:
            return
        self._pending[seq] = event
        while self._next_seq in self._pending:
            ready = self._pending.pop(self._next_seq)
            self._next_seq += 1
            self._queue.put_nowait(ready)
            if ready.get("finish_reason") is not None:
                self.finished = True
                self._pending.clear()
                break

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
            self._queue.put_nowait(
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

    async def events(self, idle_timeout_s: float) -> AsyncIterator[dict[str, Any]]:
        """Yield events until the terminal one; ends with an error after ``idle_timeout_s``."""
        while True:
            try:  # most events are already queued: no timer, no task (wait_for makes a task)
                event = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    async with asyncio.timeout(idle_timeout_s):
                        event = await self._queue.get()
                except TimeoutError:
                    self.fail(f"no output for {idle_timeout_s:g} s; the serving node may be lost")
                    event = self._queue.get_nowait()
            yield event
            if event.get("finish_reason") is not None:
                return


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
        for stream, events in batches.items():
            if self.observer is not None:  # first: the reader may close the stream at once
                for event in events:
                    self.observer.event(event)
            stream.push_threadsafe(events)
        return sum(len(events) for events in batches.values())


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
