"""A stand-in for the full stack's other processes: bursts of Python CPU work at a steady rate.

Case (e) of ``make bench`` runs the engine alone beside this load, set to the CPU that the root,
the gateway and the load generator used in case (b) at the same concurrency: a burst of
``--burst-ms`` of CPU (JSON encoding and decoding of token events, as they do) every
``--period-ms`` (one engine step of (b), when each of them wakes once). If the engine alone
loses as much beside it as (b) loses against (a), the full stack's cost is the CPU its other
processes take on a shared machine, not anything else they do. Bursts are measured in this
thread's CPU time, so being preempted does not shorten them. Prints its CPU share when stopped.

    python benchmarks/cpu_load.py --period-ms 40 --burst-ms 6
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from types import FrameType
from typing import Any

from llmtree.protocol import make_event


def burn(seconds: float, work: list[dict[str, Any]]) -> None:
    """Use ``seconds`` of this thread's CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        json.loads(json.dumps(work))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--period-ms", type=float, required=True)
    parser.add_argument("--burst-ms", type=float, required=True)
    parser.add_argument("--max-s", type=float, default=1800.0, help="stop after this long")
    args = parser.parse_args()
    if not 0 < args.burst_ms < args.period_ms:
        parser.error("need 0 < --burst-ms < --period-ms")
    started, cpu0 = time.monotonic(), time.process_time()

    def stop(_signum: int, _frame: FrameType | None) -> None:
        wall, cpu = time.monotonic() - started, time.process_time() - cpu0
        cores = len(os.sched_getaffinity(0))
        print(f"cpu_load: {cpu:.2f} s of CPU in {wall:.1f} s: {100 * cpu / wall / cores:.1f} % of "
              f"the machine's {cores} cores", flush=True)  # fmt: skip
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    work = [make_event(f"chatcmpl-{i:032x}", 7, " the", [1234], node="worker-1") for i in range(32)]
    period, burst = args.period_ms / 1000, args.burst_ms / 1000
    wake = time.monotonic()
    while time.monotonic() - started < args.max_s:
        burn(burst, work)
        wake += period
        time.sleep(max(0.0, wake - time.monotonic()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
