"""``GET /metrics`` of the gateway: the tree's metrics in the Prometheus text format.

What it shows:

* the request series as this gateway's clients see them (``llmtree.metrics.RequestMetrics``,
  no ``node`` label): time to first token, inter-token latency and end-to-end latency from the
  moment the request was accepted, prompt and generated tokens and requests by finish reason,
  fed by the event sink (``EventSink.observer``) as each request's ordered events arrive;
* the tree, read at scrape time (at most once a second): ``llmtree_nodes_alive`` from the
  directory, and from each live node's Pyro5 metrics endpoint its requests running and waiting
  (``{node}``) and its queue-time histogram, summed over the nodes into one.

``mount_metrics(app, root, sink)`` adds the route and hooks the sink; that is all ``app.py`` does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, TimeoutError
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from llmtree.errors import LlmTreeError
from llmtree.gateway.root_client import RootClient
from llmtree.metrics import (
    IN_FLIGHT,
    METRICS_ID,
    NODES_ALIVE,
    QUEUE,
    RUNNING,
    WAITING,
    RequestMetrics,
    RequestTimers,
)
from llmtree.tree.client import OBJECT_ID, Peers

logger = logging.getLogger(__name__)

MAX_NODES_SCRAPED = 256
"""Nodes whose load one scrape reads; scrape the rest directly (their ``metrics_port``)."""
SCRAPE_TIMEOUT_S = 2.0
CACHE_S = 1.0


def metrics_uri(node_uri: str) -> str:
    """The metrics endpoint next to a node: same daemon, object id ``llmtree.metrics``."""
    prefix = f"PYRO:{OBJECT_ID}@"
    if not node_uri.startswith(prefix):
        raise ValueError(f"not a node URI: {node_uri!r}")
    return f"PYRO:{METRICS_ID}@{node_uri[len(prefix) :]}"


class TreeView:
    """One reading of the tree: node count, per-node load, queue-time buckets of all nodes."""

    def __init__(self) -> None:
        self.nodes_alive = 0
        self.load: dict[str, tuple[float, float, float]] = {}
        """node -> (running, waiting, in flight)"""
        self.queue_buckets: dict[str, float] = {}
        self.queue_sum = 0.0
        self.scraped = 0


def _merge_node(view: TreeView, name: str, text: str) -> None:
    running = waiting = in_flight = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == RUNNING:
                running = sample.value
            elif sample.name == WAITING:
                waiting = sample.value
            elif sample.name == IN_FLIGHT:
                in_flight = sample.value
            elif sample.name == f"{QUEUE}_bucket":
                le = sample.labels["le"]
                view.queue_buckets[le] = view.queue_buckets.get(le, 0.0) + sample.value
            elif sample.name == f"{QUEUE}_sum":
                view.queue_sum += sample.value
    view.load[name] = (running, waiting, in_flight)
    view.scraped += 1


class _TreeCollector(Collector):
    def __init__(self, owner: GatewayMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Metric]:
        view = self._owner.tree_view()
        alive = GaugeMetricFamily(NODES_ALIVE, "Nodes registered and alive in the directory.")
        alive.add_metric([], view.nodes_alive)
        yield alive
        for metric, index, doc in (
            (RUNNING, 0, "Requests in the node's running batch."),
            (WAITING, 1, "Requests queued on the node, waiting for a slot."),
            (IN_FLIGHT, 2, "Requests the node tracks (root: the whole tree's)."),
        ):
            gauge = GaugeMetricFamily(metric, doc, labels=["node"])
            for name, values in sorted(view.load.items()):
                gauge.add_metric([name], values[index])
            yield gauge
        if view.queue_buckets:
            ordered = sorted(view.queue_buckets.items(), key=lambda item: float(item[0]))
            queue = HistogramMetricFamily(
                QUEUE, "Time requests waited on their node before their first step (all nodes)."
            )
            queue.add_metric([], [(le, value) for le, value in ordered], view.queue_sum)
            yield queue


class GatewayMetrics:
    """The gateway's registry, and the event sink's observer (opened, events, closed)."""

    def __init__(self, root: RootClient, timeout_s: float = SCRAPE_TIMEOUT_S) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = RequestMetrics(self.registry, queue=False)
        self.timers = RequestTimers(self.requests)
        self.registry.register(_TreeCollector(self))
        self._root = root
        self._peers = Peers(timeout_s)
        self._timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="metrics-scrape")
        self._lock = threading.Lock()
        self._seen: dict[str, set[int]] = {}
        """request_id -> event seqs already counted (open requests only)"""
        self._scrape_lock = threading.Lock()
        self._view: tuple[float, TreeView] | None = None

    # -- the sink's observer (Pyro5 threads; events may come twice or out of order) -------------
    def opened(self, request_id: str) -> None:
        with self._lock:
            self._seen[request_id] = set()
        self.timers.start(request_id)

    def events(self, events: list[dict[str, Any]]) -> None:
        """One delivery's events (each counted once, whatever order or repeats they come in)."""
        with self._lock:
            fresh = []
            for event in events:
                seen = self._seen.get(event["request_id"])
                if seen is not None and event["seq"] not in seen:
                    seen.add(event["seq"])
                    fresh.append(event)
        now = time.monotonic()
        self.timers.tokens_many(
            [(event["request_id"], len(event.get("token_ids") or [])) for event in fresh], now
        )
        for event in fresh:
            rid = event["request_id"]
            reason = event.get("finish_reason")
            if reason is not None:
                usage = event.get("usage") or {}
                prompt = usage.get("prompt_tokens", 0) if isinstance(usage, dict) else 0
                self.timers.finish(rid, str(reason), prompt if isinstance(prompt, int) else 0, now)

    def closed(self, request_id: str) -> None:
        with self._lock:
            self._seen.pop(request_id, None)
        self.timers.forget(request_id)

    # -- the tree ------------------------------------------------------------------------------
    def tree_view(self) -> TreeView:
        """The tree's current reading, re-read at most once per ``CACHE_S``."""
        with self._scrape_lock:
            if self._view is not None and time.monotonic() - self._view[0] < CACHE_S:
                return self._view[1]
            view = self._read_tree()
            self._view = (time.monotonic(), view)
            return view

    def _read_tree(self) -> TreeView:
        view = TreeView()
        try:
            nodes = self._root.list_nodes()
        except LlmTreeError as error:
            logger.warning("metrics: cannot read the directory: %s", error)
            return view
        view.nodes_alive = len(nodes)
        futures = {}
        for record in nodes[:MAX_NODES_SCRAPED]:
            try:
                uri = metrics_uri(record.uri)
            except ValueError:
                continue
            futures[record.name] = self._pool.submit(self._peers.call, uri, "metrics")
        deadline = time.monotonic() + self._timeout_s
        for name, future in futures.items():
            try:
                text = future.result(timeout=max(0.0, deadline - time.monotonic()))
                _merge_node(view, name, str(text))
            except (LlmTreeError, TimeoutError, ValueError) as error:
                logger.debug("metrics: node %s not scraped: %s", name, error)
        return view

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def mount_metrics(app: FastAPI, root: RootClient, sink: Any) -> GatewayMetrics:
    """Add ``GET /metrics`` to ``app`` and make ``sink`` (an ``EventSink``) report to it."""
    metrics = GatewayMetrics(root)
    sink.observer = metrics

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        body = await anyio.to_thread.run_sync(metrics.text)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return metrics
