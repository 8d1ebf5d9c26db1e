"""llmtree: a chat service that runs a language model on a tree of machines."""

__version__ = "0.1.0"
