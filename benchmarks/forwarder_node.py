"""A real llmtree node that never serves: it always forwards to its child (tree overhead bench).

It is ``llmtree node`` (the same ``NodeServer``: Pyro5 daemon, LDAP entry, heartbeat, attach to
the parent) with one difference: its engine is a stand-in whose one slot is always taken and
whose queue is empty (``max_queue`` 0), so the placement rule always sends a request on to the
child, exactly as a busy worker does, while the node computes nothing. A busy real worker
would also be running a model on the same two cores as the serving worker and blur the
measurement; this one adds only what the tree adds: one more ``submit`` hop.

    python benchmarks/forwarder_node.py --name fwd-1 --parent root
"""

from __future__ import annotations

import argparse

from llmtree.cli import configure_logging
from llmtree.config import Settings
from llmtree.errors import Overloaded
from llmtree.protocol import GenerateRequest
from llmtree.tree.server import NodeServer


class AlwaysFullEngine:
    """The engine interface a node needs, with its single slot forever busy."""

    def __init__(self, model_name: str) -> None:
        self._model_name = model_name

    @property
    def num_running(self) -> int:
        return 1

    @property
    def num_waiting(self) -> int:
        return 0

    @property
    def slots(self) -> int:
        return 1

    @property
    def model_name(self) -> str:
        return self._model_name

    def submit(self, request: GenerateRequest) -> int:
        raise Overloaded("a forwarder node serves nothing")

    def cancel(self, request_id: str) -> bool:
        return False

    def stop(self) -> None:
        pass


class ForwarderServer(NodeServer):
    def _start_engine(self) -> None:
        self.engine = AlwaysFullEngine("SmolLM2-135M-Instruct")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--parent", required=True)
    args = parser.parse_args()
    configure_logging(f"[{args.name}]")
    settings = Settings(max_queue=0, slots=1)
    ForwarderServer(settings, args.name, args.parent, is_root=False).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
