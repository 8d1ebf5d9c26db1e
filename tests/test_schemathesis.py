"""A property-based run over the gateway's OpenAPI spec finds no 5xx (schemathesis, pinned).

The real gateway, a real root and one worker with the real model (its context window kept small
so generated answers stay short). Three runs over every operation the spec lists: without
credentials, with an API key (``Authorization: Bearer``) and with a session cookie (+ CSRF
header). Each run is bounded in examples per operation and in time; the check is
``not_a_server_error``. The same gateway then answers an over-long prompt with 400
``context_length_exceeded``.
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
import pytest

from llmtree.config import Settings
from llmtree.gateway.schemas import chat_request_openapi

from cluster import Proc, free_port, llmtree_env, wait_for

MAX_EXAMPLES = 50
RUN_TIMEOUT_S = 540
CHAT = "/v1/chat/completions"


@dataclass
class Gateway:
    url: str
    spec: Path
    key: str
    cookies: dict[str, str]
    csrf: str
    procs: dict[str, Proc]


def _login(url: str) -> tuple[str, dict[str, str], str]:
    """Register a user, log in, make an API key: (key secret, session cookies, CSRF token)."""
    account = {"username": "fuzzer", "password": "correct horse battery"}
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/api/auth/register", json=account).status_code == 201
        login = client.post("/api/auth/login", json=account)
        assert login.status_code == 200, login.text
        cookies = dict(client.cookies.items())
        csrf = cookies["llmtree_csrf"]
        made = client.post("/api/keys", json={"name": "fuzz"}, headers={"X-CSRF-Token": csrf})
        assert made.status_code == 201, made.text
        return str(made.json()["secret"]), cookies, csrf


def _spec(url: str, path: Path) -> Path:
    """The gateway's own spec, as served."""
    spec: dict[str, Any] = httpx.get(f"{url}/openapi.json", timeout=30).json()
    path.write_text(json.dumps(spec))
    return path


def _fitted(spec_path: Path, out: Path) -> Path:
    """The spec with the chat body narrowed to answers that fit the small context window, so
    that positive examples reach the engine (sampling parameters at their bounds) and finish."""
    spec = json.loads(spec_path.read_text())
    schema = spec["paths"][CHAT]["post"]["requestBody"]["content"]["application/json"]["schema"]
    props = schema["properties"]
    props.pop("model", None)
    for name in ("max_tokens", "max_completion_tokens", "min_tokens"):
        for option in props[name]["anyOf"]:
            if option.get("type") == "integer":
                option["maximum"] = 24
    props["messages"]["maxItems"] = 2
    content = props["messages"]["items"]["properties"]["content"]["anyOf"]
    for option in content:
        if option.get("type") == "string":
            option["maxLength"] = 60
        if option.get("type") == "array":
            option["maxItems"] = 2
            option["items"]["properties"]["text"]["maxLength"] = 30
    out.write_text(json.dumps(spec))
    return out


def _errors(har: Path) -> dict[str, int]:
    """How often each 4xx message (its first words) came back from the chat route."""
    counts: dict[str, int] = {}
    for entry in json.loads(har.read_text())["log"]["entries"]:
        if not entry["request"]["url"].endswith(CHAT) or entry["response"]["status"] < 400:
            continue
        try:
            message = json.loads(entry["response"]["content"].get("text") or "{}")["error"]
            key = f"{entry['response']['status']} {message.get('param')}: "
            key += " ".join(str(message.get("message")).split()[:6])
        except (ValueError, KeyError, TypeError):
            key = str(entry["response"]["status"])
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:8])


def _statuses(har: Path) -> dict[str, dict[str, int]]:
    """``{"POST /v1/chat/completions": {"200": 12, "400": 30}, ...}`` from the run's HAR file."""
    counts: dict[str, dict[str, int]] = {}
    for entry in json.loads(har.read_text())["log"]["entries"]:
        path = httpx.URL(entry["request"]["url"]).path
        route = f"{entry['request']['method']} {path if path.startswith('/v1') else path[:24]}"
        status = str(entry["response"]["status"])
        counts.setdefault(route, {}).setdefault(status, 0)
        counts[route][status] += 1
    return {
        route: c
        for route, c in counts.items()
        if route.startswith(("POST /v1", "GET /v1")) or any(int(s) >= 500 for s in c)
    }


@pytest.fixture(scope="module")
def gateway(
    slapd_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    var = tmp_path_factory.mktemp("fuzz-var")
    logs = tmp_path_factory.mktemp("fuzz-logs")
    root_port, http_port = free_port(), free_port()
    env = llmtree_env(
        slapd_settings,
        LLMTREE_VAR_DIR=str(var),
        LLMTREE_ROOT_NAME="fuzzroot",
        LLMTREE_ROOT_PORT=str(root_port),
        LLMTREE_GATEWAY_PORT=str(http_port),
        LLMTREE_THREADS="1",
        LLMTREE_SLOTS="4",
        LLMTREE_MAX_MODEL_LEN="160",
        LLMTREE_REQUEST_TIMEOUT_S="60",
        LLMTREE_DEV="1",
    )
    procs: dict[str, Proc] = {}
    try:
        procs["root"] = Proc("fuzzroot", ["node", "--name", "fuzzroot", "--root"], env, logs)
        wait_for(lambda: "ready at" in procs["root"].output(), 60, "root")
        procs["worker"] = Proc(
            "fuzzw", ["node", "--name", "fuzzw", "--parent", "fuzzroot"], env, logs
        )

        def worker_ready() -> bool:
            assert procs["worker"].alive(), procs["worker"].output()[-3000:]
            return "ready at" in procs["worker"].output()

        wait_for(worker_ready, 300, "worker")
        procs["gateway"] = Proc("fuzzgw", ["gateway"], env, logs)
        url = f"http://127.0.0.1:{http_port}"
        wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200, 60, "gateway")
        key, cookies, csrf = _login(url)
        yield Gateway(url, _spec(url, var / "openapi.json"), key, cookies, csrf, procs)
    finally:
        for proc in reversed(list(procs.values())):
            proc.stop()


pytestmark = [pytest.mark.ldap, pytest.mark.model, pytest.mark.slow]


def test_the_chat_route_has_a_body_schema(gateway: Gateway) -> None:
    spec = json.loads(gateway.spec.read_text())
    body = spec["paths"][CHAT]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["max_tokens"]["anyOf"][0]["maximum"] > 0
    expected = chat_request_openapi()["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == set(expected["properties"])


@pytest.mark.parametrize("who", ["anonymous", "api key", "session cookie", "fitting answers"])
@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_no_5xx_over_the_spec(gateway: Gateway, who: str, tmp_path: Path) -> None:
    headers: list[str] = []
    excluded: list[str] = []
    spec, mode = gateway.spec, "all"
    if who in ("api key", "fitting answers"):
        headers = ["-H", f"Authorization: Bearer {gateway.key}"]
    if who == "fitting answers":
        spec, mode = _fitted(gateway.spec, tmp_path / "fitted.json"), "positive"
        excluded = ["--include-path", CHAT]  # only the route that reaches the engine
    elif who == "session cookie":
        cookie = "; ".join(f"{k}={v}" for k, v in gateway.cookies.items())
        headers = ["-H", f"Cookie: {cookie}", "-H", f"X-CSRF-Token: {gateway.csrf}"]
        # logging out or deleting the account would end the session the run is testing
        excluded = ["--exclude-path", "/api/auth/logout", "--exclude-path", "/api/me"]
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        str(spec),
        "--url",
        gateway.url,
        "--checks",
        "not_a_server_error",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--phases",
        "examples,coverage,fuzzing",
        "--mode",
        mode,
        "--workers",
        "1",  # 3.11 ast.parse is not thread-safe in schemathesis' coverage phase
        "--seed",
        "20261122",
        "--request-timeout",
        "90",
        "--suppress-health-check",
        "all",
        "--generation-database",
        "none",
        "--report",
        "har",
        "--report-har-path",
        str(tmp_path / "run.har"),
        *headers,
        *excluded,
    ]
    out = subprocess.run(
        command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=tmp_path
    )
    summary = [line for line in out.stdout.splitlines() if line.strip()][-12:]
    print(f"\nschemathesis ({who}):\n" + "\n".join(summary))
    statuses = _statuses(tmp_path / "run.har")
    print(f"answers by route and status: {json.dumps(statuses, sort_keys=True)}")
    print(f"chat route's refusals: {json.dumps(_errors(tmp_path / 'run.har'))}")
    assert not [s for counts in statuses.values() for s in counts if int(s) >= 500], statuses
    for name, proc in gateway.procs.items():
        assert proc.alive(), f"{name} died: {proc.output()[-3000:]}"
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]
    assert httpx.get(f"{gateway.url}/readyz").status_code == 200


def test_prompt_plus_max_tokens_over_the_window_is_400(gateway: Gateway) -> None:
    auth = {"Authorization": f"Bearer {gateway.key}"}
    body = {"messages": [{"role": "user", "content": "tell me a story " * 20}], "max_tokens": 150}
    r = httpx.post(f"{gateway.url}{CHAT}", json=body, headers=auth, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages", error
    assert "maximum context length is 160 tokens" in error["message"]
    fits = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert (
        httpx.post(f"{gateway.url}{CHAT}", json=fits, headers=auth, timeout=60).status_code == 200
    )
