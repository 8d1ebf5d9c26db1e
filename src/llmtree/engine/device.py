"""Where and in what precision the model runs: CUDA when present, else CPU; bf16 where it pays.

Called once by ``Engine.start`` (the thread that starts the node). Raises ConfigError for a
setting that cannot be honoured here (``device=cuda`` without a GPU, an unknown dtype).
"""

from __future__ import annotations

import logging

import torch

from llmtree.errors import ConfigError

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def choose_device(setting: str) -> torch.device:
    """``auto`` picks CUDA when a GPU is visible, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device is 'cuda' but no GPU is visible; set LLMTREE_DEVICE=cpu or auto")
    if setting != "cpu" and not setting.startswith("cuda"):
        raise ConfigError(f"device {setting!r} is unknown; use auto, cpu or cuda")
    return torch.device(setting)


def cpu_supports_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX-512 bf16 / AMX) and gets it right."""
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return False
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    if "AVX512" not in torch.backends.cpu.get_cpu_capability():
        return False
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(64, 64, generator=generator)
    b = torch.randn(64, 64, generator=generator)
    exact = a @ b
    approx = (a.bfloat16() @ b.bfloat16()).float()
    return bool(torch.allclose(approx, exact, rtol=0.05, atol=0.5))


def choose_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that has it (else fp16) and on a CPU that has it (else fp32)."""
    if setting != "auto":
        if setting not in DTYPES:
            raise ConfigError(f"dtype {setting!r} is unknown; use auto, bfloat16 or float32")
        return DTYPES[setting]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def configure_threads(num_threads: int) -> None:
    """Sets torch's intra-op threads for this process (one worker's share of the cores)."""
    torch.set_num_threads(max(1, num_threads))
    logger.info("torch uses %d threads", torch.get_num_threads())
