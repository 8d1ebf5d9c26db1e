"""Turns one ``run_all.py`` run into ``docs/benchmarks.md``: tables, ratios, targets, machine.

Pure formatting of what was measured; the targets are reported, never asserted. A value that
was not measured (a case left out, a quick run without c=32) says so instead of guessing.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from llmtree.bench.report import markdown_table
from llmtree.bench.stats import LevelSummary

CASE_NAMES = {
    "a": "(a) engine alone",
    "a0": "(a0) engine alone, PyTorch path",
    "b": "(b) full stack",
    "e": "(e) paired rounds",
    "c": "(c) naive server",
    "d": "(d) static batches",
}


@dataclass
class Report:
    command: str
    started: str
    machine: dict[str, str]
    dtype: str
    settings: dict[str, str]
    cases: dict[str, list[LevelSummary]] = field(default_factory=dict)
    tree: list[tuple[int, LevelSummary]] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    minutes: float = 0.0
    load_before: str = ""
    load_after: str = ""
    work_dir: str = ""


def _at(rows: list[LevelSummary] | None, concurrency: int) -> LevelSummary | None:
    return next((s for s in rows or [] if s.concurrency == concurrency), None)


def _ratio(report: Report, top: str, bottom: str, concurrency: int) -> float | None:
    a, b = _at(report.cases.get(top), concurrency), _at(report.cases.get(bottom), concurrency)
    if a is None or b is None or b.output_tokens_per_s <= 0:
        return None
    return a.output_tokens_per_s / b.output_tokens_per_s


def _fmt(value: float | None, pattern: str) -> str:
    return "not measured" if value is None else pattern.format(value)


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "**not met**")


def ttft_p50_ms(summary: LevelSummary) -> float | None:
    return _ms(summary.ttft.p50)


def placement_p50_ms(summary: LevelSummary) -> float | None:
    value = (summary.extra.get("placement_ms") or {}).get("p50")
    return None if value is None else float(value)


def tree_deltas(
    tree: list[tuple[int, LevelSummary]], metric: Callable[[LevelSummary], float | None]
) -> list[tuple[int, float]]:
    """``(levels, metric minus the metric at one level fewer)`` for consecutive depths."""
    pairs = sorted((d, v) for d, s in tree if (v := metric(s)) is not None)
    return [(d2, v2 - v1) for (d1, v1), (d2, v2) in zip(pairs, pairs[1:], strict=False)]


def _row(target: str, value: float | None, pattern: str, ok: bool | None) -> tuple[str, ...]:
    return (target, _fmt(value, pattern), _verdict(None if value is None else ok))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def targets(report: Report) -> list[tuple[str, ...]]:
    """``(target, measured, verdict)`` rows."""
    full = report.cases.get("b")
    naive, static = _ratio(report, "b", "c", 32), _ratio(report, "b", "d", 32)
    one, top = _at(full, 1), _at(full, 64)
    tpot, ttft = _ms(one.tpot.p50 if one else None), _ms(one.ttft.p50 if one else None)
    rss = top.extra.get("worker_rss_peak_mb") if top else None
    rows = [
        _row("full stack at c=32 ≥ 40× naive", naive, "{:.1f}×", (naive or 0) >= 40),
        _row("full stack at c=32 ≥ 1.5× static batches", static, "{:.2f}×", (static or 0) >= 1.5),
        _row("≤ 16 ms per output token at c=1 (TPOT p50)", tpot, "{:.1f} ms", (tpot or 0) <= 16),
        _row("TTFT p50 at c=1 ≤ 150 ms", ttft, "{:.0f} ms", (ttft or 0) <= 150),
    ]
    deltas = tree_deltas(report.tree, placement_p50_ms)
    worst = max((d for _, d in deltas), default=None)
    shown = ", ".join(f"{d:+.2f} ms at {n} levels" for n, d in deltas) or "not measured"
    verdict = _verdict(None if worst is None else worst <= 2.0)
    target = "each extra tree level adds ≤ 2 ms to TTFT (placement p50, see Tree overhead)"
    rows.append((target, shown, verdict))
    costs = []
    for summary in full or []:
        ratio = _ratio(report, "b", "a", summary.concurrency or 0)
        if ratio is not None:
            costs.append((summary.concurrency, 1 - ratio))
    cost32 = dict(costs).get(32)
    shown = ", ".join(f"{cost * 100:+.1f} % at c={c}" for c, cost in costs) or "not measured"
    if (paired := paired_stack_loss(report)) is not None:
        shown = f"{paired[1] * 100:+.1f} % at c={paired[0]} (median of paired rounds, (e)); "
        shown += "one run each: "
        shown += ", ".join(f"{cost * 100:+.1f} % at c={c}" for c, cost in costs) or "none"
        cost32 = paired[1]
    per = cpu_per_token(top32) if (top32 := _at(full, 32)) else {}
    if len(per) == len(CPU_ROLES):
        share = (per["root"] + per["gateway"]) / sum(per.values())
        shown += f" (their CPU at c=32: {share * 100:.1f} % of all, see below)"
    verdict = _verdict(None if cost32 is None else cost32 < 0.05)
    rows.append(
        ("gateway + root cost < 5 % of engine-alone tok/s (judged at c=32)", shown, verdict)
    )
    rss_target = "worker RSS < 1.5 GB at c=64 (peak VmRSS during the level)"
    rows.append(_row(rss_target, rss, "{:.0f} MiB", (rss or 0) < 1536))
    return rows


def render(report: Report) -> str:
    s = report.settings
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` on {report.started} in {report.minutes:.1f} min; rerun it "
        "to refresh this page (numbers from one run on one machine, not averages).",
        "",
        f"Exact command: `{report.command}`",
        "",
        "## Machine",
        "",
        "| CPU | cores | memory | torch | transformers | dtype | Python | OS |",
        "| --- | ---: | --- | --- | --- | --- | --- | --- |",
        f"| {report.machine['cpu']} ({report.machine['cpu_capability']}) | "
        f"{report.machine['cores']} | {report.machine['memory']} | {report.machine['torch']} | "
        f"{report.machine['transformers']} | {report.dtype} | {report.machine['python']} | "
        f"{report.machine['os']} |",
        "",
        f"Load average (1/5/15 min) before the run: {report.load_before}; after: "
        f"{report.load_after}. Anything well above 0 before means other work shared the cores.",
        "",
        "## What was run",
        "",
        f"Model SmolLM2-135M-Instruct (the default), weights de-quantized from the Q4_1 GGUF, "
        f"in {report.dtype}. Every case sees the same seeded synthetic prompts (~{s['prompt']} "
        f"words of common English, plus the chat template) and generates exactly {s['output']} "
        "tokens per request (`max_tokens` = `min_tokens`, `ignore_eos`), greedy. Closed loop: "
        "C clients each send their next request when the last one ends. Each level runs "
        f"{s['requests']} requests or at most {s['duration']} s, whichever ends first; "
        "requests still running at the cap are cancelled and counted as *cut*; their tokens "
        "up to the cap still count toward throughput, latencies count completed requests only.",
        "",
        "* **(a) engine alone**: `benchmarks/engine_alone.py` drives `llmtree.engine.Engine` "
        "in-process (no HTTP, no Pyro5); a chunk is an engine step's event for a request.",
        "* **(a0) engine alone, PyTorch path**: the same with `LLMTREE_NATIVE_KERNELS=0`: "
        "the forward without the fused CPU kernels (`src/llmtree/engine/cpu_*.c`): PyTorch "
        "operators, oneDNN for the matrix products; (a)/(a0) is what the kernels bring.",
        "* **(b) full stack**: `llmtree up --workers 1` (slapd, root, one worker, gateway) as "
        "separate processes; load through the gateway's `/v1/chat/completions` (SSE) with the "
        "`llmtree bench` load generator (`src/llmtree/bench/`).",
        "* **(e) paired rounds**: (a), (a) beside a stand-in load and (b) in turn, at c=32, "
        'six rounds; see "Paired rounds" below.',
        "* **(c) naive server**: `benchmarks/naive_server.py`, one request at a time through "
        "`transformers` `generate()` with a `TextIteratorStreamer` behind a FastAPI endpoint "
        "(a lock serialises requests; every `generate()` runs on the one thread that loaded "
        "the model, so the process has one OpenMP thread pool); same load generator.",
        "* **(d) static batches**: `benchmarks/static_batch.py`, `generate()` on left-padded "
        f"batches of size C, {s['batches']} batch(es) per size; TTFT is when the batch's first "
        "tokens appear, E2E the whole batch.",
        "",
        "The load generator runs on the same machine and cores as the server it measures.",
        "",
        "## Results",
        "",
        "Latencies are p50 / p90 / p99; TTFT, TPOT and ITL in ms, end-to-end (E2E) in s.",
        "",
    ]
    rows = [(CASE_NAMES[k], x) for k in CASE_NAMES for x in report.cases.get(k, [])]
    lines += [markdown_table(rows) if rows else "_no case was run_", ""]
    lines += _ratios(report) + _targets(report) + _cpu(report) + _stand_in(report)
    lines += _tree(report)
    lines += _failures(report)
    return "\n".join(lines).rstrip() + "\n"


def _ratios(report: Report) -> list[str]:
    levels = sorted(
        {s.concurrency for rows in report.cases.values() for s in rows if s.concurrency}
    )
    if not levels:
        return []
    lines = [
        "## Ratios (output tokens/s)",
        "",
        "| C | (b)/(c) stack vs naive | (b)/(d) stack vs static | (b)/(a) stack vs engine alone "
        "| (a)/(a0) fused kernels vs PyTorch path |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    pairs = [("b", "c"), ("b", "d"), ("b", "a"), ("a", "a0")]
    for c in levels:
        cells = [_fmt(_ratio(report, top, bottom, c), "{:.2f}×") for top, bottom in pairs]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _targets(report: Report) -> list[str]:
    lines = ["## Targets (reported, not asserted)", "", "| target | measured | |"]
    lines += ["| --- | --- | --- |"] + [f"| {t} | {m} | {v} |" for t, m, v in targets(report)]
    top = _at(report.cases.get("b"), 64)
    hwm = top.extra.get("worker_rss_hwm_mb") if top else None
    if hwm:
        lines += [
            "",
            f"Worker peak RSS over its whole life (VmHWM, loading included): {hwm:.0f} MiB.",
        ]
    return [*lines, ""]


CPU_ROLES = ("worker", "root", "gateway", "load generator")


def cpu_per_token(summary: LevelSummary) -> dict[str, float]:
    """Milliseconds of CPU per output token each process of the full stack used in a level."""
    used = summary.extra.get("cpu_s") or {}
    if not summary.output_tokens:
        return {}
    return {role: used[role] * 1000 / summary.output_tokens for role in CPU_ROLES if role in used}


def _cpu(report: Report) -> list[str]:
    rows = [(s, cpu_per_token(s)) for s in report.cases.get("b") or []]
    rows = [(s, per) for s, per in rows if len(per) == len(CPU_ROLES)]
    if not rows:
        return []
    lines = [
        "## Where the full stack's CPU goes",
        "",
        "CPU time (user + system, from `/proc/<pid>/stat`) each process of case (b) used during "
        "a level, per output token. The machine has two cores for all of them: what the root, "
        "the gateway and the load generator use is not there for the engine, so this is the "
        "cost behind (b)/(a).",
        "",
        "| level | worker ms | root ms | gateway ms | load generator ms "
        "| gateway + root, share of all |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for summary, per in rows:
        share = (per["root"] + per["gateway"]) / sum(per.values())
        cells = " | ".join(f"{per[role]:.3f}" for role in CPU_ROLES)
        lines.append(f"| {summary.label} | {cells} | {share * 100:.1f} % |")
    return [*lines, ""]


@dataclass
class PairedRound:
    number: int
    alone: LevelSummary
    loaded: LevelSummary
    full: LevelSummary

    @property
    def load_loss(self) -> float:
        return 1 - self.loaded.output_tokens_per_s / self.alone.output_tokens_per_s

    @property
    def stack_loss(self) -> float:
        return 1 - self.full.output_tokens_per_s / self.alone.output_tokens_per_s


def paired_rounds(report: Report) -> list[PairedRound]:
    """Case (e)'s complete rounds, in order."""
    found: dict[int, dict[str, LevelSummary]] = {}
    for summary in report.cases.get("e") or []:
        info = summary.extra.get("paired") or {}
        found.setdefault(int(info.get("round", 0)), {})[str(info.get("kind"))] = summary
    rounds = []
    for number, kinds in sorted(found.items()):
        if {"a", "load", "b"} <= set(kinds) and kinds["a"].output_tokens_per_s:
            rounds.append(PairedRound(number, kinds["a"], kinds["load"], kinds["b"]))
    return rounds


def paired_stack_loss(report: Report) -> tuple[int, float] | None:
    """(concurrency, median loss of (b) against (a) over case (e)'s rounds), if it ran."""
    rounds = paired_rounds(report)
    if not rounds:
        return None
    return rounds[0].full.concurrency or 0, statistics.median(r.stack_loss for r in rounds)


def _stand_in(report: Report) -> list[str]:
    """Case (e): (b) and a stand-in load against (a), in paired rounds."""
    rounds = paired_rounds(report)
    if not rounds:
        return []
    c = rounds[0].full.concurrency
    lines = [
        "## Paired rounds: the full stack and a stand-in load against the engine alone",
        "",
        "The machine's speed drifts by 10-20 % within minutes (a shared host), more than "
        f"the cost of the gateway and the root, so case (e) measures it in rounds at c={c}. The "
        "engine alone (as in (a), its own process) and the full stack (as in (b)) are both "
        "started and stay loaded; each round runs (a), then (a) beside a stand-in load, then "
        "(b), one at a time (even rounds the other way round), so a drift falls on all three "
        "alike. The target is judged on the median of the rounds' losses. The stand-in, "
        "`benchmarks/cpu_load.py`, burns the CPU that (b)'s root, gateway and load generator "
        "used in the (b) level before it (JSON work, one burst per engine step of that level): "
        "if (a) loses beside it about what (b) loses, the stack costs the engine the CPU its "
        "other processes take from the shared cores and nothing else.",
        "",
        "| round | (a) tok/s | beside the load | (b) tok/s | load's loss | (b)'s loss "
        "| load's CPU, % of the machine | set for |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rounds:
        plan = r.loaded.extra["paired"]
        share = float(r.loaded.extra.get("load_share") or 0.0)
        lines.append(
            f"| {r.number} | {r.alone.output_tokens_per_s:.1f} "
            f"| {r.loaded.output_tokens_per_s:.1f} | {r.full.output_tokens_per_s:.1f} "
            f"| {r.load_loss * 100:.1f} % | {r.stack_loss * 100:.1f} % | {share * 100:.1f} % "
            f"| {float(plan.get('target_share') or 0) * 100:.1f} % |"
        )
    for name, average in (("mean", statistics.mean), ("median", statistics.median)):
        load = average(r.load_loss for r in rounds)
        stack = average(r.stack_loss for r in rounds)
        lines.append(f"| {name} | | | | {load * 100:.1f} % | {stack * 100:.1f} % | | |")
    return [*lines, ""]


def _tree(report: Report) -> list[str]:
    if not report.tree:
        return []
    rows = [(f"{depth} level{'s' if depth > 1 else ''}", s) for depth, s in sorted(report.tree)]
    ttft = dict(tree_deltas(report.tree, ttft_p50_ms))
    placed = dict(tree_deltas(report.tree, placement_p50_ms))
    lines = [
        "## Tree overhead",
        "",
        "The same load through a root with 1, 2 and 3 levels of forwarding above the serving "
        "worker: `root → worker`, `root → fwd-1 → worker`, `root → fwd-1 → fwd-2 → worker`, "
        "each a separate process with its own Pyro5 daemon and LDAP entry, plus the gateway. "
        "The `fwd-*` nodes (`benchmarks/forwarder_node.py`) are real llmtree nodes "
        "(`NodeServer`, the same placement code) whose engine is a stand-in with its one slot "
        "always busy and no queue, so the rule forwards every request to the child, as a busy "
        "worker does, without computing anything: a really busy worker would run a model on the "
        "same two cores and blur what is measured here, the cost of one more `submit` hop. "
        "Before each run the orchestrator checks that the nodes' children form exactly that "
        "chain and that a probe request is served by `worker`.",
        "",
        "Tokens flow from the serving worker straight to the root at any depth, so only the "
        "placement (`root.submit` walking down the chain) can add to TTFT. It is timed on its "
        "own too: `root.submit` called directly over Pyro5 with one-token requests, one at a "
        "time, until the serving node's name comes back "
        f"({_probe_count(report.tree)} timed per depth, after {_warmup_count(report.tree)} "
        "untimed ones that open each hop's connection). Its p50 is what the target is judged "
        "on; the TTFT through the gateway also holds the model's prefill, whose run-to-run "
        "noise on a shared CPU is far larger than a hop.",
        "",
        markdown_table(rows, "forwarding levels"),
        "",
        "| levels | placement p50 / p90 | added | TTFT p50 (HTTP) | added |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for depth, s in sorted(report.tree):
        placement = s.extra.get("placement_ms") or {}
        p50, p90 = placement.get("p50"), placement.get("p90")
        shown = "not measured" if p50 is None else f"{p50:.2f} / {p90:.2f} ms"
        added_p = "" if depth not in placed else f"{placed[depth]:+.2f} ms"
        added_t = "" if depth not in ttft else f"{ttft[depth]:+.1f} ms"
        first = _fmt(ttft_p50_ms(s), "{:.1f} ms")
        lines.append(f"| {depth} | {shown} | {added_p} | {first} | {added_t} |")
    return [*lines, ""]


def _failures(report: Report) -> list[str]:
    if not report.failures:
        return []
    lines = ["## Cases that failed", ""]
    for case, message in report.failures.items():
        parts = [line.strip() for line in message.splitlines() if line.strip()]
        shown = parts[0] if len(parts) < 2 else f"{parts[0]} … {parts[-1]}"
        lines += [f"* {case}: `{shown[:400]}`"]
    lines += ["", f"Logs of every process: `{report.work_dir}/logs/`."]
    return [*lines, ""]


def _probe_count(tree: list[tuple[int, LevelSummary]]) -> str:
    counts = {int((s.extra.get("placement_ms") or {}).get("count") or 0) for _, s in tree}
    return " or ".join(str(c) for c in sorted(counts)) or "no probes"


def _warmup_count(tree: list[tuple[int, LevelSummary]]) -> str:
    counts = {int(s.extra.get("placement_warmup") or 0) for _, s in tree}
    return " or ".join(str(c) for c in sorted(counts)) or "no"
