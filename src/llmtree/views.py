"""What ``llmtree nodes``, ``llmtree status`` and ``llmtree parent`` show and do."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from llmtree.config import Settings
from llmtree.registry import NodeRecord, Registry
from llmtree.tree.client import Peers


def _registry(settings: Settings) -> Registry:
    registry = Registry(settings)
    registry.connect(writer=False)
    return registry


def _label(record: NodeRecord) -> str:
    load = f"{record.load}/{record.capacity}" if record.capacity else "routes"
    return (
        f"[bold]{record.name}[/bold]  [dim]{record.status} · load {load} · "
        f"{record.model or 'root'} · {record.uri}[/dim]"
    )


def print_nodes(settings: Settings, table: bool = False) -> None:
    """The directory (ou=Nodes) as a tree under each root, or as a table."""
    registry = _registry(settings)
    try:
        records = registry.list_nodes()
    finally:
        registry.close()
    console = Console(soft_wrap=True)
    if not records:
        console.print(f"no nodes registered at {settings.ldap_url}")
        return
    if table:
        grid = Table("name", "parent", "status", "load", "capacity", "model", "uri", "heartbeat")
        for r in records:
            beat = r.heartbeat.strftime("%H:%M:%S") if r.heartbeat else ""
            grid.add_row(r.name, r.parent or "-", r.status, str(r.load), str(r.capacity),
                         r.model, r.uri, beat)  # fmt: skip
        console.print(grid)
        return
    by_parent: dict[str | None, list[NodeRecord]] = defaultdict(list)
    names = {r.name for r in records}
    for r in records:
        by_parent[r.parent if r.parent in names else None].append(r)

    def grow(branch: Tree, name: str, seen: set[str]) -> None:
        for child in by_parent.get(name, []):
            if child.name not in seen:
                seen.add(child.name)
                grow(branch.add(_label(child)), child.name, seen)

    for top in by_parent[None]:
        tree = Tree(
            _label(top)
            + ("" if top.parent is None else f"  [red](parent {top.parent} missing)[/red]")
        )
        grow(tree, top.name, {top.name})
        console.print(tree)


def print_status(settings: Settings, name: str, lines: int = 15) -> None:
    """A node's live ``status()`` and the last lines of its local log, if there is one."""
    registry = _registry(settings)
    try:
        record = registry.lookup(name)
    finally:
        registry.close()
    status = Peers(settings.call_timeout_s).call(record.uri, "status")
    console = Console()
    grid = Table(show_header=False, box=None)
    for key, value in status.items():
        shown = ", ".join(value) if isinstance(value, list) else str(value)
        grid.add_row(f"[bold]{key}[/bold]", shown or "-")
    console.print(grid)
    log = settings.var_dir / "logs" / f"{name}.log"
    if lines > 0 and log.is_file():
        console.print(f"\n[dim]last {lines} lines of {log}:[/dim]")
        for line in _tail(log, lines):
            console.print(line, markup=False, highlight=False)


def _tail(path: Path, lines: int) -> list[str]:
    with path.open("rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - 64 * 1024))
        return f.read().decode("utf-8", "replace").splitlines()[-lines:]


def move_node(settings: Settings, name: str, parent: str) -> None:
    """Ask node ``name`` to re-attach under ``parent``."""
    registry = _registry(settings)
    try:
        record = registry.lookup(name)
        registry.lookup(parent)
    finally:
        registry.close()
    result = Peers(settings.call_timeout_s).call(record.uri, "set_parent", parent)
    print(f"{name}: parent {result.get('previous')} -> {result.get('parent')}")
