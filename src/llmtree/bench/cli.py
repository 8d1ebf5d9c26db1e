"""``llmtree bench URL``: load test any OpenAI-compatible endpoint, level after level.

    llmtree bench                                  c=1 against http://127.0.0.1:8000
    llmtree bench --concurrency 1,8,32 --requests 64 --duration 60
    llmtree bench --rate 2,4 --duration 30         open loop, Poisson arrivals
    llmtree bench --prompt-tokens-range 16:64 --output-tokens 128 --json out.jsonl

Prints a table (and a progress bar while it runs) and can write JSON lines, one per level. The
URL must be on this machine unless ``--allow-remote`` is given, so a typo cannot load-test
someone else's server. Exits 1 when no request of any level succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from llmtree.bench.loadgen import (
    Level,
    Target,
    chat_url,
    discover_model,
    is_loopback,
    make_client,
    run_level,
)
from llmtree.bench.report import error_lines, render_table, write_jsonl
from llmtree.bench.stats import LevelSummary, RequestRecord
from llmtree.bench.workload import Span, make_requests
from llmtree.errors import ConfigError
from llmtree.gateway.keys_cli import read_dev_key

DEFAULT_URL = "http://127.0.0.1:8000"
WARMUP_OUTPUT_TOKENS = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``llmtree bench`` flags (called by ``llmtree.cli.build_parser``)."""
    add = parser.add_argument
    add(
        "url",
        nargs="?",
        default=DEFAULT_URL,
        help=f"server or endpoint URL (default {DEFAULT_URL})",
    )
    add(
        "--concurrency", metavar="C,...", help="closed loop: client counts, e.g. 1,8,32 (default 1)"
    )
    add("--rate", metavar="R,...", help="open loop: requests per second, Poisson arrivals")
    add(
        "--requests", type=int, metavar="N", help="per level (default 4x C, >= 8; open: 20 s worth)"
    )
    add("--duration", type=float, metavar="S", help="time cap per level in seconds (default none)")
    add("--prompt-tokens", type=int, default=32, metavar="N", help="prompt tokens (default 32)")
    add("--prompt-tokens-range", metavar="LOW:HIGH", help="random prompt lengths instead")
    add("--output-tokens", type=int, default=128, metavar="N", help="tokens to generate (128)")
    add("--output-tokens-range", metavar="LOW:HIGH", help="random output lengths instead")
    add("--seed", type=int, default=0, metavar="N", help="seed of the prompts and arrivals")
    add("--json", type=Path, metavar="PATH", help="also write one JSON line per level here")
    add("--model", help="model name to send (default: the first one /v1/models lists)")
    add("--warmup", type=int, default=1, metavar="N", help="requests before measuring (1)")
    add("--temperature", type=float, default=0.0, metavar="T", help="sampling temperature (0)")
    add("--timeout", type=float, default=600.0, metavar="S", help="longest wait for a read (600)")
    add(
        "--api-key",
        metavar="KEY",
        help="bearer token (default $LLMTREE_API_KEY, $OPENAI_API_KEY, <var>/dev-api-key)",
    )
    add("--allow-remote", action="store_true", help="allow a URL that is not on this machine")


@dataclass(frozen=True, slots=True)
class Plan:
    """Checked arguments: where to send what, level by level."""

    target: Target
    base_url: str
    levels: list[Level]
    warmup: Level | None
    meta: dict[str, Any]


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, e.g. 1,8,32") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} needs values of at least 1")
    return values


def _float_list(text: str, flag: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers, e.g. 2,4.5") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"{flag} needs positive numbers")
    return values


def _span(fixed: int, range_text: str | None, flag: str) -> Span:
    try:
        return Span.parse(range_text) if range_text else Span.parse(str(fixed))
    except ValueError as error:
        raise ConfigError(f"{flag}: {error}") from None


def make_plan(args: argparse.Namespace) -> Plan:
    """Check the arguments and turn them into levels; raises ConfigError naming the flag."""
    if not is_loopback(args.url) and not args.allow_remote:
        raise ConfigError(f"{args.url} is not on this machine; add --allow-remote to bench it")
    if args.rate and args.concurrency:
        raise ConfigError("give --concurrency (closed loop) or --rate (open loop), not both")
    if args.requests is not None and args.requests < 1:
        raise ConfigError("--requests must be at least 1")
    if args.duration is not None and args.duration <= 0:
        raise ConfigError("--duration must be positive")
    prompt = _span(args.prompt_tokens, args.prompt_tokens_range, "--prompt-tokens")
    output = _span(args.output_tokens, args.output_tokens_range, "--output-tokens")
    levels: list[Level] = []
    if args.rate:
        for rate in _float_list(args.rate, "--rate"):
            count = args.requests or max(16, math.ceil(rate * 20))
            specs = make_requests(count, prompt, output, args.seed)
            levels.append(Level(specs, rate=rate, duration_s=args.duration))
    else:
        for concurrency in _int_list(args.concurrency or "1", "--concurrency"):
            count = args.requests or max(8, 4 * concurrency)
            specs = make_requests(count, prompt, output, args.seed)
            levels.append(Level(specs, concurrency=concurrency, duration_s=args.duration))
    warmup = None
    if args.warmup > 0:
        short = Span(min(output.low, WARMUP_OUTPUT_TOKENS), min(output.low, WARMUP_OUTPUT_TOKENS))
        specs = make_requests(args.warmup, prompt, short, args.seed + 1)
        warmup = Level(specs, concurrency=min(args.warmup, 8), duration_s=args.duration)
    api_key = (
        args.api_key
        or os.environ.get("LLMTREE_API_KEY")
        or os.environ.get("OPENAI_API_KEY")
        or read_dev_key(Path(os.environ.get("LLMTREE_VAR_DIR") or "var"))
    )
    target = Target(chat_url(args.url), args.model, api_key, args.temperature, args.timeout)
    meta = {
        "url": target.url,
        "mode": "open" if args.rate else "closed",
        "request_prompt_tokens": str(prompt),
        "request_output_tokens": str(output),
        "seed": args.seed,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return Plan(target, args.url, levels, warmup, meta)


async def run_plan(plan: Plan, console: Console) -> tuple[Target, list[LevelSummary]]:
    """Warm up, then run every level in turn with a progress bar; returns the target used."""
    summaries: list[LevelSummary] = []
    async with make_client(plan.target.timeout_s) as client:
        target = plan.target
        if target.model is None:
            model = await discover_model(client, plan.base_url, target.api_key)
            target = replace(target, model=model)
        columns = (
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console, transient=False) as progress:
            steps = ([plan.warmup] if plan.warmup else []) + plan.levels
            for index, level in enumerate(steps):
                is_warmup = plan.warmup is not None and index == 0
                name = "warmup" if is_warmup else level.label
                task = progress.add_task(name, total=len(level.requests))

                def advance(_: RequestRecord, task_id: TaskID = task) -> None:
                    progress.advance(task_id)

                summary = await run_level(target, level, plan.meta["seed"], advance)
                if not is_warmup:
                    summaries.append(summary)
    return target, summaries


def run_bench(args: argparse.Namespace) -> int:
    """The ``llmtree bench`` command; 0 when some request succeeded, else 1."""
    plan = make_plan(args)
    console = Console(stderr=True)
    target, summaries = asyncio.run(run_plan(plan, console))
    meta = plan.meta
    title = f"{target.url}  model={target.model or '-'}"
    title += (
        f"  prompt~{meta['request_prompt_tokens']} tok  output={meta['request_output_tokens']} tok"
    )
    out = Console() if sys.stdout.isatty() else Console(width=160)
    out.print(render_table(summaries, title))
    for line in error_lines(summaries):
        console.print(f"[red]{line}[/red]")
    if args.json:
        write_jsonl(args.json, summaries, {**plan.meta, "model": target.model})
        console.print(f"wrote {args.json}")
    if not any(s.num_ok for s in summaries):
        errors = sum(s.num_errors for s in summaries)
        cut = sum(s.num_incomplete for s in summaries)
        print(
            f"llmtree bench: no request completed ({errors} failed, {cut} cut by --duration)",
            file=sys.stderr,
        )
        return 1
    return 0
