"""What a tree node needs from the parts it is given: its engine (a worker's) and the
registry. ``TreeNode`` depends on these, not on ``Engine`` or ``Registry``, so tests and the tree
benchmark's forwarder can hand it stand-ins."""

from __future__ import annotations

from typing import Any, Protocol

from llmtree.protocol import GenerateRequest


class EngineLike(Protocol):
    """What a node needs from its engine (``llmtree.engine.engine.Engine``)."""

    @property
    def num_running(self) -> int: ...
    @property
    def num_waiting(self) -> int: ...
    @property
    def slots(self) -> int: ...
    @property
    def model_name(self) -> str: ...
    def submit(self, request: GenerateRequest) -> int: ...
    def cancel(self, request_id: str) -> bool: ...


class Directory(Protocol):
    """What a node needs from the registry: look names up."""

    def lookup(self, name: str) -> Any: ...
    def children(self, name: str) -> list[Any]: ...
