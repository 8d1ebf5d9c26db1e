"""End to end: `llmtree up` on a fresh var dir, then the official openai client, curl-like
HTTP, the CLI, bad input, a SIGKILLed worker, and Ctrl-C stopping everything."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from llmtree.config import Settings
from llmtree.errors import UnknownNode
from llmtree.registry import Registry

from cluster import REPO, Proc, free_port, model_cache, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.ldap, pytest.mark.model]

QUESTION = "What is the capital of France?"


class Stack:
    def __init__(self, proc: Proc, env: dict[str, str], settings: Settings, url: str) -> None:
        self.proc, self.env, self.settings, self.url = proc, env, settings, url
        self.key = (settings.var_dir / "dev-api-key").read_text().strip()  # made by `llmtree up`
        self.auth = {"Authorization": f"Bearer {self.key}"}

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "llmtree", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    var = tmp_path_factory.mktemp("var")
    ports = {"LDAP": free_port(), "ROOT": free_port(), "GATEWAY": free_port()}
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("LLMTREE_")}
    env.update(
        LLMTREE_VAR_DIR=str(var),
        LLMTREE_LDAP_URL=f"ldap://127.0.0.1:{ports['LDAP']}",
        LLMTREE_ROOT_PORT=str(ports["ROOT"]),
        LLMTREE_GATEWAY_PORT=str(ports["GATEWAY"]),
        LLMTREE_MODEL_CACHE=model_cache(),
        LLMTREE_NODE_TTL_S="4",
        LLMTREE_HEARTBEAT_S="1",
        PYTHONUNBUFFERED="1",
    )
    proc = Proc("up", ["up", "--workers", "2"], env, var)
    url = f"http://127.0.0.1:{ports['GATEWAY']}"

    def up() -> bool:
        assert proc.alive(), proc.output()[-4000:]
        return "llmtree is up" in proc.output()

    try:
        wait_for(up, 600, "llmtree up")
        settings = Settings(var_dir=var, ldap_url=env["LLMTREE_LDAP_URL"], node_ttl_s=4)
        yield Stack(proc, env, settings, url)
    finally:
        proc.stop(signal.SIGINT, timeout_s=40)


def test_openai_client_non_streaming(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.key)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=40
    )
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_openai_client_streaming(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.key)
    stream = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "Paris" in "".join(pieces)
    assert len([p for p in pieces if p]) > 2  # it really streamed, in pieces
    assert finish in ("stop", "length") and usage is not None


def test_raw_sse_ends_with_done(stack: Stack) -> None:
    body = {"messages": [{"role": "user", "content": "Say hi."}], "stream": True, "max_tokens": 8}
    with httpx.stream(
        "POST", f"{stack.url}/v1/chat/completions", json=body, headers=stack.auth, timeout=60
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[]", 400, None),
        (json.dumps({"messages": []}).encode(), 400, "messages"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": 9}).encode(), 400, "temperature"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}).encode(), 400, "max_tokens"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 3}).encode(), 400, "n"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), 400, None),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}).encode(), 404, "model"),
        (json.dumps({"messages": [{"role": "user", "content": "x" * 20000}], "max_tokens": 8000}).encode(), 400, None),
        (b"{" + b" " * 2_000_000 + b"}", 400, None),
    ],
)  # fmt: skip
def test_bad_input_gets_an_openai_error(
    stack: Stack, body: bytes, status: int, param: str | None
) -> None:
    r = httpx.post(
        f"{stack.url}/v1/chat/completions",
        content=body,
        headers={"Content-Type": "application/json", **stack.auth},
        timeout=30,
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] and error["param"].startswith(param)
    assert httpx.get(f"{stack.url}/healthz").status_code == 200  # and nothing broke


def test_dev_key_from_up_serves_the_api_and_the_cli(stack: Stack) -> None:
    key_file = stack.settings.var_dir / "dev-api-key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert (stack.settings.var_dir / "jwt.secret").stat().st_mode & 0o777 == 0o600
    assert stack.key.startswith("llmt-") and f"API key:    {stack.key}" in stack.proc.output()
    assert httpx.get(f"{stack.url}/v1/models").status_code == 401
    assert httpx.get(f"{stack.url}/v1/models", headers=stack.auth).status_code == 200
    chat = subprocess.run(
        [sys.executable, "-m", "llmtree", "chat", "--url", stack.url],
        input=QUESTION + "\n",
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )  # no --api-key: it comes from <var>/dev-api-key
    assert chat.returncode == 0 and "llm> " in chat.stdout, chat.stdout + chat.stderr
    # the client's own error lines, not the word inside a sampled answer ("Terror...")
    assert not re.search(r"^(you> )?error: ", chat.stdout, re.M), chat.stdout
    answer = chat.stdout.split("llm> ", 1)[1].rsplit("you> ", 1)[0]
    assert answer.strip(), chat.stdout
    listed = stack.cli("keys", "list")
    assert listed.returncode == 0 and stack.key[:9] in listed.stdout and "dev" in listed.stdout
    assert stack.key not in listed.stdout  # only the prefix is kept


def test_health_models_nodes_and_page(stack: Stack) -> None:
    assert httpx.get(f"{stack.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{stack.url}/readyz").json()
    assert ready["children"] == ["worker-1", "worker-2"]
    names = [n["name"] for n in httpx.get(f"{stack.url}/api/nodes").json()["nodes"]]
    assert names == ["root", "worker-1", "worker-2"]
    assert httpx.get(f"{stack.url}/api/nodes/worker-1").json()["parent"] == "root"
    assert httpx.get(f"{stack.url}/api/nodes/nope").status_code == 404
    page = httpx.get(f"{stack.url}/")
    assert page.status_code == 200 and "<textarea" in page.text
    assert "/v1/chat/completions" in page.text


def test_cli_views(stack: Stack) -> None:
    nodes = stack.cli("nodes")
    assert nodes.returncode == 0, nodes.stderr
    for name in ("root", "worker-1", "worker-2"):
        assert name in nodes.stdout
    moved = stack.cli("parent", "worker-2", "worker-1")
    assert moved.returncode == 0 and "root -> worker-1" in moved.stdout, moved.stderr
    tree = stack.cli("nodes").stdout.splitlines()
    depth = {
        n: next(ln.index(n + "  ") for ln in tree if n + "  " in ln)
        for n in ("root", "worker-1", "worker-2")
    }
    assert depth["root"] < depth["worker-1"] < depth["worker-2"], tree
    back = stack.cli("parent", "worker-2", "root")
    assert back.returncode == 0, back.stderr
    wait_for(
        lambda: httpx.get(f"{stack.url}/readyz").json().get("children") == ["worker-1", "worker-2"],
        15,
        "worker-2 back under root",
    )
    status = stack.cli("status", "worker-1")
    assert status.returncode == 0, status.stderr
    assert "running" in status.stdout and "worker-1" in status.stdout
    ldap = subprocess.run(
        ["ldapsearch", "-x", "-LLL", "-H", stack.settings.ldap_url, "-b", stack.settings.nodes_dn, "cn"],
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    assert {"cn: root", "cn: worker-1", "cn: worker-2"} <= set(ldap.stdout.splitlines())


def test_cli_errors_are_one_clear_line(stack: Stack) -> None:
    started = time.monotonic()
    unknown = stack.cli("node", "--name", "x1", "--parent", "nobody")
    assert unknown.returncode == 1 and "nobody" in unknown.stderr
    duplicate = stack.cli("node", "--name", "worker-1", "--parent", "root")
    assert duplicate.returncode == 1 and "already registered" in duplicate.stderr
    assert time.monotonic() - started < 30  # refused before loading the model
    dead = stack.cli("--ldap-url", f"ldap://127.0.0.1:{free_port()}", "nodes")
    assert dead.returncode == 1 and "llmtree: error:" in dead.stderr
    for result in (unknown, duplicate, dead):
        assert "Traceback" not in result.stderr
        assert len([ln for ln in result.stderr.splitlines() if "llmtree: error" in ln]) == 1


def test_killed_worker_leaves_the_directory(stack: Stack) -> None:
    registry = Registry(stack.settings)
    registry.connect(writer=False)
    try:
        pid = int(_worker_pid(stack, "worker-2"))
        subprocess.run(["kill", "-9", str(pid)], check=True)
        killed = time.monotonic()

        def gone() -> bool:
            try:
                registry.lookup("worker-2")
            except UnknownNode:
                return True
            return False

        wait_for(gone, 20, "worker-2 to leave the directory")
        assert time.monotonic() - killed <= stack.settings.node_ttl_s + 3
        # the tree still answers
        r = httpx.post(f"{stack.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 20, "temperature": 0}, headers=stack.auth, timeout=60)  # fmt: skip
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
    finally:
        registry.close()


def _worker_pid(stack: Stack, name: str) -> str:
    for line in stack.proc.output().splitlines():
        if f"started {name} (pid" in line:
            return line.rsplit("(pid ", 1)[1].rstrip(")")
    raise AssertionError(f"no pid for {name} in the output of llmtree up")


def test_ctrl_c_stops_everything(stack: Stack) -> None:
    pids = [_worker_pid(stack, n) for n in ("root", "worker-1", "gateway")]
    assert stack.proc.stop(signal.SIGINT, timeout_s=40) == 0
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        )
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{stack.url}/healthz", timeout=2)
    ldap = subprocess.run(
        ["ldapsearch", "-x", "-H", stack.settings.ldap_url, "-b", stack.settings.nodes_dn],
        capture_output=True, timeout=10,
    )  # fmt: skip
    assert ldap.returncode != 0  # `up` started slapd, so it stopped it too
