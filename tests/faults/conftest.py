"""Fault suite fixtures: a figure board printed at the end of the run, and a running tree."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llmtree.config import Settings

from .harness import TreeHarness


@pytest.fixture
def figure(request: pytest.FixtureRequest) -> Iterator[object]:
    """``figure("text")`` prints a measured figure and lists it in the run's summary."""

    def record(text: str) -> None:
        print(f"FIGURE {request.node.name}: {text}")
        request.node.user_properties.append(("figure", text))

    yield record


@pytest.fixture(scope="package")
def chain(
    slapd_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TreeHarness]:
    """root -> w1 -> w2 on loopback: w1 serves until it is full, then forwards to w2."""
    harness = TreeHarness(slapd_settings, tmp_path_factory.mktemp("chain-logs"))
    try:
        harness.start_root()
        harness.start_worker("w1", "root")
        harness.wait_ready("w1")
        harness.start_worker("w2", "w1")
        harness.wait_ready("w2")
        harness.wait_children("root", ["w1"])
        harness.wait_children("w1", ["w2"])
        yield harness
    finally:
        harness.close()
