"""Routing policies side by side on a real local tree: ``seed`` against the load-aware ones.

For each policy a fresh tree is started on loopback (its own processes; one private slapd for
all), every node with ``LLMTREE_POLICY=<policy>``:

    root -> a            a: 1 slot
         -> b -> c       b, c: 1 slot each (an uneven tree: b's subtree has twice a's slots)

then the gateway, and the same closed-loop load from the bench load generator
(``llmtree.bench.loadgen``, the one ``llmtree bench`` runs) through the gateway. The seed rule
alternates at the root, so a (one slot) gets half the requests while b and c share the other
half; ``weighted-rr`` weights b's subtree by its size, ``p2c`` by the load the children report.
Printed: tokens/s, TTFT and end-to-end latency percentiles, and how many requests each worker
served; ``--json`` writes the summaries.

    python benchmarks/policy_compare.py                        # seed, weighted-rr, p2c
    python benchmarks/policy_compare.py --policies seed,p2c --requests 24 --concurrency 6
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO
from procs import Proc, base_env, free_port, http_ok, wait_for
from run_all import drive

from llmtree.bench.loadgen import Level
from llmtree.bench.stats import LevelSummary
from llmtree.bench.workload import Span, make_requests
from llmtree.config import Settings
from llmtree.gateway.keys_cli import ensure_dev_key, ensure_jwt_secret
from llmtree.registry import Registry
from llmtree.tree.client import Peers

PY = sys.executable
SHAPE = {"a": "root", "b": "root", "c": "b"}
WORKERS = ("a", "b", "c")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", default="seed,weighted-rr,p2c")
    parser.add_argument("--requests", type=int, default=36, help="requests per policy (36)")
    parser.add_argument("--concurrency", type=int, default=6, help="closed-loop clients (6)")
    parser.add_argument("--output-tokens", type=int, default=24, help="tokens per answer (24)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt tokens (32)")
    parser.add_argument("--max-queue", type=int, default=16, help="queue places per worker")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="write the summaries here")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[policy {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_policy(
    policy: str, args: argparse.Namespace, env: dict[str, str], work: Path
) -> dict[str, Any]:
    env = {**env, "LLMTREE_POLICY": policy, "LLMTREE_GATEWAY_PORT": str(free_port())}
    env["LLMTREE_ROOT_PORT"] = str(free_port())
    settings = Settings(var_dir=Path(env["LLMTREE_VAR_DIR"]), ldap_url=env["LLMTREE_LDAP_URL"])
    registry = Registry(settings)
    registry.connect(writer=False)
    peers = Peers(5.0)
    procs: list[Proc] = []

    def call(name: str, method: str) -> Any:
        return peers.call(registry.lookup(name).uri, method)

    def start(name: str, argv: list[str], timeout_s: float) -> None:
        procs.append(Proc(f"{policy}-{name}", [PY, "-m", "llmtree", *argv], env, work / "logs"))
        wait_for(lambda: call(name, "ping") == "pong", f"node {name}", procs, timeout_s)

    try:
        start("root", ["node", "--name", "root", "--root"], 120)
        for name, parent in SHAPE.items():
            start(name, ["node", "--name", name, "--parent", parent, "--slots", "1"], 600)

        def shaped() -> bool:
            return bool(
                call("root", "status")["children"] == ["a", "b"]
                and call("b", "status")["children"] == ["c"]
            )

        wait_for(shaped, "the tree's shape", procs, 60)
        env["LLMTREE_JWT_SECRET"] = ensure_jwt_secret(settings)
        os.environ["LLMTREE_API_KEY"] = ensure_dev_key(settings)  # read by the driver
        procs.append(
            Proc(f"{policy}-gateway", [PY, "-m", "llmtree", "gateway"], env, work / "logs")
        )
        url = f"http://127.0.0.1:{env['LLMTREE_GATEWAY_PORT']}"
        wait_for(lambda: http_ok(url + "/readyz"), "the gateway", procs, 120)
        time.sleep(2 * float(env["LLMTREE_HEARTBEAT_S"]))  # first load reports are in
        before = {name: call(name, "status")["served"] for name in WORKERS}
        prompt, out = (
            Span(args.prompt_tokens, args.prompt_tokens),
            Span(args.output_tokens, args.output_tokens),
        )
        specs = make_requests(args.requests, prompt, out, args.seed)
        level = Level(specs, concurrency=args.concurrency)
        summary: LevelSummary = drive(url, [level], None, f"({policy})")[0]
        served = {name: call(name, "status")["served"] - before[name] for name in WORKERS}
        return {"policy": policy, "summary": summary.to_dict(), "served": served}
    finally:
        for proc in reversed(procs):
            proc.stop()
        peers.close()
        registry.close()


def fmt(value: float | None, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.2f}"


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"{args.requests} requests, {args.concurrency} clients (closed loop), "
        f"{args.prompt_tokens} prompt / {args.output_tokens} answer tokens; "
        "root -> a, b -> c, 1 slot each",
        "",
        "| policy | ok / err | tok/s | TTFT p50 / p90 (s) | e2e p50 / p90 / p99 (s) | "
        "served a / b / c (warm-up included) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        s = result["summary"]
        ttft, e2e = s["ttft"], s["e2e"]
        served = " / ".join(str(result["served"][n]) for n in WORKERS)
        lines.append(
            f"| {result['policy']} | {s['num_ok']} / {s['num_errors']} | "
            f"{s['output_tokens_per_s']:.1f} | {fmt(ttft['p50'])} / {fmt(ttft['p90'])} | "
            f"{fmt(e2e['p50'])} / {fmt(e2e['p90'])} / {fmt(e2e['p99'])} | {served} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    with tempfile.TemporaryDirectory(prefix="llmtree-policy-") as tmp:
        work = Path(tmp)
        env = base_env(
            {
                "LLMTREE_VAR_DIR": str(work / "var"),
                "LLMTREE_LDAP_URL": f"ldap://127.0.0.1:{free_port()}",
                "LLMTREE_MODEL_CACHE": str(REPO / "var" / "models"),
                "LLMTREE_LOG_LEVEL": "WARNING",
                "LLMTREE_THREADS": "1",
                "LLMTREE_MAX_QUEUE": str(args.max_queue),
                "LLMTREE_HEARTBEAT_S": "0.5",
            }
        )
        ldap = [PY, "-m", "llmtree", "ldap"]
        started = subprocess.run(
            [*ldap, "start"], env=env, capture_output=True, text=True, timeout=60
        )
        if started.returncode != 0:
            raise SystemExit(f"slapd did not start: {started.stderr.strip()[-500:]}")
        results = []
        try:
            for policy in policies:
                log(f"policy {policy}")
                results.append(run_policy(policy, args, env, work))
        finally:
            subprocess.run([*ldap, "stop"], env=env, capture_output=True, timeout=60)
    print(table(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
