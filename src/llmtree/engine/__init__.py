"""The inference engine: a model, a continuous batch and the loop that runs it.

Importing this package does not import torch; ``Engine.start`` does.
"""

from llmtree.engine.engine import Engine

__all__ = ["Engine"]
