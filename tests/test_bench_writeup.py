"""``benchmarks/writeup.py``: the page ``make bench`` writes, from hand-made summaries.

A full run takes half an hour; this checks in milliseconds that its last step (ratios, target
verdicts, tree deltas, failures) renders, so a long run cannot end in a formatting crash.
"""

from __future__ import annotations

import sys
from pathlib import Path

from llmtree.bench.stats import Dist, LevelSummary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from writeup import Report, render, targets  # noqa: E402

MACHINE = {
    "cpu": "Test CPU",
    "cpu_capability": "AVX512",
    "cores": "2",
    "memory": "24 GiB",
    "torch": "2.13.0",
    "transformers": "5.23.0",
    "python": "3.11",
    "os": "Linux",
}
SETTINGS = {"prompt": "32", "output": "128", "requests": "4×C", "duration": "60", "batches": "2"}


CPU_S = {"worker": 36.0, "root": 1.0, "gateway": 2.0, "load generator": 1.0}
"""CPU seconds of one full-stack level: gateway + root 3 of 40."""


def paired(number: int, alone: float, loaded: float, full: float) -> list[LevelSummary]:
    """One round of case (e); its stand-in load took 5 % of the machine, set for 4 %."""
    plan = {"period_ms": 40.0, "burst_ms": 4.0, "target_share": 0.04, "round": number}
    return [
        level(32, alone, paired={**plan, "kind": "a"}),
        level(32, loaded, paired={**plan, "kind": "load"}, load_share=0.05),
        level(32, full, paired={**plan, "kind": "b"}),
    ]


def level(
    c: int, tps: float, ttft_ms: float = 100.0, output_tokens: int = 0, **extra: object
) -> LevelSummary:
    summary = LevelSummary(label=f"c={c}", concurrency=c, num_ok=4, output_tokens_per_s=tps)
    summary.output_tokens = output_tokens
    summary.ttft = Dist(count=4, mean=ttft_ms / 1000, p50=ttft_ms / 1000, p90=0.2, p99=0.3)
    summary.tpot = Dist(count=4, mean=0.012, p50=0.012, p90=0.014, p99=0.015)
    summary.extra.update(extra)
    return summary


def probes(p50: float) -> dict[str, float]:
    return {"count": 200, "p50": p50, "p90": 9.0}


def report() -> Report:
    result = Report("make bench", "today", MACHINE, "bfloat16", SETTINGS)
    result.cases = {
        "a": [level(1, 80), level(32, 1000), level(64, 1100)],
        "b": [
            level(1, 78),
            level(32, 980, cpu_s=CPU_S, output_tokens=20000),
            level(64, 1050, worker_rss_peak_mb=900.0),
        ],
        "c": [level(1, 20), level(32, 20), level(64, 20)],
        "d": [level(1, 60), level(32, 500)],
        "e": paired(1, 1000, 950, 900) + paired(2, 800, 720, 760) + paired(3, 500, 250, 500),
    }
    result.tree = [
        (depth, level(1, 70, 100 + depth, placement_ms=probes(3.0 + depth), placement_warmup=10))
        for depth in (1, 2, 3)
    ]
    result.failures = {"(x) broken": "RuntimeError: it died:\nTraceback\nValueError: why"}
    return result


def test_targets_are_judged_from_the_numbers() -> None:
    verdicts = {name: (shown, verdict) for name, shown, verdict in targets(report())}
    assert verdicts["full stack at c=32 ≥ 40× naive"] == ("49.0×", "met")
    assert verdicts["full stack at c=32 ≥ 1.5× static batches"] == ("1.96×", "met")
    assert verdicts["TTFT p50 at c=1 ≤ 150 ms"] == ("100 ms", "met")
    tree = next(v for k, v in verdicts.items() if k.startswith("each extra tree level"))
    assert tree == ("+1.00 ms at 2 levels, +1.00 ms at 3 levels", "met")
    cost = next(v for k, v in verdicts.items() if k.startswith("gateway + root cost"))
    # judged on the paired rounds of (e) (median loss 5.0 %), the single runs shown beside
    assert cost[0].startswith("+5.0 % at c=32 (median of paired rounds, (e)); one run each: +2.5")
    assert cost[1] == "**not met**"
    assert cost[0].endswith("(their CPU at c=32: 7.5 % of all, see below)")
    unpaired = report()
    del unpaired.cases["e"]
    alone = {name: (shown, verdict) for name, shown, verdict in targets(unpaired)}
    cost = next(v for k, v in alone.items() if k.startswith("gateway + root cost"))
    assert cost[0].startswith("+2.5 % at c=1") and cost[1] == "met"  # single runs only
    rss = next(v for k, v in verdicts.items() if k.startswith("worker RSS"))
    assert rss == ("900 MiB", "met")


def test_render_has_every_section() -> None:
    page = render(report())
    for heading in ("## Machine", "## Results", "## Ratios", "## Targets", "## Tree overhead"):
        assert heading in page
    assert "| 32 | 49.00× | 1.96× | 0.98× |" in page
    assert "| 64 | 52.50× | not measured | 0.95× |" in page
    assert "RuntimeError: it died: … ValueError: why" in page
    # CPU per output token: 36 s of the worker for 20,000 tokens is 1.8 ms
    assert "## Where the full stack's CPU goes" in page
    assert "| c=32 | 1.800 | 0.050 | 0.100 | 0.050 | 7.5 % |" in page
    # (e): the load's losses 5, 10 and 50 %, (b)'s 10, 5 and 0 %
    assert "## Paired rounds" in page
    assert "| 1 | 1000.0 | 950.0 | 900.0 | 5.0 % | 10.0 % | 5.0 % | 4.0 % |" in page
    assert "| 2 | 800.0 | 720.0 | 760.0 | 10.0 % | 5.0 % | 5.0 % | 4.0 % |" in page
    assert "| mean | | | | 21.7 % | 5.0 % | | |" in page
    assert "| median | | | | 10.0 % | 5.0 % | | |" in page
    assert "(200 timed per depth, after 10 untimed ones" in page


def test_render_of_nothing_says_not_measured() -> None:
    page = render(Report("make bench", "today", MACHINE, "bfloat16", SETTINGS))
    assert "_no case was run_" in page
    assert page.count("not measured") == 7 * 2
