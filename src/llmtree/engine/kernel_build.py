"""Building the fused CPU kernels: once per machine, into a private cache folder.

``build()`` compiles ``cpu_kernels.c``, ``cpu_attention.c``, ``cpu_matmul.c``, ``cpu_quant.c``
and ``cpu_layers.c`` (with their headers) using the system C compiler (``cc -O3 -march=native
-fopenmp``) into a folder keyed by the sources, the flags, the compiler, the CPU and torch's
version, and returns the library's path (None without a compiler or when the build fails). The
compile takes about a second (``python -m llmtree.engine`` does it ahead of time); ``native.load``
loads what it built.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = (
    Path(__file__).with_name("cpu_kernels.c"),
    Path(__file__).with_name("cpu_attention.c"),
    Path(__file__).with_name("cpu_matmul.c"),
    Path(__file__).with_name("cpu_quant.c"),
    Path(__file__).with_name("cpu_layers.c"),
)
HEADERS = (Path(__file__).with_name("cpu_bf16.h"), Path(__file__).with_name("cpu_work.h"))
"""Included by the sources: part of what a built library is keyed by."""
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-shared", "-fPIC"]


def cache_dir() -> Path:
    """Where built kernels are kept: ``$LLMTREE_KERNEL_CACHE``, else the user's cache folder."""
    configured = os.environ.get("LLMTREE_KERNEL_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llmtree" / "kernels"


def _cpu_signature() -> str:
    """The CPU's model and feature flags: a library built with -march=native fits only those."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    keep = [
        line
        for line in text.splitlines()
        if line.startswith(("model name", "flags", "Features", "CPU part"))
    ]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _compiler_version(compiler: str) -> str:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.splitlines()[0] if done.stdout else ""


def build() -> Path | None:
    """The path of the built library, compiling it first if this machine has none yet."""
    compiler = _compiler()
    if compiler is None:
        logger.info("no C compiler found; the engine uses its PyTorch path")
        return None
    key = hashlib.sha256(
        b"\0".join(
            [
                *(source.read_bytes() for source in (*SOURCES, *HEADERS)),
                " ".join(FLAGS).encode(),
                _compiler_version(compiler).encode(),
                _cpu_signature().encode(),
                torch.__version__.encode(),
            ]
        )
    ).hexdigest()[:20]
    for folder in (cache_dir(), Path(tempfile.gettempdir()) / f"llmtree-kernels-{os.getuid()}"):
        target = folder / f"cpu_kernels-{key}.so"
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError:
            continue
        if not _is_private(folder) or (target.exists() and not _is_private(target)):
            logger.warning("not using %s: it is not owned by this user alone", folder)
            continue
        if target.is_file():
            return target
        # build beside the target and rename: nodes starting together never load a partial file
        fd, partial = tempfile.mkstemp(dir=folder, prefix=".build-", suffix=".so")
        os.close(fd)
        argv = [compiler, *FLAGS, "-o", partial, *map(str, SOURCES), "-lm"]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                logger.warning("building the CPU kernels failed:\n%s", done.stderr[-2000:])
                return None
            os.replace(partial, target)
        except (OSError, subprocess.SubprocessError) as error:
            logger.warning("building the CPU kernels failed: %s", error)
            continue
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        logger.info("built the CPU kernels into %s", target)
        return target
    return None


def _is_private(path: Path) -> bool:
    """True when ``path`` belongs to this user and nobody else may write to it: the library in
    it is loaded into the process, so a folder someone else controls must not be used."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return info.st_uid == os.getuid() and not info.st_mode & 0o022
