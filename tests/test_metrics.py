"""Metrics and JSON logs on a real tree: slapd, a root, one worker with the real model and a
gateway, each its own process logging JSON. A small streamed load runs through the gateway; its
``/metrics`` and the worker's own (HTTP ``metrics_port``) must show every named series with
non-zero values, and every log line must be a JSON object naming its node and, for the lines
about a request, that request's id."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from llmtree.config import Settings

from cluster import Proc, free_port, llmtree_env, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.ldap, pytest.mark.model]

NUM_REQUESTS = 6
SLOTS = 2
MAX_TOKENS = 48


@dataclass
class Tree:
    url: str
    key: str
    worker_metrics: str
    procs: dict[str, Proc]
    request_ids: list[str] = field(default_factory=list)
    during_load: dict[str, str] = field(default_factory=dict)
    """What the gateway's and the worker's /metrics said while requests were running."""


def _api_key(url: str) -> str:
    """An API key for /v1, the way a user gets one: register, log in, create a key."""
    with httpx.Client(base_url=url, timeout=30) as client:
        user = {"username": "metrics-user", "password": "metrics-password-1"}
        client.post("/api/auth/register", json=user)
        client.post("/api/auth/login", json=user).raise_for_status()
        csrf = client.cookies["llmtree_csrf"]
        reply = client.post("/api/keys", json={"name": "metrics"}, headers={"X-CSRF-Token": csrf})
        reply.raise_for_status()
        secret: str = reply.json()["secret"]
        return secret


@pytest.fixture(scope="module")
def tree(slapd_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tree]:
    logs = tmp_path_factory.mktemp("metrics-logs")
    root_port, http_port, metrics_port = free_port(), free_port(), free_port()
    env = llmtree_env(
        slapd_settings,
        LLMTREE_ROOT_PORT=str(root_port),
        LLMTREE_ROOT_NAME="mroot",
        LLMTREE_GATEWAY_PORT=str(http_port),
        LLMTREE_LOG_FORMAT="json",
        LLMTREE_DEV="1",
        LLMTREE_DATABASE_URL=f"sqlite+aiosqlite:///{logs / 'chat.db'}",
    )
    procs: dict[str, Proc] = {}
    try:
        procs["mroot"] = Proc("mroot", ["node", "--name", "mroot", "--root"], env, logs)
        wait_for(lambda: "ready at" in procs["mroot"].output(), 60, "root")
        worker_env = {
            **env,
            "LLMTREE_METRICS_PORT": str(metrics_port),
            "LLMTREE_SLOTS": str(SLOTS),
        }
        procs["mworker"] = Proc(
            "mworker", ["node", "--name", "mworker", "--parent", "mroot"], worker_env, logs
        )
        procs["gateway"] = Proc("gateway", ["gateway"], env, logs)
        url = f"http://127.0.0.1:{http_port}"

        def ready() -> bool:
            for proc in procs.values():
                assert proc.alive(), proc.output()[-3000:]
            return httpx.get(f"{url}/readyz", timeout=5).status_code == 200

        wait_for(ready, 300, "the tree to be ready")
        tree = Tree(url, _api_key(url), f"http://127.0.0.1:{metrics_port}/metrics", procs)
        _run_load(tree)
        yield tree
    finally:
        for proc in reversed(procs.values()):
            proc.stop()


def _stream_one(tree: Tree, index: int, errors: list[str]) -> None:
    body = {
        "messages": [{"role": "user", "content": f"Count from {index} to {index + 40}."}],
        "stream": True,
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "temperature": 0,
    }
    headers = {"Authorization": f"Bearer {tree.key}"}
    try:
        with httpx.stream(
            "POST", f"{tree.url}/v1/chat/completions", json=body, headers=headers, timeout=120
        ) as reply:
            if reply.status_code != 200:
                errors.append(f"{reply.status_code}: {reply.read()!r}")
                return
            rid = None
            for line in reply.iter_lines():
                if rid is None and line.startswith("data: {"):
                    rid = json.loads(line[6:])["id"]
                    tree.request_ids.append(rid)
    except httpx.HTTPError as error:
        errors.append(repr(error))


def _run_load(tree: Tree) -> None:
    """NUM_REQUESTS streamed requests at once (more than the worker's slots, so some wait);
    /metrics is read while they run."""
    errors: list[str] = []
    threads = [
        threading.Thread(target=_stream_one, args=(tree, i, errors), daemon=True)
        for i in range(NUM_REQUESTS)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        gateway = httpx.get(f"{tree.url}/metrics", timeout=10).text
        worker = httpx.get(tree.worker_metrics, timeout=10).text
        if (
            _value(gateway, "llmtree_num_requests_running", node="mworker") > 0
            and _value(gateway, "llmtree_num_requests_waiting", node="mworker") > 0
            and "gateway" not in tree.during_load
        ):
            tree.during_load["gateway"] = gateway
        if _value(worker, "llmtree_num_requests_waiting", node="mworker") > 0:
            tree.during_load.setdefault("worker", worker)
        time.sleep(0.2)
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "the load did not finish in 120 s"


_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$", re.M
)


def _value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for match in _SAMPLE.finditer(text):
        if match["name"] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match["value"])
    return total


REQUEST_SERIES = [
    "llmtree_time_to_first_token_seconds_count",
    "llmtree_time_to_first_token_seconds_sum",
    "llmtree_inter_token_latency_seconds_count",
    "llmtree_inter_token_latency_seconds_sum",
    "llmtree_e2e_request_latency_seconds_count",
    "llmtree_e2e_request_latency_seconds_sum",
    "llmtree_request_queue_time_seconds_count",
    "llmtree_request_queue_time_seconds_sum",
    "llmtree_prompt_tokens_total",
    "llmtree_generation_tokens_total",
]


def test_gateway_metrics_show_the_tree_under_load(tree: Tree) -> None:
    during = tree.during_load.get("gateway")
    assert during is not None, "the gateway never showed running and waiting requests"
    assert _value(during, "llmtree_num_requests_running", node="mworker") >= 1
    assert _value(during, "llmtree_num_requests_waiting", node="mworker") >= 1
    reply = httpx.get(f"{tree.url}/metrics", timeout=10)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    text = reply.text
    for series in REQUEST_SERIES:
        assert _value(text, series) > 0, f"{series} is zero or missing:\n{text}"
    assert _value(text, "llmtree_request_success_total", finished_reason="length") == NUM_REQUESTS
    assert _value(text, "llmtree_generation_tokens_total") == NUM_REQUESTS * MAX_TOKENS
    assert _value(text, "llmtree_e2e_request_latency_seconds_count") == NUM_REQUESTS
    assert _value(text, "llmtree_nodes_alive") >= 2  # the root and the worker (+ other tests')
    # the tree-wide queue time sums the nodes' own histograms (every request waited or not)
    assert _value(text, "llmtree_request_queue_time_seconds_count") >= NUM_REQUESTS
    assert 'llmtree_num_requests_running{node="mroot"}' in text


def test_node_metrics_over_http(tree: Tree) -> None:
    during = tree.during_load.get("worker")
    assert during is not None, "the worker never showed waiting requests"
    text = httpx.get(tree.worker_metrics, timeout=10).text
    for series in REQUEST_SERIES:
        assert _value(text, series, node="mworker") > 0, f"{series} missing:\n{text}"
    assert _value(text, "llmtree_generation_tokens_total") == NUM_REQUESTS * MAX_TOKENS
    assert _value(text, "llmtree_request_success_total", finished_reason="length") == NUM_REQUESTS
    # with 2 slots and 6 requests at once, some waited in the queue for a while
    assert _value(text, "llmtree_request_queue_time_seconds_sum") > 0.1
    assert _value(text, "llmtree_num_requests_running") == 0  # all done now
    # the TTFT/ITL the gateway sees include the hops; the node's own are not larger
    gateway = httpx.get(f"{tree.url}/metrics", timeout=10).text
    node_ttft = _value(text, "llmtree_time_to_first_token_seconds_sum")
    assert node_ttft <= _value(gateway, "llmtree_time_to_first_token_seconds_sum")


def _json_lines(proc: Proc) -> list[dict[str, object]]:
    lines = [line for line in proc.output().splitlines() if line.strip()]
    assert lines, f"{proc.name} logged nothing"
    parsed = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"{proc.name} logged a line that is not JSON: {line!r}")
        assert isinstance(record, dict)
        assert {"ts", "level", "logger", "message", "node", "request_id"} <= set(record), record
        parsed.append(record)
    return parsed


def test_json_logs_carry_node_and_request_id(tree: Tree) -> None:
    assert len(tree.request_ids) == NUM_REQUESTS, tree.request_ids
    worker = _json_lines(tree.procs["mworker"])
    root = _json_lines(tree.procs["mroot"])
    gateway = _json_lines(tree.procs["gateway"])
    assert {r["node"] for r in worker} == {"mworker"}
    assert {r["node"] for r in root} == {"mroot"}
    assert {r["node"] for r in gateway} == {"gateway"}
    for rid in tree.request_ids:
        about = [r for r in worker if rid in str(r["message"])]
        assert about, f"the worker logged nothing about {rid}"
        assert all(r["request_id"] == rid for r in about), about
        assert any(r["request_id"] == rid for r in root), f"the root logged nothing about {rid}"
