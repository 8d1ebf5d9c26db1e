"""An engine that loads its model on the first request and lets it go when idle.

``LazyEngine`` has the engine's face (``submit``, ``cancel``, ``num_running``...) so a node
serves with it unchanged. Nothing is loaded at ``start``; the first ``submit`` starts loading
the model in a thread of its own and returns at once (the parent's ``submit`` call has a timeout
far shorter than a model load): the request waits in a pending list, counted as queued, and is
handed to the real engine once it is ready; a request the real engine refuses then ends with one
``error`` event, as any request that fails in the engine does. With ``idle_unload_s`` > 0 an
engine that held no request for that long is stopped and dropped, its memory returned to the
operating system (``malloc_trim``), so an idle worker holds no model; the next request loads it
again.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from llmtree.config import Settings
from llmtree.engine.engine import Engine, OnEvents
from llmtree.errors import EngineError, LlmTreeError, Overloaded
from llmtree.protocol import GenerateRequest, make_event

logger = logging.getLogger(__name__)


def release_memory() -> None:
    """Collect garbage and give freed heap pages back to the OS (glibc; a no-op elsewhere)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).malloc_trim(0)


class LazyEngine:
    """Loads the model on demand and (with ``idle_unload_s``) releases it when idle."""

    def __init__(self, settings: Settings, node_name: str, on_events: OnEvents) -> None:
        self._settings = settings
        self._node_name = node_name
        self._on_events = on_events
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self._pending: list[GenerateRequest] = []
        self._loading = False
        self._stopping = threading.Event()
        self._last_busy = time.monotonic()
        self._watcher: threading.Thread | None = None
        self.loads = 0
        """How many times the model was loaded (tests and logs)."""
        self.observer: Callable[[list[Any]], None] | None = None
        """Passed on to each real engine (``llmtree.metrics``)."""

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, progress: Callable[[str], None] | None = None) -> None:
        """Loads nothing; starts the idle watcher when ``idle_unload_s`` is set."""
        if progress is not None:
            progress("model loads on the first request (lazy)")
        if self._settings.idle_unload_s > 0:
            self._watcher = threading.Thread(target=self._watch, name="idle-unload", daemon=True)
            self._watcher.start()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            engine, self._engine = self._engine, None
            pending, self._pending = self._pending, []
        if engine is not None:
            engine.stop()
        self._end(pending, "cancelled", None)

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    # -- requests ----------------------------------------------------------------------------
    def submit(self, request: GenerateRequest) -> int:
        with self._lock:
            if self._stopping.is_set():
                raise EngineError("the engine is stopping")
            self._last_busy = time.monotonic()
            if self._engine is not None:
                return self._engine.submit(request)
            if len(self._pending) >= self._settings.slots + self._settings.max_queue:
                raise Overloaded(f"all {self._settings.slots} slots and the queue are full")
            self._pending.append(request)
            if not self._loading:
                self._loading = True
                threading.Thread(target=self._load, name="lazy-load", daemon=True).start()
        return 0

    def cancel(self, request_id: str) -> bool:
        with self._lock:
            if self._engine is not None:
                return self._engine.cancel(request_id)
            found = [r for r in self._pending if r.request_id == request_id]
            self._pending = [r for r in self._pending if r.request_id != request_id]
        self._end(found, "cancelled", None)
        return bool(found)

    @property
    def num_running(self) -> int:
        engine = self._engine
        return engine.num_running if engine is not None else 0

    @property
    def num_waiting(self) -> int:
        engine = self._engine
        return engine.num_waiting if engine is not None else len(self._pending)

    @property
    def slots(self) -> int:
        return self._settings.slots

    @property
    def model_name(self) -> str:
        engine = self._engine
        return engine.model_name if engine is not None else self._settings.model

    @property
    def is_ready(self) -> bool:
        return not self._stopping.is_set()

    # -- threads -----------------------------------------------------------------------------
    def _load(self) -> None:
        started = time.monotonic()
        engine = Engine(self._settings, self._node_name, on_events=self._on_events)
        engine.observer = self.observer
        try:
            engine.start()
        except Exception as error:  # noqa: BLE001 - every waiting request learns why
            logger.exception("lazy load failed")
            with self._lock:
                pending, self._pending, self._loading = self._pending, [], False
            self._end(pending, "error", f"the model could not be loaded: {error}")
            return
        failed: list[tuple[GenerateRequest, str]] = []
        with self._lock:
            if self._stopping.is_set():
                stale: Engine | None = engine
            else:
                stale, self._engine = None, engine
                self.loads += 1
                for request in self._pending:
                    try:
                        engine.submit(request)
                    except LlmTreeError as error:
                        failed.append((request, error.message))
                self._pending = []
                self._last_busy = time.monotonic()
            self._loading = False
        if stale is not None:
            stale.stop()
            return
        logger.info("model loaded on demand in %.1f s", time.monotonic() - started)
        for request, message in failed:
            self._end([request], "error", message)

    def _watch(self) -> None:
        idle_s = self._settings.idle_unload_s
        while not self._stopping.wait(min(1.0, idle_s / 4)):
            with self._lock:
                engine = self._engine
                if engine is None:
                    continue
                now = time.monotonic()
                if engine.num_running + engine.num_waiting > 0:
                    self._last_busy = now
                    continue
                if now - self._last_busy < idle_s:
                    continue
                self._engine = None
                engine.stop()  # idle: the loop thread ends at once
            del engine
            release_memory()
            logger.info("model released after %.0f s idle", idle_s)

    def _end(self, requests: list[GenerateRequest], reason: str, error: str | None) -> None:
        if not requests:
            return
        events = [
            make_event(r.request_id, 0, finish_reason=reason, node=self._node_name, error=error)
            for r in requests
        ]
        for event, request in zip(events, requests, strict=True):
            event["attempt"] = request.attempt
        try:
            self._on_events(events)
        except Exception:
            logger.exception("on_events failed; %d events lost", len(events))
