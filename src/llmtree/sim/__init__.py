"""A discrete-event model of the llmtree tree, for trees far larger than one machine holds.

``llmtree simulate`` builds a tree (depth and fan-out, or a node count), sends it Poisson
arrivals, places each request with the real placement rule (``seed``: a node with a free slot
serves, else round robin over its children, a busy leaf queues) or a load-aware alternative
(``p2c``, ``least-loaded``), and runs every serving node as a continuous batch whose aggregate
token rate at k running requests is the one measured on a real node (``calibration.json``).

    params.py       SimConfig: every knob, with a default and a line of doc
    calibration.py  the measured tokens/s curve and what it implies per request
    topology.py     the tree's shape: parents, children, depths, subtree sizes
    placement.py    the routing policies over the simulator's live state
    model.py        the event loop: arrivals, placements, batches, completions
    results.py      percentiles, load spread, the JSON record of a run
    cli.py          the ``llmtree simulate`` command: flags, sweeps, table, JSON lines
"""

from llmtree.sim.model import simulate, simulate_detailed
from llmtree.sim.params import SimConfig
from llmtree.sim.results import SimResult

__all__ = ["SimConfig", "SimResult", "simulate", "simulate_detailed"]
