"""deploy/: the Dockerfile lints clean, compose.yaml and the Kubernetes manifests validate against
their schemas (offline: hadolint, the compose-spec and the Kubernetes schemas ship in pip
packages), the validators do catch mistakes, every container runs a real llmtree command with real
settings, the Grafana dashboard asks for series llmtree exports; and the pieces the containers rely
on: ``llmtree ldap serve``, ``--parent-from-ordinal`` and the health probe."""

from __future__ import annotations

import http.server
import json
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmtree.cli import build_parser
from llmtree.config import Settings
from llmtree.errors import ConfigError, LlmTreeError
from llmtree.metrics import (
    E2E,
    GENERATION_TOKENS,
    ITL,
    NODES_ALIVE,
    PROMPT_TOKENS,
    QUEUE,
    RUNNING,
    SUCCESS,
    TTFT,
    WAITING,
)
from llmtree.probe import probe
from llmtree.registry import NodeRecord, Registry
from llmtree.tree.ordinal import parent_of, place_by_ordinal, split_ordinal

from cluster import REPO, Proc, free_port, llmtree_env, wait_for

DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml")) + sorted(
    (DEPLOY / "k8s" / "monitoring").glob("*.yaml")
)


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=120, check=False
    )


# -- the validators, as `make deploy-check` runs them ------------------------------------------
def test_dockerfile_lints_clean() -> None:
    done = run(BIN / "hadolint", DEPLOY / "Dockerfile")
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_file_matches_the_compose_spec() -> None:
    done = run(
        BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", DEPLOY / "compose.yaml"
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_manifests_match_the_kubernetes_schemas() -> None:
    assert len(MANIFESTS) >= 9
    done = run(BIN / "kubernetes-validate", "--strict", *MANIFESTS)
    assert done.returncode == 0, done.stdout + done.stderr
    kinds = {doc["kind"] for doc in _manifests()}
    assert {
        "Namespace",
        "Secret",
        "ConfigMap",
        "Deployment",
        "StatefulSet",
        "Service",
        "Ingress",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
    } <= kinds


def test_the_validators_catch_mistakes(tmp_path: Path) -> None:
    workers = (DEPLOY / "k8s" / "30-workers.yaml").read_text()
    typo = tmp_path / "workers.yaml"
    typo.write_text(workers.replace("failureThreshold: 120", "failureTreshold: 120"))
    done = run(BIN / "kubernetes-validate", "--strict", typo)
    assert done.returncode != 0 and "failureTreshold" in done.stdout + done.stderr
    compose = tmp_path / "compose.yaml"
    compose.write_text((DEPLOY / "compose.yaml").read_text().replace("services:", "servces:"))
    assert run(
        BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", compose
    ).returncode
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM python\nRUN apt-get install curl\n")
    assert run(BIN / "hadolint", dockerfile).returncode


# -- what the files say -------------------------------------------------------------------------
def _manifests() -> list[dict[str, Any]]:
    docs = []
    for path in MANIFESTS:
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def _k8s_containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in _manifests():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                yield doc["metadata"]["name"], container


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def test_every_container_runs_a_real_llmtree_command() -> None:
    parser = build_parser()
    commands = []
    for name, container in _k8s_containers():
        if container["image"].startswith("llmtree:"):
            commands.append((f"k8s {name}", container["args"]))
    for name, service in _compose()["services"].items():
        if service["image"].startswith("llmtree:"):
            commands.append((f"compose {name}", service["command"]))
    assert len(commands) >= 9
    for where, argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: `llmtree {shlex.join(argv)}` is not a valid command")
    roles = {argv[0] for _, argv in commands}
    assert roles == {"ldap", "node", "gateway"}


def test_every_llmtree_variable_is_a_setting() -> None:
    fields = set(Settings.model_fields)
    names: set[str] = set()
    for _, container in _k8s_containers():
        names.update(env["name"] for env in container.get("env", []))
    for doc in _manifests():
        if doc["kind"] == "ConfigMap" and doc["metadata"]["namespace"] == "llmtree":
            names.update(doc["data"])
    for service in _compose()["services"].values():
        names.update(service.get("environment", {}))
    names.update(re.findall(r"(LLMTREE_\w+)=", (DEPLOY / "Dockerfile").read_text()))
    llmtree = {n for n in names if n.startswith("LLMTREE_")}
    assert len(llmtree) >= 15
    unknown = {n for n in llmtree if n.removeprefix("LLMTREE_").lower() not in fields}
    assert not unknown, f"not settings of llmtree: {unknown}"


def test_compose_starts_the_whole_tree_with_its_secrets() -> None:
    services = _compose()["services"]
    assert {"ldap", "postgres", "root", "worker-1", "worker-2", "gateway"} <= set(services)
    for name, service in services.items():
        for needed in service.get("depends_on", {}):
            assert needed in services, f"{name} depends on a missing {needed}"
    gateway = services["gateway"]["environment"]
    assert gateway["LLMTREE_DATABASE_URL"].startswith("postgresql+asyncpg://")
    assert gateway["LLMTREE_JWT_SECRET"].startswith("${LLMTREE_JWT_SECRET:?")
    assert services["ldap"]["environment"]["LLMTREE_LDAP_PASSWORD"].startswith("${")


def test_probes_hpa_and_network_policy() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _manifests()}
    worker = docs[("StatefulSet", "worker")]["spec"]["template"]
    container = worker["spec"]["containers"][0]
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # model loading
    assert {"readinessProbe", "livenessProbe"} <= set(container)
    assert container["args"][:2] == ["node", "--parent-from-ordinal"]
    assert worker["metadata"]["labels"]["llmtree.io/tree-member"] == "true"
    hpa = docs[("HorizontalPodAutoscaler", "worker")]["spec"]
    assert hpa["scaleTargetRef"]["kind"] == "StatefulSet"
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == WAITING
    policy = docs[("NetworkPolicy", "tree-members-only")]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"llmtree.io/tree-member": "true"}
    members = policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert members == {"llmtree.io/tree-member": "true"} and "ports" not in policy["ingress"][0]
    for name in ("root", "gateway"):
        labels = docs[("Deployment", name)]["spec"]["template"]["metadata"]["labels"]
        assert labels["llmtree.io/tree-member"] == "true"
    adapter = docs[("ConfigMap", "prometheus-adapter-llmtree")]["data"]["config.yaml"]
    assert yaml.safe_load(adapter)["rules"][0]["name"]["as"] == WAITING


def test_grafana_dashboard_uses_llmtree_series() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "llmtree-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = set(re.findall(r"llmtree_[a-z0-9_]+", " ".join(exprs)))
    exported = {
        RUNNING,
        WAITING,
        NODES_ALIVE,
        f"{PROMPT_TOKENS}_total",
        f"{GENERATION_TOKENS}_total",
        f"{SUCCESS}_total",
        *(f"{h}_bucket" for h in (TTFT, ITL, E2E, QUEUE)),
    }
    assert used == exported, used ^ exported


# -- --parent-from-ordinal ------------------------------------------------------------------------
@pytest.mark.parametrize("fanout", [1, 2, 3, 8])
def test_ordinals_make_a_tree_with_the_fanout(fanout: int) -> None:
    children: dict[int | None, list[int]] = {}
    for ordinal in range(200):
        parent = parent_of(ordinal, fanout)
        assert parent is None or parent < ordinal  # parents start first (OrderedReady)
        children.setdefault(parent, []).append(ordinal)
    last = max(p for p in children if p is not None)
    assert all(len(kids) == fanout for p, kids in children.items() if p != last)
    assert 1 <= len(children[last]) <= fanout
    assert children[None] == list(range(fanout))


def test_place_by_ordinal_names() -> None:
    assert place_by_ordinal("worker-0", 2, "root") == ("worker-0", "root")
    assert place_by_ordinal("worker-1", 2, "root") == ("worker-1", "root")
    assert place_by_ordinal("worker-2", 2, "root") == ("worker-2", "worker-0")
    assert place_by_ordinal("worker-5", 2, "root") == ("worker-5", "worker-1")
    assert place_by_ordinal("gpu-node-7.worker.llmtree.svc", 3, "r") == ("gpu-node-7", "gpu-node-1")
    assert split_ordinal("a-b-12") == ("a-b", 12)
    for bad in ("worker", "worker-", "-3", "worker-x"):
        with pytest.raises(ConfigError):
            split_ordinal(bad)
    with pytest.raises(ConfigError):
        parent_of(3, 0)


@pytest.mark.ldap
def test_node_parent_from_ordinal_looks_up_its_parent(slapd_settings: Settings) -> None:
    """worker-5 with fan-out 2 asks the directory for worker-1 (and says so when it is not
    there), before any model loads."""
    env = llmtree_env(slapd_settings)
    argv = [sys.executable, "-m", "llmtree", "node", "--parent-from-ordinal", "--fanout", "2"]
    done = subprocess.run(
        [*argv, "--name", "worker-5"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "no node named 'worker-1'" in done.stderr, done.stderr
    done = subprocess.run(
        [*argv, "--name", "nonumber"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and "cannot take an ordinal" in done.stderr, done.stderr


# -- llmtree ldap serve ---------------------------------------------------------------------------
@pytest.mark.ldap
def test_ldap_serve_runs_the_directory_with_the_given_password(tmp_path: Path) -> None:
    port = free_port()
    password = "a-deployment-secret-42"
    env = {
        k: v
        for k, v in llmtree_env(Settings(var_dir=tmp_path)).items()
        if k not in ("LLMTREE_LDAP_DIR", "LLMTREE_LDAP_PASSWORD")
    }
    env.update(
        LLMTREE_LDAP_URL=f"ldap://0.0.0.0:{port}",
        LLMTREE_LDAP_DIR=str(tmp_path / "ldap"),
        LLMTREE_LDAP_PASSWORD=password,
    )
    proc = Proc("ldap-serve", ["ldap", "serve"], env, tmp_path)
    try:
        wait_for(lambda: "slapd serving" in proc.output() or not proc.alive(), 60, "slapd")
        assert proc.alive(), proc.output()
        settings = Settings(
            var_dir=tmp_path, ldap_url=f"ldap://127.0.0.1:{port}", ldap_password=password
        )
        registry = Registry(settings)
        registry.connect(writer=True)  # the service account binds with the given password
        registry.register(NodeRecord(name="probe-node", uri="PYRO:llmtree.node@10.0.0.9:9101"))
        assert registry.lookup("probe-node").host == ""
        assert registry.lookup("probe-node").uri.endswith("10.0.0.9:9101")
        registry.unregister("probe-node")
        registry.close()
        wrong = Registry(settings.model_copy(update={"ldap_password": "not-it"}))
        with pytest.raises(LlmTreeError):
            wrong.connect(writer=True)
    finally:
        code = proc.stop(signal.SIGTERM)
    assert code == 0, proc.output()


# -- the health probe ------------------------------------------------------------------------------
def test_probe_answers_from_http_status() -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self.send_response(200 if self.path == "/healthz" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert probe(f"{base}/healthz")
        assert not probe(f"{base}/readyz")
        assert not probe(f"http://127.0.0.1:{free_port()}/healthz")
        done = run(sys.executable, "-m", "llmtree.probe", f"{base}/healthz")
        assert done.returncode == 0
        done = run(sys.executable, "-m", "llmtree.probe", f"{base}/other")
        assert done.returncode == 1 and "probe failed" in done.stderr
    finally:
        server.shutdown()
        thread.join(5)
