"""``python -m llmtree.engine``: convert the configured model into the cache once.

``make run`` and ``make test`` call this so the first node start does not pay the GGUF
conversion (about half a minute); it is a no-op when the cache is already there. It also builds
the fused CPU kernels for this machine (about a second, once) where they apply.
"""

from __future__ import annotations

import sys
import time

from llmtree.config import Settings
from llmtree.engine import kernel_build
from llmtree.engine.loader import prepare, resolve
from llmtree.errors import LlmTreeError


def main() -> int:
    settings = Settings()
    started = time.monotonic()
    try:
        source = resolve(settings.model)
        folder = prepare(source, settings.model_cache_dir, lambda m: print(m, flush=True))
    except LlmTreeError as error:
        print(f"llmtree: error: {error.message}", file=sys.stderr)
        return 1
    print(f"model {source.name} ready in {folder} ({time.monotonic() - started:.1f} s)")
    if settings.native_kernels:
        library = kernel_build.build()
        print(f"CPU kernels: {library}" if library else "CPU kernels: none (PyTorch path)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
