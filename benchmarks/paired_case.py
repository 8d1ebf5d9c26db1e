"""Case (e) of ``make bench``: the full stack against the engine alone, in paired rounds.

A shared machine's speed drifts by 10-20 % within minutes, more than the gateway and the root
cost, so one run of (a) and one of (b) minutes apart cannot tell that cost. Here the engine alone
(``engine_alone.py --levels-on-stdin``, its own process) and the full stack are both started and
stay loaded, and each round runs, one at a time: (a), (a) beside ``cpu_load.py``, then (b) (the
reverse in even rounds). The stand-in load burns what (b)'s root, gateway and load generator
used in the (b) level before it (a first, unpaired one for round 1): their CPU seconds per
second, in one burst per engine step (that level's ITL p50). If (a) loses beside it about what
(b) loses, the stack costs the engine the CPU its other processes take from the shared cores,
and nothing else. The page judges on the median of the rounds' losses, which one round caught
in a swing of the host cannot move.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from llmtree.bench.loadgen import Level
from llmtree.bench.stats import LevelSummary

ROUNDS = 6
STAND_IN_ROLES = ("root", "gateway", "load generator")
"""The processes of (b) besides the worker, whose CPU the stand-in load takes."""
LABELS = {"a": "alone", "load": "beside the load", "b": "full stack"}
Drive = Callable[[str, list[Level], int | None, str, dict[str, int | str]], list[LevelSummary]]


class PairedRounds:
    """The rounds against a running full stack at ``url`` (``pids``: its CPU roles)."""

    def __init__(
        self, url: str, pids: dict[str, int | str], drive: Drive, log: Callable[[str], None]
    ) -> None:
        self.url, self.pids, self.drive, self.log = url, pids, drive, log
        self.worker = int(pids["worker"]) if "worker" in pids else None

    def _full_stack(self, todo: list[Level], tag: str) -> LevelSummary:
        return self.drive(self.url, todo, self.worker, tag, self.pids)[0]

    def run(
        self, todo: list[Level], alone_argv: list[str], env: dict[str, str], log_path: Path,
        limit_s: float,
    ) -> list[LevelSummary]:  # fmt: skip
        """``ROUNDS`` rounds of ``todo``'s one level; ``alone_argv`` starts the engine alone."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log_file:
            alone = subprocess.Popen(
                alone_argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log_file, text=True,
            )  # fmt: skip
            ask = Asker(alone, limit_s)
            try:
                ask.ready()
                return self._rounds(todo, ask)
            finally:
                ask.close()

    def _rounds(self, todo: list[Level], ask: Asker) -> list[LevelSummary]:
        """Odd rounds run (a), (a) beside the load, (b); even ones the reverse, so that a
        steady drift during a round adds to (b)'s loss in one and takes it off in the next."""
        cores = len(os.sched_getaffinity(0))
        last_b = self._full_stack(todo, "(e) first (b)")
        summaries = []
        for number in range(1, ROUNDS + 1):
            used = last_b.extra.get("cpu_s") or {}
            if not all(role in used for role in STAND_IN_ROLES) or not last_b.output_tokens:
                raise RuntimeError(f"no CPU figures for {STAND_IN_ROLES} in (b)")
            per_s = sum(used[r] for r in STAND_IN_ROLES) * last_b.output_tokens_per_s
            per_s /= last_b.output_tokens
            period = last_b.itl.p50 or last_b.tpot.p50 or 0.05
            burst = min(per_s * period, 0.9 * period)
            plan = {"period_ms": period * 1000, "burst_ms": burst * 1000}
            plan["target_share"] = per_s / cores
            load = f"load {period * 1000:.2f} {burst * 1000:.2f}"
            rows = {}
            for kind in LABELS if number % 2 else reversed(LABELS):
                if kind == "b":
                    rows[kind] = self._full_stack(todo, f"(e) round {number} (b)")
                else:
                    rows[kind] = ask.level("alone" if kind == "a" else load)
            last_b = rows["b"]
            for kind in LABELS:
                summary = rows[kind]
                summary.label = f"c={summary.concurrency} {LABELS[kind]} #{number}"
                summary.extra["paired"] = {**plan, "round": number, "kind": kind}
                summaries.append(summary)
            tps = " / ".join(f"{rows[kind].output_tokens_per_s:.1f}" for kind in LABELS)
            self.log(f"(e) round {number}: (a) / beside the load / (b): {tps} tok/s")
        return summaries


class Asker:
    """Levels of ``engine_alone.py --levels-on-stdin``: one command, one JSON summary back."""

    def __init__(self, proc: subprocess.Popen[str], limit_s: float) -> None:
        self.proc, self.limit_s = proc, limit_s
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="engine-alone-reader")

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self._reader.submit(self.proc.stdout.readline).result(self.limit_s)
        if not line:
            raise RuntimeError(f"engine_alone.py ended (exit {self.proc.poll()}); see its log")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"engine_alone.py: {answer['error']}")
        return answer

    def ready(self) -> None:
        self._answer()

    def level(self, command: str) -> LevelSummary:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return LevelSummary.from_dict(self._answer())

    def close(self) -> None:
        """End of input ends the engine alone; killed if it does not end in a minute."""
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.shutdown(wait=False)
