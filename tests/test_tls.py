"""Mutual TLS between the tree's processes, and serpent as the only serializer.

A real TLS tree (root + one worker with the real model + gateway, certificates from a project CA
made by ``llmtree certs``) answers a request; rogue processes (tests/pyro_probe.py, each its own
OS process because Pyro5's TLS settings are per process) are refused: no certificate, a
certificate from another CA, a marshal or json serializer, a pickle payload.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import Pyro5.api
import pytest

from llmtree.config import Settings
from llmtree.registry import Registry
from llmtree.tree.client import node_uri

from cluster import REPO, Proc, free_port, llmtree_env, wait_for

PROBE = str(REPO / "tests" / "pyro_probe.py")


@dataclass
class TlsTree:
    root_uri: str
    worker_uri: str
    gateway: str
    certs: Path
    rogue: Path
    procs: dict[str, Proc]
    env: dict[str, str]

    def valid(self) -> list[str]:
        return self.files(self.certs, "node")

    def files(self, directory: Path, name: str) -> list[str]:
        return [
            "--cert",
            str(directory / f"{name}.crt"),
            "--key",
            str(directory / f"{name}.key"),
            "--ca",
            str(self.certs / "ca.crt"),  # the rogue knows our public CA certificate
        ]


def probe(*args: str, timeout_s: float = 180) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, PROBE, *args], capture_output=True, text=True, timeout=timeout_s, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def llmtree_cli(env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "llmtree", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def tls_tree(
    slapd_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsTree]:
    var = tmp_path_factory.mktemp("tls-var")
    logs = tmp_path_factory.mktemp("tls-logs")
    root_port, http_port = free_port(), free_port()
    env = llmtree_env(
        slapd_settings,
        LLMTREE_VAR_DIR=str(var),
        LLMTREE_TLS="1",
        LLMTREE_ROOT_NAME="tlsroot",
        LLMTREE_ROOT_PORT=str(root_port),
        LLMTREE_GATEWAY_PORT=str(http_port),
        LLMTREE_THREADS="1",
        LLMTREE_SLOTS="2",
        LLMTREE_DEV="1",
    )
    llmtree_cli(env, "certs", "init")
    llmtree_cli(env, "certs", "issue", "node")
    rogue_env = dict(env, LLMTREE_CERTS_DIR=str(var / "rogue"))  # a CA of its own
    llmtree_cli(rogue_env, "certs", "init")
    llmtree_cli(rogue_env, "certs", "issue", "node")
    procs: dict[str, Proc] = {}
    registry = Registry(slapd_settings)
    registry.connect(writer=False)
    try:
        procs["root"] = Proc("tlsroot", ["node", "--name", "tlsroot", "--root"], env, logs)
        wait_for(lambda: "ready at" in procs["root"].output(), 60, "TLS root")
        procs["worker"] = Proc("tlsw", ["node", "--name", "tlsw", "--parent", "tlsroot"], env, logs)

        def worker_ready() -> bool:
            assert procs["worker"].alive(), procs["worker"].output()[-3000:]
            return "ready at" in procs["worker"].output()

        wait_for(worker_ready, 300, "TLS worker")
        procs["gateway"] = Proc("tlsgw", ["gateway"], env, logs)
        gateway = f"http://127.0.0.1:{http_port}"
        wait_for(lambda: httpx.get(f"{gateway}/readyz").status_code == 200, 60, "TLS gateway")
        yield TlsTree(
            root_uri=node_uri("127.0.0.1", root_port),
            worker_uri=str(registry.lookup("tlsw").uri),
            gateway=gateway,
            certs=var / "certs",
            rogue=var / "rogue",
            procs=procs,
            env=env,
        )
    finally:
        for proc in reversed(list(procs.values())):
            proc.stop()
        registry.close()


pytestmark = [pytest.mark.ldap, pytest.mark.model, pytest.mark.slow]


def test_a_tls_tree_answers(tls_tree: TlsTree) -> None:
    answer = probe("answer", tls_tree.root_uri, "Say hello.", *tls_tree.valid())
    assert answer["ok"], answer
    result = answer["result"]
    print(f"\nTLS tree answer: {result}")
    assert result["node"] == "tlsw" and result["finish_reason"] in ("stop", "length")
    assert result["text"].strip()
    # the gateway reached the root over TLS too (readyz asks the root for its status)
    ready = httpx.get(f"{tls_tree.gateway}/readyz").json()
    assert ready["children"] == ["tlsw"]


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate"])
@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("status", "[]"),
        ("ping", "[]"),
        ("attach_child", '["evil"]'),
        ("submit", '[{"request_id": "evil-1", "messages": [{"role": "user", "content": "x"}]}]'),
    ],
)
def test_rogue_is_refused(tls_tree: TlsTree, who: str, method: str, args: str) -> None:
    creds = [] if who == "no certificate" else tls_tree.files(tls_tree.rogue, "node")
    for uri in (tls_tree.root_uri, tls_tree.worker_uri):
        answer = probe("call", uri, method, args, *creds)
        assert not answer["ok"], answer
        assert "CommunicationError" in answer["error"] or "ConnectionClosed" in answer["error"], (
            answer
        )
    status = probe("call", tls_tree.root_uri, "status", "[]", *tls_tree.valid())
    assert status["ok"] and status["result"]["children"] == ["tlsw"], status


def test_a_node_without_certificate_cannot_join(tls_tree: TlsTree, tmp_path: Path) -> None:
    env = dict(tls_tree.env, LLMTREE_TLS="0")
    rogue = Proc("evil", ["node", "--name", "evil", "--parent", "tlsroot"], env, tmp_path)
    try:
        wait_for(lambda: not rogue.alive(), 300, "the rogue node to give up")
    finally:
        rogue.stop()
    assert rogue.popen.returncode != 0
    status = probe("call", tls_tree.root_uri, "status", "[]", *tls_tree.valid())
    assert status["result"]["children"] == ["tlsw"], status
    print(f"\nrogue node's last words: {rogue.output().strip().splitlines()[-1]}")


@pytest.mark.parametrize("serializer", ["marshal", "json"])
def test_other_serializers_are_refused(tls_tree: TlsTree, serializer: str) -> None:
    answer = probe(
        "call", tls_tree.root_uri, "status", "[]", "--serializer", serializer, *tls_tree.valid()
    )
    assert not answer["ok"] and "only accepts serpent" in answer["error"], answer
    control = probe("call", tls_tree.root_uri, "status", "[]", *tls_tree.valid())
    assert control["ok"], control


@pytest.mark.parametrize("with_certificate", [True, False])
def test_a_pickle_client_is_refused(
    tls_tree: TlsTree, tmp_path: Path, with_certificate: bool
) -> None:
    marker = tmp_path / "pwned"
    creds = tls_tree.valid() if with_certificate else ["--ca", str(tls_tree.certs / "ca.crt")]
    answer = probe("pickle", tls_tree.root_uri, str(marker), *creds)
    assert not answer["ok"], answer
    assert not marker.exists(), "the root unpickled a client's payload"
    print(f"\npickle client ({'valid' if with_certificate else 'no'} certificate): {answer}")
    assert tls_tree.procs["root"].alive()
    control = probe("call", tls_tree.root_uri, "ping", "[]", *tls_tree.valid())
    assert control["ok"], control


# -- without TLS: the serializer rule holds for a plain daemon too ---------------------------
def test_plain_daemon_refuses_foreign_serializers(tmp_path: Path) -> None:
    import threading

    from llmtree.tree.client import configure_pyro

    configure_pyro(8)

    class Echo:
        @Pyro5.api.expose
        def echo(self, value: Any) -> Any:
            return value

    daemon = Pyro5.api.Daemon(host="127.0.0.1", port=0)
    uri = str(daemon.register(Echo, "echo"))
    thread = threading.Thread(target=daemon.requestLoop, daemon=True)
    thread.start()
    try:
        for serializer in ("marshal", "json"):
            answer = probe("call", uri, "echo", '["x"]', "--serializer", serializer)
            assert not answer["ok"] and "only accepts serpent" in answer["error"], answer
        marker = tmp_path / "pwned"
        answer = probe("pickle", uri, str(marker))
        assert not answer["ok"] and not marker.exists(), answer
        assert probe("call", uri, "echo", '["x"]') == {"ok": True, "result": "x"}
    finally:
        daemon.shutdown()
        thread.join(5)
