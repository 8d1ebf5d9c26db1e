"""Prometheus metrics with the names operators know from vLLM and TGI, prefixed ``llmtree_``.

Every process keeps its own ``CollectorRegistry`` (never the global one, so tests can build many):

* a **node** (``NodeMetrics``) counts what its engine serves, labelled ``node=<name>``: time to
  first token, inter-token latency, end-to-end latency and queue time (histograms), prompt and
  generated tokens, requests by finish reason, and its requests running and waiting (read from
  ``TreeNode.status()`` at scrape time). It answers on its Pyro5 daemon as the object
  ``llmtree.metrics`` (``metrics() -> text``) and, when ``metrics_port`` is set, over HTTP;
* the **gateway** (``llmtree.gateway.metrics``) measures the same request series as its clients
  see them and adds the tree's view: every node's running and waiting, the queue time of all
  nodes together and ``llmtree_nodes_alive`` from the directory.

The engine calls ``NodeMetrics.observe_outputs`` once per step (its ``observer`` hook) with that
step's outputs; ``RequestTimers`` turns them into observations.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import accumulate
from typing import Any, Protocol

import Pyro5.api
from prometheus_client import CollectorRegistry, Counter, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

logger = logging.getLogger(__name__)

disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: they only add noise for dashboards

METRICS_ID = "llmtree.metrics"
"""Pyro5 object id of a node's metrics endpoint, next to ``llmtree.node`` in the same daemon."""

RUNNING = "llmtree_num_requests_running"
WAITING = "llmtree_num_requests_waiting"
IN_FLIGHT = "llmtree_num_requests_in_flight"
TTFT = "llmtree_time_to_first_token_seconds"
ITL = "llmtree_inter_token_latency_seconds"
E2E = "llmtree_e2e_request_latency_seconds"
QUEUE = "llmtree_request_queue_time_seconds"
PROMPT_TOKENS = "llmtree_prompt_tokens"  # exposed as llmtree_prompt_tokens_total
GENERATION_TOKENS = "llmtree_generation_tokens"
SUCCESS = "llmtree_request_success"
NODES_ALIVE = "llmtree_nodes_alive"

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

MAX_TRACKED = 100_000
"""Requests timed at once; past this the oldest is forgotten (a lost terminal event)."""


class BatchHistogram(Collector):
    """A histogram with one fixed set of label values that takes many observations at a time.

    ``prometheus_client.Histogram.observe`` takes two locks and scans the buckets for every
    value; the gateway and every node observe an inter-token latency per token, so a delivery of
    32 tokens paid that 32 times. Here a batch costs one lock and a binary search per value (the
    gateway's bookkeeping of a 32-event delivery went from 212 to 95 us, a node's of a 32-row
    step, on the engine thread, from 434 to 64). The exposition is the one
    ``prometheus_client.Histogram`` writes (``_bucket`` with ``le``, ``_count``, ``_sum``).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        labels: dict[str, str] | None = None,
    ) -> None:
        self.name, self.documentation = name, documentation
        self._labels = dict(labels or {})
        self._bounds = (*sorted(float(b) for b in buckets if b != math.inf), math.inf)
        les = [floatToGoString(bound) for bound in self._bounds]  # type: ignore[no-untyped-call]
        self._les: list[str] = les
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, value: float) -> None:
        self.observe_many((value,))

    def observe_many(self, values: Iterable[float]) -> None:
        """Each value counts in the first bucket whose bound it does not exceed."""
        bounds, counts = self._bounds, self._counts
        with self._lock:
            for value in values:
                counts[bisect_left(bounds, value)] += 1
                self._sum += value

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=list(self._labels))

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        family = self._family()
        cumulative = [
            (le, float(count)) for le, count in zip(self._les, accumulate(counts), strict=True)
        ]
        family.add_metric(list(self._labels.values()), cumulative, total)
        yield family


class RequestMetrics:
    """The per-request series in ``registry``; labelled ``node=<name>`` when ``node`` is given.

    ``queue`` False leaves the queue-time histogram out (the gateway shows the nodes' instead).
    """

    def __init__(
        self, registry: CollectorRegistry, node: str | None = None, queue: bool = True
    ) -> None:
        labels = ("node",) if node else ()
        self._node = node

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> BatchHistogram:
            return BatchHistogram(registry, name, doc, buckets, {"node": node} if node else None)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, (*labels, *extra), registry=registry)

        self.ttft = histogram(TTFT, "Time to first token, from arrival.", TTFT_BUCKETS)
        self.itl = histogram(ITL, "Time between two generated tokens.", ITL_BUCKETS)
        self.e2e = histogram(E2E, "Arrival to the last token of a request.", E2E_BUCKETS)
        self.queue = (
            histogram(QUEUE, "Time a request waited before its first step.", QUEUE_BUCKETS)
            if queue
            else None
        )
        self.prompt_tokens = counter(PROMPT_TOKENS, "Prompt tokens of finished requests.")
        self.generation_tokens = counter(GENERATION_TOKENS, "Tokens generated.")
        self.success = counter(SUCCESS, "Finished requests by finish reason.", ("finished_reason",))

    def _labels(self, metric: Any, **extra: str) -> Any:
        if self._node:
            return metric.labels(node=self._node, **extra)
        return metric.labels(**extra) if extra else metric

    def observe_e2e(self, seconds: float) -> None:
        self.e2e.observe(max(0.0, seconds))

    def count_generated(self, tokens: int) -> None:
        if tokens > 0:
            self._labels(self.generation_tokens).inc(tokens)

    def count_finished(self, reason: str, prompt_tokens: int) -> None:
        if prompt_tokens > 0:
            self._labels(self.prompt_tokens).inc(prompt_tokens)
        self._labels(self.success, finished_reason=reason).inc()


class _Timer:
    __slots__ = ("arrival", "last_token", "queued")

    def __init__(self, arrival: float) -> None:
        self.arrival = arrival
        self.last_token: float | None = None
        self.queued = False


class RequestTimers:
    """Turns "request started / n tokens now / request ended" into ``RequestMetrics`` samples.

    Thread-safe. Times are ``time.monotonic()`` seconds.
    """

    def __init__(self, metrics: RequestMetrics) -> None:
        self.metrics = metrics
        self._lock = threading.Lock()
        self._timers: OrderedDict[str, _Timer] = OrderedDict()

    def start(self, request_id: str, arrival: float | None = None) -> None:
        with self._lock:
            self._timer(request_id, time.monotonic() if arrival is None else arrival)

    def _timer(self, request_id: str, arrival: float) -> _Timer:
        """The request's timer, started at ``arrival`` if new (caller holds the lock)."""
        timer = self._timers.get(request_id)
        if timer is None:
            timer = self._timers[request_id] = _Timer(arrival)
            while len(self._timers) > MAX_TRACKED:
                self._timers.popitem(last=False)
        return timer

    def running(self, requests: Iterable[tuple[str, float, float]]) -> None:
        """``(request_id, arrival, admitted)`` of each request in an engine step: starts timing
        the new ones and observes the queue time of the newly admitted (admitted 0: not yet),
        once per request, under one lock."""
        waits = []
        with self._lock:
            for request_id, arrival, admitted in requests:
                timer = self._timer(request_id, arrival)
                if admitted and not timer.queued:
                    timer.queued = True
                    waits.append(max(0.0, admitted - timer.arrival))
        if waits and self.metrics.queue is not None:
            self.metrics.queue.observe_many(waits)

    def tokens_many(self, arrivals: Iterable[tuple[str, int]], now: float | None = None) -> None:
        """``(request_id, count)``: new tokens of each request that arrived together at ``now``
        (one delivery, one engine step): one lock and one observation per histogram for all."""
        now = time.monotonic() if now is None else now
        generated, ttfts, itls = 0, [], []
        with self._lock:
            for request_id, count in arrivals:
                if count <= 0:
                    continue
                generated += count
                timer = self._timers.get(request_id)
                if timer is None:  # already ended: a late delivery of an earlier event
                    continue
                last, timer.last_token = timer.last_token, now
                if last is None:
                    ttfts.append(max(0.0, now - timer.arrival))
                else:
                    itls += [max(0.0, (now - last) / count)] * min(count, 64)
        self.metrics.count_generated(generated)
        self.metrics.ttft.observe_many(ttfts)
        self.metrics.itl.observe_many(itls)

    def finish(
        self, request_id: str, reason: str, prompt_tokens: int, now: float | None = None
    ) -> None:
        """The request ended with ``reason``; observes its end-to-end latency once."""
        now = time.monotonic() if now is None else now
        with self._lock:
            timer = self._timers.pop(request_id, None)
        if timer is None:
            return
        self.metrics.observe_e2e(now - timer.arrival)
        self.metrics.count_finished(reason, prompt_tokens)

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._timers.pop(request_id, None)

    @property
    def num_tracked(self) -> int:
        with self._lock:
            return len(self._timers)


# -- a node ------------------------------------------------------------------------------------
class SeqLike(Protocol):
    """What ``observe_outputs`` reads of an engine ``Sequence``."""

    request_id: str
    arrival_s: float
    admitted_s: float

    @property
    def num_prompt_tokens(self) -> int: ...


class OutputLike(Protocol):
    """What ``observe_outputs`` reads of an engine ``SequenceOutput``."""

    seq: Any
    token_ids: list[int]
    finish_reason: str | None


class _NodeLoad(Collector):
    """Running / waiting / in-flight of one node, read from its ``status()`` at scrape time."""

    def __init__(self, name: str, status: Callable[[], dict[str, Any]]) -> None:
        self._name = name
        self._status = status

    def collect(self) -> Iterator[Metric]:
        try:
            status = self._status()
        except Exception:  # noqa: BLE001 - a scrape never fails because of a status read
            logger.exception("status() failed during a metrics scrape")
            return
        for name, key, doc in (
            (RUNNING, "running", "Requests in this node's running batch."),
            (WAITING, "queued", "Requests queued on this node, waiting for a slot."),
            (IN_FLIGHT, "in_flight", "Requests this node tracks (root: the whole tree's)."),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=["node"])
            gauge.add_metric([self._name], float(status.get(key) or 0))
            yield gauge


class NodeMetrics:
    """One node's registry: request series from its engine plus its load from ``status()``."""

    def __init__(self, name: str, status: Callable[[], dict[str, Any]]) -> None:
        self.name = name
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = RequestMetrics(self.registry, node=name)
        self.timers = RequestTimers(self.requests)
        self.registry.register(_NodeLoad(name, status))
        self._http: Any = None

    def observe_outputs(self, outputs: Iterable[OutputLike]) -> None:
        """Engine hook, once per step on the engine thread; never raises into the engine."""
        try:
            now = time.monotonic()
            outputs = list(outputs)
            self.timers.running(
                [(o.seq.request_id, o.seq.arrival_s, o.seq.admitted_s) for o in outputs]
            )
            arrivals = [(o.seq.request_id, len(o.token_ids)) for o in outputs if o.token_ids]
            self.timers.tokens_many(arrivals, now)
            for output in outputs:
                seq = output.seq
                rid = seq.request_id
                if output.finish_reason is not None:
                    # after a failover the prompt also holds the answer so far: count the question
                    prompt = getattr(seq, "num_question_tokens", seq.num_prompt_tokens)
                    self.timers.finish(rid, output.finish_reason, int(prompt), now)
        except Exception:  # noqa: BLE001 - metrics must never break serving
            logger.exception("metrics: observing engine outputs failed")

    def text(self) -> str:
        """The Prometheus text exposition of this node."""
        return generate_latest(self.registry).decode()

    def serve_http(self, host: str, port: int) -> None:
        """Serve ``GET /metrics`` on ``host:port`` from a daemon thread (stopped by ``close``)."""
        from prometheus_client import start_http_server

        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        logger.info("metrics on http://%s:%d/metrics", host, port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


@Pyro5.api.behavior(instance_mode="single")
class MetricsEndpoint:
    """The Pyro5 face of ``NodeMetrics``: ``metrics()`` returns the node's text exposition."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self._metrics = metrics

    @Pyro5.api.expose  # type: ignore[untyped-decorator]
    def metrics(self) -> str:
        return self._metrics.text()


def start_node_metrics(
    name: str,
    status: Callable[[], dict[str, Any]],
    engine: Any,
    daemon: Any,
    host: str,
    port: int,
) -> NodeMetrics:
    """Wire a node's metrics: the engine's observer hook, the Pyro5 endpoint, HTTP if ``port``."""
    metrics = NodeMetrics(name, status)
    if engine is not None:
        engine.observer = metrics.observe_outputs
    daemon.register(MetricsEndpoint(metrics), METRICS_ID)
    if port:
        try:
            metrics.serve_http(host, port)
        except OSError as error:  # e.g. several local nodes given one port: serve on without it
            logger.warning(
                "metrics port %s:%d unusable (%s); Pyro5 endpoint only", host, port, error
            )
    return metrics
