"""The request series' bookkeeping, without a tree: the batched histogram against
prometheus_client's own, and what ``RequestTimers`` observes for a delivery."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from llmtree.metrics import ITL_BUCKETS, BatchHistogram, RequestMetrics, RequestTimers

# on a bound, between bounds, below the first and past the last (the +Inf bucket), zero
VALUES = [0.0, 0.005, 0.0051, 0.02, 0.0199, 0.3, 2.5, 2.6, 100.0, 0.075, 0.075, 1e-9]


@pytest.mark.parametrize("labels", [{}, {"node": "worker-1"}])
def test_the_batched_histogram_writes_what_prometheus_client_writes(labels: dict[str, str]) -> None:
    theirs_registry, ours_registry = CollectorRegistry(), CollectorRegistry()
    theirs = Histogram(
        "x_seconds", "doc.", list(labels), registry=theirs_registry, buckets=ITL_BUCKETS
    )
    child = theirs.labels(**labels) if labels else theirs
    ours = BatchHistogram(ours_registry, "x_seconds", "doc.", ITL_BUCKETS, labels)
    for value in VALUES:
        child.observe(value)
    ours.observe_many(VALUES[:5])
    for value in VALUES[5:]:
        ours.observe(value)
    text = generate_latest(ours_registry).decode()
    assert text == generate_latest(theirs_registry).decode()
    count = 'x_seconds_count{node="worker-1"}' if labels else "x_seconds_count"
    assert f"{count} 12.0" in text
    assert 'le="+Inf"' in text


def test_a_registered_name_cannot_be_taken_twice() -> None:
    registry = CollectorRegistry()
    BatchHistogram(registry, "x_seconds", "doc.", ITL_BUCKETS)
    with pytest.raises(ValueError):
        BatchHistogram(registry, "x_seconds", "doc.", ITL_BUCKETS)


def sample(registry: CollectorRegistry, name: str) -> float:
    value = registry.get_sample_value(name)
    return 0.0 if value is None else value


def test_a_delivery_observes_first_tokens_and_inter_token_latencies_per_token() -> None:
    registry = CollectorRegistry()
    timers = RequestTimers(RequestMetrics(registry, queue=False))
    timers.start("a", arrival=10.0)
    timers.start("b", arrival=10.5)
    timers.tokens_many([("a", 1), ("b", 0)], now=11.0)  # a's first token; b has none yet
    assert sample(registry, "llmtree_time_to_first_token_seconds_count") == 1
    assert sample(registry, "llmtree_time_to_first_token_seconds_sum") == pytest.approx(1.0)
    timers.tokens_many([("a", 4), ("b", 1), ("gone", 3)], now=11.2)
    assert sample(registry, "llmtree_time_to_first_token_seconds_count") == 2  # b's first
    # a: 4 tokens 0.2 s after its last, so 4 gaps of 0.05 s
    assert sample(registry, "llmtree_inter_token_latency_seconds_count") == 4
    assert sample(registry, "llmtree_inter_token_latency_seconds_sum") == pytest.approx(0.2)
    assert (
        registry.get_sample_value("llmtree_inter_token_latency_seconds_bucket", {"le": "0.04"}) == 0
    )
    assert (
        registry.get_sample_value("llmtree_inter_token_latency_seconds_bucket", {"le": "0.06"}) == 4
    )
    # every token counts as generated, the one of a request no longer timed ("gone") too
    assert sample(registry, "llmtree_generation_tokens_total") == 1 + 4 + 1 + 3
    timers.finish("a", "stop", prompt_tokens=7, now=12.0)
    timers.tokens_many([("a", 2)], now=12.5)  # a late delivery after the end: counted, not timed
    assert sample(registry, "llmtree_inter_token_latency_seconds_count") == 4
    assert sample(registry, "llmtree_e2e_request_latency_seconds_sum") == pytest.approx(2.0)


def test_a_step_starts_new_requests_and_observes_each_queue_time_once() -> None:
    registry = CollectorRegistry()
    timers = RequestTimers(RequestMetrics(registry, node="worker-1"))
    timers.running([("a", 10.0, 0.0), ("b", 10.0, 10.25)])  # a still waits, b admitted
    timers.running([("a", 10.0, 10.5), ("b", 10.0, 10.25)])  # a admitted; b seen again
    timers.running([("a", 10.0, 10.5), ("b", 10.0, 10.25)])
    labels = {"node": "worker-1"}
    assert registry.get_sample_value("llmtree_request_queue_time_seconds_count", labels) == 2
    assert registry.get_sample_value(
        "llmtree_request_queue_time_seconds_sum", labels
    ) == pytest.approx(0.75)
    timers.tokens_many([("a", 1)], now=11.0)  # timed from a's arrival
    assert registry.get_sample_value(
        "llmtree_time_to_first_token_seconds_sum", labels
    ) == pytest.approx(1.0)
