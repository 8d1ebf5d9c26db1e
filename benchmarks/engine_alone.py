"""Baseline (a): llmtree's engine alone, driven in-process with no HTTP, Pyro5 or tree.

The same closed loop as the load generator: C requests in flight, each replaced by the next as
it ends, for the same seeded prompts and output lengths (``max_tokens = min_tokens``,
``ignore_eos``). The engine calls back once per step from its thread; the callback only stamps
the time and queues the events, and this thread does the bookkeeping and submits, so the
measurement adds nothing to the engine's step. A chunk is an event that carried tokens.

    python benchmarks/engine_alone.py --concurrency 1,8 --output-tokens 128 --json out.jsonl

With ``--levels-on-stdin`` (case (e) of ``make bench``) it loads the engine once and runs the
one level it is given each time it reads a command (see ``serve_levels``), so that the
orchestrator can interleave it with other measurements.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import BENCH_DIR, RssSampler, cpu_seconds, read_status_mb

from llmtree.bench.report import render_table, write_jsonl
from llmtree.bench.stats import LevelSummary, RequestRecord, summarize
from llmtree.bench.workload import RequestSpec, Span, make_requests
from llmtree.config import Settings
from llmtree.engine.engine import Engine
from llmtree.protocol import GenerateRequest, SamplingParams

Batch = tuple[float, list[dict[str, Any]]]
DRAIN_S = 30.0


class Driver:
    """Keeps C requests in the engine and records what comes back."""

    def __init__(self, engine: Engine, inbox: queue.Queue[Batch]) -> None:
        self.engine, self.inbox = engine, inbox
        self.count = 0

    def submit(self, spec: RequestSpec, records: dict[str, RequestRecord]) -> None:
        self.count += 1
        rid = f"bench-{self.count}"
        n = spec.output_tokens
        sampling = SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0)
        messages = [{"role": "user", "content": spec.prompt}]
        records[rid] = RequestRecord(start=time.perf_counter())
        self.engine.submit(GenerateRequest(rid, messages, sampling))

    def run_level(self, specs: list[RequestSpec], concurrency: int, cap_s: float) -> LevelSummary:
        records: dict[str, RequestRecord] = {}
        todo = iter(specs)
        start = time.perf_counter()
        deadline = start + cap_s
        for spec in [s for _, s in zip(range(concurrency), todo, strict=False)]:
            self.submit(spec, records)
        in_flight = len(records)
        cut = False
        while in_flight:
            try:
                stamp, events = self.inbox.get(timeout=max(0.01, deadline - time.perf_counter()))
            except queue.Empty:
                stamp, events = time.perf_counter(), []
            if stamp >= deadline and not cut:
                cut = True
                for rid, running in records.items():
                    if running.end is None:
                        self.engine.cancel(rid)
            for event in events:
                record = records.get(event["request_id"])
                if record is None:
                    continue
                if event["token_ids"] and not cut:
                    record.chunk_times.append(stamp)
                    record.output_tokens += len(event["token_ids"])
                if event["finish_reason"] is None:
                    continue
                in_flight -= 1
                if not cut:
                    record.end = stamp
                    usage = event.get("usage") or {}
                    record.output_tokens = usage.get("completion_tokens", record.output_tokens)
                    if event["finish_reason"] == "error":
                        record.error = str(event.get("error") or "engine error")
                    next_spec = next(todo, None)
                    if next_spec is not None:
                        self.submit(next_spec, records)
                        in_flight += 1
            if cut and time.perf_counter() > deadline + DRAIN_S:
                raise RuntimeError("the engine did not end cancelled requests in time")
        return summarize(
            records.values(), f"c={concurrency}", start, deadline if cut else None, concurrency
        )


def serve_levels(
    driver: Driver, specs: list[RequestSpec], concurrency: int, duration: float
) -> None:
    """``--levels-on-stdin``: one level per line read, ``alone`` or ``load PERIOD_MS BURST_MS``
    (beside ``cpu_load.py``), each answered with its summary as one JSON line on stdout."""
    print(json.dumps({"ready": True}), flush=True)
    cores = len(os.sched_getaffinity(0))
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["alone"]:
            summary = driver.run_level(specs, concurrency, duration)
        elif words[:1] == ["load"] and len(words) == 3:
            argv = [sys.executable, str(BENCH_DIR / "cpu_load.py")]
            argv += ["--period-ms", words[1], "--burst-ms", words[2]]
            load = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
            try:
                started, cpu0 = time.perf_counter(), cpu_seconds(load.pid) or 0.0
                summary = driver.run_level(specs, concurrency, duration)
                cpu = (cpu_seconds(load.pid) or 0.0) - cpu0
                wall = time.perf_counter() - started
            finally:
                load.terminate()
                load.wait(10)
            summary.extra["load_share"] = round(cpu / wall / cores, 4)
        else:
            print(json.dumps({"error": f"unknown command {line.strip()!r}"}), flush=True)
            continue
        print(json.dumps(summary.to_dict()), flush=True)
        tps = summary.output_tokens_per_s
        print(f"engine: c={concurrency} {words[0]}: {tps:.1f} tok/s", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, help="per level (default 4x concurrency, >= 8)")
    parser.add_argument("--duration", type=float, default=60.0, help="time cap per level, s")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--levels-on-stdin", action="store_true", help="a level per command")
    args = parser.parse_args()
    logging.basicConfig(level=os.environ.get("LLMTREE_LOG_LEVEL", "WARNING"), stream=sys.stderr)
    inbox: queue.Queue[Batch] = queue.Queue()
    engine = Engine(Settings(), "bench", on_events=lambda ev: inbox.put((time.perf_counter(), ev)))
    engine.start(progress=lambda message: print(f"engine: {message}", file=sys.stderr))
    driver = Driver(engine, inbox)
    prompt = Span(args.prompt_tokens, args.prompt_tokens)
    output = Span(args.output_tokens, args.output_tokens)
    summaries: list[LevelSummary] = []
    try:
        warm = make_requests(args.warmup, prompt, Span(16, 16), args.seed + 1)
        if warm:
            driver.run_level(warm, 1, args.duration)
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            count = args.requests or max(8, 4 * concurrency)
            specs = make_requests(count, prompt, output, args.seed)
            if args.levels_on_stdin:
                serve_levels(driver, specs, concurrency, args.duration)
                return 0
            with RssSampler(os.getpid()) as rss:
                summary = driver.run_level(specs, concurrency, args.duration)
            summary.extra["rss_peak_mb"] = round(rss.peak_mb, 1)
            summaries.append(summary)
            tps = summary.output_tokens_per_s
            print(f"engine: c={concurrency}: {tps:.1f} tok/s", file=sys.stderr)
    finally:
        engine.stop()
    summaries[-1].extra["rss_hwm_mb"] = read_status_mb("self", "VmHWM")
    if args.json:
        write_jsonl(args.json, summaries, {"case": "engine-alone"})
    from rich.console import Console

    Console(stderr=True, width=160).print(render_table(summaries, "engine alone"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
