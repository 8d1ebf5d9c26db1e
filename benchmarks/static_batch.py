"""Baseline (d): plain ``transformers`` ``generate()`` on static, left-padded batches.

At each concurrency C the same C prompts the load generator would send are tokenized together
(left padding) and generated in one call with ``min_new_tokens = max_new_tokens``, so every row
makes exactly the requested number of tokens; the batch ends when all rows do. A streamer
records when each step's tokens appear, so TTFT, TPOT and ITL come out of the same ``stats``
code as the served cases (every row of a batch shares its times). No HTTP, no queueing: this is
the best a fixed batch does, and what continuous batching is measured against.

    python benchmarks/static_batch.py --concurrency 1,8 --output-tokens 128 --json out.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import chat_text, load_model, read_status_mb
from transformers.generation.streamers import BaseStreamer

from llmtree.bench.report import render_table, write_jsonl
from llmtree.bench.stats import LevelSummary, RequestRecord, summarize
from llmtree.bench.workload import Span, make_requests


class StepTimes(BaseStreamer):
    """Records the time of each generated step (``generate`` first puts the prompt: skipped)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value: Any) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_batch(model: Any, tokenizer: Any, prompts: list[str], tokens: int) -> list[RequestRecord]:
    """One static batch; returns one record per row."""
    texts = [chat_text(tokenizer, p) for p in prompts]
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    streamer = StepTimes()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
        )
    end = time.perf_counter()
    made = int(out.shape[1] - inputs["input_ids"].shape[1])
    return [
        RequestRecord(start=start, chunk_times=list(streamer.times), end=end, output_tokens=made)
        for _ in prompts
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,8,32,64", help="batch sizes")
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, default=2, help="batches per size (default 2)")
    parser.add_argument("--duration", type=float, default=60.0, help="no new batch after this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", help="bfloat16 or float32 (default: as llmtree)")
    parser.add_argument("--json", type=Path, help="write one JSON line per size here")
    args = parser.parse_args()
    model, tokenizer, info = load_model(args.dtype)
    tokenizer.padding_side = "left"
    print(f"static: loaded {info['source']} ({info['dtype']})", file=sys.stderr)
    run_batch(model, tokenizer, ["warm up"], 4)
    prompt = Span(args.prompt_tokens, args.prompt_tokens)
    output = Span(args.output_tokens, args.output_tokens)
    summaries: list[LevelSummary] = []
    for size in (int(c) for c in args.concurrency.split(",")):
        specs = make_requests(size, prompt, output, args.seed)
        records: list[RequestRecord] = []
        latencies: list[float] = []
        started = time.perf_counter()
        for _ in range(args.batches):
            batch = run_batch(model, tokenizer, [s.prompt for s in specs], args.output_tokens)
            records += batch
            latencies.append(round((batch[0].end or 0) - batch[0].start, 3))
            if time.perf_counter() - started > args.duration:
                break
        summary = summarize(records, f"c={size}", started, concurrency=size)
        summary.extra = {"batch_latency_s": latencies, **info}
        summaries.append(summary)
        print(f"static: c={size}: {summary.output_tokens_per_s:.1f} tok/s", file=sys.stderr)
    summaries[-1].extra["rss_peak_mb"] = read_status_mb("self", "VmHWM")
    if args.json:
        write_jsonl(args.json, summaries, {"case": "static-batch"})
    from rich.console import Console

    Console(stderr=True, width=160).print(render_table(summaries, "static batches"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
