"""Shared fixtures: a real private slapd on loopback for the whole session, and a registry."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmtree.config import Settings
from llmtree.registry import Registry
from llmtree.slapd import PrivateSlapd


def pick_free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def make_settings(var_dir: Path, port: int, **overrides: object) -> Settings:
    """Settings for a private slapd under ``var_dir`` on 127.0.0.1:``port``, isolated from env."""
    values: dict[str, object] = {
        "var_dir": var_dir,
        "ldap_dir": None,
        "ldap_url": f"ldap://127.0.0.1:{port}",
        "ldap_base": "dc=llmtree,dc=local",
        "ldap_password": "",
        "ldap_timeout_s": 3.0,
        "node_ttl_s": 2,
        "heartbeat_s": 0.5,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def free_port() -> int:
    return pick_free_port()


@pytest.fixture(scope="session")
def slapd_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings pointing at a fresh private slapd (TTL 2 s, no fsync), stopped at the end."""
    settings = make_settings(tmp_path_factory.mktemp("ldap"), pick_free_port())
    server = PrivateSlapd(settings, nosync=True)
    server.init()
    child = server.popen()
    try:
        server.wait_ready()
        yield settings
    finally:
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


@pytest.fixture
def registry(slapd_settings: Settings) -> Iterator[Registry]:
    """A connected writer; every node the test added is unregistered afterwards."""
    registry = Registry(slapd_settings)
    registry.connect()
    before = {record.name for record in registry.list_nodes()}
    try:
        yield registry
    finally:
        registry.close()
        cleaner = Registry(slapd_settings)  # the test may have closed or broken its own
        cleaner.connect()
        for record in cleaner.list_nodes():
            if record.name not in before:
                cleaner.unregister(record.name)
        cleaner.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault suite's figures (``figure`` fixture in tests/faults), read from the test reports:
    this conftest is the one pytest-xdist's controller loads, so they show with ``-n`` too."""
    lines: list[str] = []
    for outcome in ("passed", "failed", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            if getattr(report, "when", "call") != "call":
                continue
            name = str(getattr(report, "nodeid", "")).rsplit("::", 1)[-1]
            for key, value in getattr(report, "user_properties", []):
                if key == "figure":
                    lines.append(f"{name}: {value}")
    if lines:
        terminalreporter.section("fault suite figures")
        for line in lines:
            terminalreporter.write_line(line)
