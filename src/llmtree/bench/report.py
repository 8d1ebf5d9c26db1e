"""Showing and saving level summaries: a rich table, JSON lines and a markdown table.

The same columns everywhere, so a terminal run of ``llmtree bench`` and ``docs/benchmarks.md``
read alike: requests (ok / errors / cut by the time cap), output tokens/s, requests/s, then
p50 / p90 / p99 of TTFT, TPOT and ITL in milliseconds and of end-to-end latency in seconds.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from llmtree.bench.stats import Dist, LevelSummary

HEADERS = (
    "ok/err/cut",
    "out tok/s",
    "req/s",
    "TTFT ms p50/p90/p99",
    "TPOT ms p50/p90/p99",
    "ITL ms p50/p90/p99",
    "E2E s p50/p90/p99",
)


def _number(value: float | None, scale: float, digits: int) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def format_dist(dist: Dist, scale: float = 1000.0, digits: int = 0, sep: str = " / ") -> str:
    """``"41 / 55 / 80"``: p50 / p90 / p99 scaled (ms by default), ``-`` where unmeasured."""
    return sep.join(_number(v, scale, digits) for v in (dist.p50, dist.p90, dist.p99))


def row_cells(summary: LevelSummary, sep: str = " / ") -> list[str]:
    """The cells after the label columns, in ``HEADERS`` order."""
    return [
        f"{summary.num_ok}/{summary.num_errors}/{summary.num_incomplete}",
        f"{summary.output_tokens_per_s:.1f}",
        f"{summary.requests_per_s:.2f}",
        format_dist(summary.ttft, sep=sep),
        format_dist(summary.tpot, digits=1, sep=sep),
        format_dist(summary.itl, digits=1, sep=sep),
        format_dist(summary.e2e, scale=1.0, digits=2, sep=sep),
    ]


def render_table(summaries: Iterable[LevelSummary], title: str = "") -> Table:
    """A rich table with one row per level (compact cells: ``p50/p90/p99``)."""
    table = Table(title=title or None, caption="latencies: p50/p90/p99", show_lines=False)
    table.add_column("level", no_wrap=True, min_width=6)
    for header in HEADERS:
        table.add_column(header.replace(" p50/p90/p99", ""), justify="right", no_wrap=True)
    for summary in summaries:
        table.add_row(summary.label, *row_cells(summary, sep="/"))
    return table


def error_lines(summaries: Iterable[LevelSummary]) -> list[str]:
    """One line per level that had errors, with a sample of the messages."""
    return [
        f"{s.label}: {s.num_errors} errors, e.g. {'; '.join(s.errors)}"
        for s in summaries
        if s.num_errors
    ]


def jsonl_lines(summaries: Iterable[LevelSummary], meta: dict[str, Any]) -> list[str]:
    """One JSON object per level: ``meta`` (run settings) merged with the summary."""
    return [json.dumps({**meta, **s.to_dict()}, sort_keys=True) for s in summaries]


def write_jsonl(path: Path, summaries: Iterable[LevelSummary], meta: dict[str, Any]) -> None:
    """Write (replace) ``path`` with one JSON line per level."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = jsonl_lines(summaries, meta)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def read_jsonl(path: Path) -> list[LevelSummary]:
    """The summaries a ``write_jsonl`` wrote (extra keys are ignored)."""
    text = path.read_text(encoding="utf-8")
    return [LevelSummary.from_dict(json.loads(line)) for line in text.splitlines() if line.strip()]


def markdown_table(rows: Sequence[tuple[str, LevelSummary]], first_header: str = "case") -> str:
    """A GitHub markdown table; each row is ``(case name, summary)``."""
    headers = [first_header, "level", *HEADERS]
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join(["---", "---"] + ["---:"] * len(HEADERS)) + " |",
    ]
    for name, summary in rows:
        lines.append("| " + " | ".join([name, summary.label, *row_cells(summary)]) + " |")
    return "\n".join(lines)
