"""``make bench``: every case side by side on this machine, then ``docs/benchmarks.md``.

Cases, run one after another (never two at once, so each has the machine to itself):
(a) the engine alone, (a0) the engine alone on its pure PyTorch path (no fused CPU kernels),
(b) the full stack (``llmtree up --workers 1``), (e) paired rounds at c=32 of (a), (a) beside a
stand-in load with the CPU that (b)'s root, gateway and load generator use (``cpu_load.py``)
and (b), all three in each round so that the machine's drift falls on each alike, (c) the
naive one-at-a-time ``generate()`` server, (d) static ``generate()`` batches, and ``tree``: the
same load through 1, 2 and 3 levels of forwarding above the serving worker. Everything listens
on free loopback ports, lives in a temporary directory (its own slapd, var dir and logs) and
shares the model cache ``var/models``; each process is stopped by its pid when its case ends.

    python benchmarks/run_all.py                       # the full run (about twenty minutes)
    python benchmarks/run_all.py --quick               # smoke test: c=1,2, 16 tokens
    python benchmarks/run_all.py --cases b,c --concurrency 1,8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from common import BENCH_DIR, REPO, CpuMeter, RssSampler, machine_info, now_iso, read_status_mb
from paired_case import PairedRounds
from procs import Proc, base_env, find_child, free_port, http_ok, wait_for
from tree_case import run_tree
from writeup import CASE_NAMES, Report, render

from llmtree.bench.loadgen import Level, Target, chat_url, discover_model, make_client, run_level
from llmtree.bench.report import read_jsonl
from llmtree.bench.stats import LevelSummary
from llmtree.bench.workload import Span, make_requests
from llmtree.gateway.keys_cli import read_dev_key

PY = sys.executable
ALL_CASES = ("a", "a0", "b", "e", "c", "d", "tree")


FULL = {
    "concurrency": "1,8,32,64",
    "output_tokens": 128,
    "duration": 60.0,
    "batches": 2,
    "tree_requests": 20,
    "tree_output_tokens": 32,
    "tree_probes": 200,
}
QUICK = {**FULL, "concurrency": "1,2", "output_tokens": 16, "duration": 20.0, "batches": 1}
QUICK.update({"requests": 4, "tree_requests": 4, "tree_output_tokens": 8, "tree_probes": 10})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--cases", default=",".join(ALL_CASES), help="any of a,a0,b,e,c,d,tree (default all)")
    add("--concurrency", help="closed-loop levels (default 1,8,32,64)")
    add("--output-tokens", type=int, help="tokens per request (default 128)")
    add("--prompt-tokens", type=int, default=32)
    add("--requests", type=int, help="per level (default 4x concurrency, at least 8)")
    add("--duration", type=float, help="time cap per level in seconds (default 60)")
    add("--batches", type=int, help="static batches per size, case d (default 2)")
    add("--tree-levels", default="1,2,3", help="forwarding levels above the serving worker")
    add("--tree-requests", type=int, help="requests per tree level, at c=1 (default 20)")
    add("--tree-output-tokens", type=int, help="tokens per tree request (default 32)")
    add("--tree-probes", type=int, help="placement probes per tree level (default 200)")
    add("--seed", type=int, default=0)
    add("--out", type=Path, help="markdown to write (default docs/benchmarks.md)")
    add("--quick", action="store_true", help="smoke test: c=1,2, 16 tokens, few requests")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    default_out = REPO / ("var/bench/benchmarks-quick.md" if args.quick else "docs/benchmarks.md")
    args.out = args.out or default_out
    args.case_list = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(args.case_list) - set(ALL_CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; use some of {','.join(ALL_CASES)}")
    return args


def levels(
    args: argparse.Namespace, concurrency: str, output: int, count: int | None
) -> list[Level]:
    prompt, out = Span(args.prompt_tokens, args.prompt_tokens), Span(output, output)
    result = []
    for c in (int(x) for x in concurrency.split(",")):
        specs = make_requests(count or max(8, 4 * c), prompt, out, args.seed)
        result.append(Level(specs, concurrency=c, duration_s=args.duration))
    return result


def drive(
    url: str,
    todo: list[Level],
    rss_pid: int | None,
    tag: str,
    cpu_pids: dict[str, int | str] | None = None,
) -> list[LevelSummary]:
    """The load generator against ``url``, level after level (warmed up first). With
    ``cpu_pids``, each level records the CPU seconds those processes used (``extra["cpu_s"]``;
    ``"self"`` is this process, the load generator)."""

    async def go() -> list[LevelSummary]:
        async with make_client(600.0) as client:
            key = os.environ.get("LLMTREE_API_KEY")  # set by the case from its dev key
            target = Target(chat_url(url), await discover_model(client, url, key), key)
            warm = make_requests(2, Span(8, 8), Span(8, 8), seed=99)
            await run_level(target, Level(warm, concurrency=1))
            summaries = []
            for level in todo:
                with (
                    RssSampler(rss_pid) if rss_pid else nullcontext() as rss,
                    CpuMeter(cpu_pids or {}) as cpu,
                ):
                    summary = await run_level(target, level)
                if rss is not None:
                    summary.extra["worker_rss_peak_mb"] = round(rss.peak_mb, 1)
                if cpu.used:
                    summary.extra["cpu_s"] = cpu.used
                counts = f"{summary.num_ok}/{summary.num_errors}/{summary.num_incomplete}"
                tps = summary.output_tokens_per_s
                log(f"{tag} {summary.label}: {tps:.1f} tok/s, ok/err/cut {counts}")
                summaries.append(summary)
            return summaries

    return asyncio.run(go())


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_script(
    script: str, extra: list[str], work: Path, env: dict[str, str], limit: float
) -> Path:
    """A benchmark script as a child process; returns the JSON lines it wrote."""
    name = Path(script).stem
    out, log_path = work / f"{name}.jsonl", work / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [PY, str(BENCH_DIR / script), *extra, "--json", str(out)]
    with log_path.open("wb") as log_file:
        done = subprocess.run(
            argv, env=env, stdout=log_file, stderr=subprocess.STDOUT, timeout=limit
        )
    if done.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-10:]
        raise RuntimeError(f"{script} exited with {done.returncode}:\n" + "\n".join(tail))
    return out


def script_args(args: argparse.Namespace) -> list[str]:
    return [
        "--concurrency", args.concurrency, "--output-tokens", str(args.output_tokens),
        "--prompt-tokens", str(args.prompt_tokens), "--duration", str(args.duration),
        "--seed", str(args.seed),
    ]  # fmt: skip


def case_a(args: argparse.Namespace, work: Path, env: dict[str, str]) -> list[LevelSummary]:
    extra = script_args(args) + (["--requests", str(args.requests)] if args.requests else [])
    return read_jsonl(run_script("engine_alone.py", extra, work, env, budget(args)))


def case_a0(args: argparse.Namespace, work: Path, env: dict[str, str]) -> list[LevelSummary]:
    """(a) again with the engine's pure PyTorch path: what the fused CPU kernels bring."""
    return case_a(args, work, {**env, "LLMTREE_NATIVE_KERNELS": "0"})


def case_d(args: argparse.Namespace, work: Path, env: dict[str, str]) -> list[LevelSummary]:
    extra = script_args(args) + ["--batches", str(args.batches)]
    return read_jsonl(run_script("static_batch.py", extra, work, env, budget(args)))


@contextmanager
def full_stack(work: Path, env: dict[str, str]) -> Iterator[tuple[str, dict[str, int | str]]]:
    """``llmtree up --workers 1`` until the block ends: its URL and the CPU roles' pids (the
    worker, the root, the gateway and ``"self"``, the load generator)."""
    url = f"http://127.0.0.1:{env['LLMTREE_GATEWAY_PORT']}"
    up = Proc("stack", [PY, "-m", "llmtree", "up", "--workers", "1"], env, work / "logs")
    try:
        wait_for(lambda: http_ok(url + "/readyz"), "the full stack", [up], 900)
        os.environ["LLMTREE_API_KEY"] = read_dev_key(Path(env["LLMTREE_VAR_DIR"])) or ""
        found = {
            "worker": find_child(up.pid, "--name", "worker-1"),
            "root": find_child(up.pid, "--name", "root"),
            "gateway": find_child(up.pid, "gateway"),
        }
        pids: dict[str, int | str] = {name: pid for name, pid in found.items() if pid}
        yield url, {**pids, "load generator": "self"}
    finally:
        up.stop_with_children(60)  # `llmtree up` stops its children and slapd itself
        subprocess.run([PY, "-m", "llmtree", "ldap", "stop"], env=env, capture_output=True)


def case_b(args: argparse.Namespace, work: Path, env: dict[str, str]) -> list[LevelSummary]:
    with full_stack(work, env) as (url, pids):
        worker = int(pids["worker"]) if "worker" in pids else None
        todo = levels(args, args.concurrency, args.output_tokens, args.requests)
        summaries = drive(url, todo, worker, "(b)", pids)
        if worker and summaries:
            summaries[-1].extra["worker_rss_hwm_mb"] = read_status_mb(worker, "VmHWM")
        return summaries


def case_e(args: argparse.Namespace, work: Path, env: dict[str, str]) -> list[LevelSummary]:
    """Paired rounds (``paired_case.py``) at the judged level: c=32, else the highest."""
    measured = [int(c) for c in args.concurrency.split(",")]
    concurrency = 32 if 32 in measured else max(measured)
    todo = levels(args, str(concurrency), args.output_tokens, args.requests or 2 * concurrency)
    alone = script_args(args) + ["--requests", str(len(todo[0].requests)), "--levels-on-stdin"]
    alone[alone.index("--concurrency") + 1] = str(concurrency)
    argv = [PY, str(BENCH_DIR / "engine_alone.py"), *alone]
    with full_stack(work, env) as (url, pids):
        paired = PairedRounds(url, pids, drive, log)
        return paired.run(todo, argv, env, work / "logs" / "engine_alone_paired.log", budget(args))


def case_c(args: argparse.Namespace, work: Path, env: dict[str, str]) -> list[LevelSummary]:
    port = free_port()
    argv = [PY, str(BENCH_DIR / "naive_server.py"), "--port", str(port)]
    server = Proc("naive", argv, env, work / "logs")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_ok(url + "/healthz"), "the naive server", [server], 900)
        todo = levels(args, args.concurrency, args.output_tokens, args.requests)
        return drive(url, todo, server.pid, "(c)")
    finally:
        server.stop()


def budget(args: argparse.Namespace) -> float:
    """Wall-clock bound for one scripted case: loading plus every level's cap and drain."""
    return 900.0 + len(args.concurrency.split(",")) * (float(args.duration) + 180.0)


def stack_env(work: Path, name: str) -> dict[str, str]:
    return base_env(
        {
            "LLMTREE_VAR_DIR": str(work / name),
            "LLMTREE_LDAP_URL": f"ldap://127.0.0.1:{free_port()}",
            "LLMTREE_ROOT_PORT": str(free_port()),
            "LLMTREE_GATEWAY_PORT": str(free_port()),
            "LLMTREE_MODEL_CACHE": str(REPO / "var" / "models"),
            "LLMTREE_LOG_LEVEL": "WARNING",
        }
    )


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine shows up here."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def engine_dtype() -> str:
    import torch

    from llmtree.config import Settings
    from llmtree.engine.device import choose_dtype

    try:
        dtype = choose_dtype(Settings().dtype, torch.device("cpu"))
    except Exception as error:  # the engine's API moved: say so rather than fail the run
        return f"unknown ({error})"
    return str(dtype).removeprefix("torch.")


def main() -> int:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="llmtb-"))  # short: slapd's socket path has a limit
    started = time.monotonic()
    command = "make bench  # = " + shlex.join([Path(PY).name, *sys.argv])
    settings = {
        "prompt": str(args.prompt_tokens),
        "output": str(args.output_tokens),
        "requests": str(args.requests) if args.requests else "4×C (at least 8)",
        "duration": f"{args.duration:g}",
        "batches": str(args.batches),
    }
    report = Report(command, now_iso(), machine_info(), engine_dtype(), settings)
    report.load_before, report.work_dir = load_average(), str(work)
    log(f"cases {args.case_list}, work dir {work}")
    runners = {"a": case_a, "a0": case_a0, "b": case_b, "e": case_e, "c": case_c, "d": case_d}
    for case in args.case_list:
        log(f"case {case} starts")
        try:
            if case == "tree":
                todo = levels(args, "1", args.tree_output_tokens, args.tree_requests)
                depths = [int(d) for d in args.tree_levels.split(",")]
                env = stack_env(work, "tree")
                report.tree = run_tree(depths, todo, work, env, drive, args.tree_probes)
            else:
                report.cases[case] = runners[case](args, work, stack_env(work, f"case-{case}"))
        except Exception as error:  # one failing case must not lose the others
            report.failures[CASE_NAMES.get(case, case)] = f"{type(error).__name__}: {error}"
            log(f"case {case} failed: {error}")
    report.minutes = (time.monotonic() - started) / 60
    report.load_after = load_average()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(report), encoding="utf-8")
    raw = REPO / "var" / "bench" / "last-run.jsonl"
    rows = [(CASE_NAMES[k], s) for k, rows in report.cases.items() for s in rows]
    rows += [(f"tree {depth} levels", s) for depth, s in report.tree]
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text("".join(json.dumps({"case": c, **s.to_dict()}) + "\n" for c, s in rows))
    log(f"wrote {args.out} and {raw} (logs in {work})")
    return 1 if report.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
