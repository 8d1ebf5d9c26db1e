"""The benchmark arithmetic (percentiles, per-request metrics, level summaries) and the pure
helpers around it (workload spans, URL checks, report formatting), on hand-made records."""

from __future__ import annotations

import random

import pytest

from llmtree.bench.loadgen import chat_url, is_loopback
from llmtree.bench.report import format_dist, markdown_table
from llmtree.bench.stats import Dist, LevelSummary, RequestRecord, percentile, summarize
from llmtree.bench.workload import Span, make_requests


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([5.0], 50, 5.0),
        ([5.0], 99, 5.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([4.0, 1.0, 3.0, 2.0], 0, 1.0),
        ([4.0, 1.0, 3.0, 2.0], 100, 4.0),
        ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 90, 9.1),
        (list(range(1, 101)), 99, 99.01),
    ],
)
def test_percentile_interpolates_like_numpy(values: list[float], q: float, expected: float) -> None:
    assert percentile([float(v) for v in values], q) == pytest.approx(expected)


def test_percentile_refuses_empty_and_out_of_range() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_dist_of_nothing_is_unmeasured() -> None:
    assert Dist.of([]) == Dist(count=0, mean=None, p50=None, p90=None, p99=None)
    dist = Dist.of([1.0, 3.0])
    assert (dist.count, dist.mean, dist.p50) == (2, 2.0, 2.0)


def test_request_metrics() -> None:
    record = RequestRecord(start=10.0, chunk_times=[10.2, 10.3, 10.5], end=10.6, output_tokens=5)
    assert record.is_ok
    assert record.ttft == pytest.approx(0.2)
    assert record.tpot == pytest.approx(0.4 / 4)
    assert record.itls == pytest.approx([0.1, 0.2])
    assert record.tokens_until(10.35) == 2  # not finished yet: one per chunk so far
    assert record.tokens_until(10.6) == 5  # finished: the usage count


def test_single_token_request_has_no_tpot() -> None:
    record = RequestRecord(start=0.0, chunk_times=[0.1], end=0.1, output_tokens=1)
    assert record.tpot is None
    assert record.itls == []


def test_summarize_without_cap_runs_to_the_last_end() -> None:
    records = [
        RequestRecord(start=0.0, chunk_times=[0.1, 0.2], end=0.3, output_tokens=2),
        RequestRecord(start=0.0, chunk_times=[0.2, 0.4], end=0.5, output_tokens=2),
        RequestRecord(start=0.1, end=0.15, error="HTTP 503: busy"),
        RequestRecord(start=0.2, end=0.25, error="HTTP 503: busy"),
    ]
    summary = summarize(records, "c=2", window_start=0.0, concurrency=2)
    assert (summary.num_ok, summary.num_errors, summary.num_incomplete) == (2, 2, 0)
    assert summary.duration_s == pytest.approx(0.5)
    assert summary.output_tokens == 4
    assert summary.output_tokens_per_s == pytest.approx(8.0)
    assert summary.requests_per_s == pytest.approx(4.0)
    assert summary.ttft.p50 == pytest.approx(0.15)
    assert summary.e2e.count == 2
    assert summary.itl.count == 2
    assert summary.errors == ["HTTP 503: busy"]


def test_summarize_with_cap_counts_partial_tokens_and_incomplete() -> None:
    records = [
        RequestRecord(start=0.0, chunk_times=[0.1, 0.2, 0.3], end=0.4, output_tokens=3),
        RequestRecord(start=0.4, chunk_times=[0.6, 0.7, 1.2]),  # cut by the cap at 1.0
    ]
    summary = summarize(records, "c=1", window_start=0.0, window_end=1.0, concurrency=1)
    assert (summary.num_ok, summary.num_errors, summary.num_incomplete) == (1, 0, 1)
    assert summary.output_tokens == 3 + 2
    assert summary.output_tokens_per_s == pytest.approx(5.0)
    assert summary.ttft.count == 1  # latencies only over completed requests


def test_summary_round_trips_through_dict() -> None:
    records = [RequestRecord(start=0.0, chunk_times=[0.1, 0.2], end=0.3, output_tokens=2)]
    summary = summarize(records, "rate=4/s", 0.0, rate=4.0)
    summary.extra["worker_rss_mb"] = 512.0
    again = LevelSummary.from_dict({**summary.to_dict(), "url": "ignored"})
    assert again == summary


def test_span_parse_and_draw() -> None:
    assert Span.parse("32") == Span(32, 32)
    assert Span.parse("16:64") == Span(16, 64)
    for bad in ("0", "9:3", "a", "1:2:3", ""):
        with pytest.raises(ValueError):
            Span.parse(bad)
    rng = random.Random(1)
    assert all(16 <= Span(16, 64).draw(rng) <= 64 for _ in range(100))


def test_requests_are_seeded() -> None:
    first = make_requests(5, Span(8, 16), Span(4, 4), seed=7)
    assert first == make_requests(5, Span(8, 16), Span(4, 4), seed=7)
    assert first != make_requests(5, Span(8, 16), Span(4, 4), seed=8)
    assert all(spec.output_tokens == 4 for spec in first)
    assert all(8 <= len(spec.prompt.split()) <= 16 for spec in first)


def test_chat_url_and_loopback() -> None:
    assert chat_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1/chat/completions"
    assert chat_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/v1/chat/completions"
    endpoint = "http://localhost:1/v1/chat/completions"
    assert chat_url(endpoint) == endpoint
    assert is_loopback("http://127.0.0.1:8000")
    assert is_loopback("http://127.8.9.1")
    assert is_loopback("http://[::1]:8000")
    assert is_loopback("http://localhost:8000")
    assert not is_loopback("http://10.0.0.1:8000")
    assert not is_loopback("https://api.example.com")


def test_report_formats() -> None:
    assert format_dist(Dist()) == "- / - / -"
    assert format_dist(Dist.of([0.010, 0.020])) == "15 / 19 / 20"
    assert format_dist(Dist.of([1.5]), scale=1.0, digits=1, sep="/") == "1.5/1.5/1.5"
    records = [RequestRecord(start=0.0, chunk_times=[0.1, 0.2], end=0.3, output_tokens=2)]
    table = markdown_table([("full stack", summarize(records, "c=1", 0.0, concurrency=1))])
    lines = table.splitlines()
    assert len(lines) == 3
    assert lines[2].startswith("| full stack | c=1 | 1/0/0 | 6.7 |")
