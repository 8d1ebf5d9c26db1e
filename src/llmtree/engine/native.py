"""The fused CPU kernels (``cpu_kernels.c``, ``cpu_attention.c``, ``cpu_matmul.c``,
``cpu_quant.c``, ``cpu_layers.c``), called through ctypes.

``load()`` has ``kernel_build.build`` compile them once per machine and returns ``CpuKernels``,
or None when there is no compiler or the build fails; the forward then keeps its PyTorch path.
The library is loaded after torch, so its OpenMP calls use the OpenMP runtime torch already
holds (same soname): one thread pool per process, not two.

Every wrapper takes bf16 tensors on the CPU, contiguous where documented; the callers (the Llama
forward and the sampler, on the engine loop thread) guarantee shapes and dtypes.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
from typing import Any

import torch

from llmtree.engine import kernel_build

logger = logging.getLogger(__name__)

KEY_BLOCK = 16
"""Positions per block of the key cache layout of ``cpu_attention.c``; the cache's length is a
multiple of it."""
_lock = threading.Lock()
_loaded: dict[str, CpuKernels | None] = {}

_p = ctypes.c_void_p
_i = ctypes.c_int64
_f = ctypes.c_float
_c = ctypes.c_int
SIGNATURES: dict[str, list[type]] = {
    "lt_rms_norm": [_p, _i, _p, _p, _i, _i, _f, _c],
    "lt_add_rms_norm": [_p, _p, _p, _p, _i, _i, _f, _c],
    "lt_silu_mul": [_p, _p, _i, _i, _c],
    "lt_argmax": [_p, _i, _i, _p],
    "lt_rope_attention": [_p, _p, _p, _p, _p, _p, _i, _i, _i, _i, _p, _p, _i, _i, _f, _p, _c],
    "lt_amx_pack": [_p, _i, _i, _p],
    "lt_amx_linear": [_p, _i, _i, _p, _i, _i, _p, _i, _c],
    "lt_q8_linear": [_p, _i, _i, _p, _p, _i, _i, _p, _i, _c],
    "lt_q4_linear": [_p, _i, _i, _p, _i, _i, _p, _i, _c],
}
AMX_BLOCK = 32
"""Output columns and inputs of a weight must be multiples of this for ``amx_linear``."""
Q8_GROUP = 32
"""Inputs per scale of the 8-bit weights of ``q8_linear`` (llama.cpp's Q8_0 block)."""
Q4_GROUP = 32
"""Inputs per scale and minimum of the 4-bit weights of ``q4_linear`` (llama.cpp's Q4_1 block)."""
Q4_LANES = 16
"""Outputs per block of the packed 4-bit weights; their number must be a multiple of it."""
Q4_STRIDE = Q4_GROUP // 2 * Q4_LANES + 4 * Q4_LANES
"""Bytes per group of a block: the 4-bit values, then float16 scales and minimums."""


class CpuKernels:
    """Typed entry points of the library; arguments are tensors, results are written in place."""

    def __init__(self, library: ctypes.CDLL) -> None:
        for name, argtypes in SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes = argtypes
            function.restype = None
        for probe in (library.lt_amx_init, library.lt_q8_fast, library.lt_q4_fast):
            probe.argtypes = []
            probe.restype = ctypes.c_int
        library.lt_layers.argtypes = [_p, _i, _p, _c]
        library.lt_layers.restype = ctypes.c_int
        self._lib = library
        self.has_amx = library.lt_amx_init() == 0
        """True when this CPU, compiler and kernel let the process use the AMX tiles."""
        self.has_q8 = library.lt_q8_fast() == 1
        """True when ``q8_linear`` runs on vector instructions here (AVX-512)."""
        self.has_q4 = library.lt_q4_fast() == 1
        """True when ``q4_linear`` runs on vector instructions here (AVX-512 VNNI)."""

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[rows, dim]`` (rows may be strided) -> ``out`` (or a new tensor), contiguous."""
        rows, dim = x.shape
        assert x.stride(1) == 1
        out = torch.empty((rows, dim), dtype=x.dtype) if out is None else out
        threads = torch.get_num_threads()
        self._lib.lt_rms_norm(
            x.data_ptr(), x.stride(0), weight.data_ptr(), out.data_ptr(), rows, dim, eps, threads
        )
        return out

    def add_rms_norm(
        self,
        x: torch.Tensor,
        delta: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x += delta`` in place (both contiguous ``[rows, dim]``), then ``rms_norm(x)`` into
        ``out`` (or a new tensor)."""
        rows, dim = x.shape
        out = torch.empty((rows, dim), dtype=x.dtype) if out is None else out
        threads = torch.get_num_threads()
        self._lib.lt_add_rms_norm(
            x.data_ptr(),
            delta.data_ptr(),
            weight.data_ptr(),
            out.data_ptr(),
            rows,
            dim,
            eps,
            threads,
        )
        return out

    def silu_mul(self, gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``[rows, 2 * inter]`` (gate then up) -> ``silu(gate) * up`` in ``out`` (or new)."""
        rows, width = gate_up.shape
        if out is None:
            out = torch.empty((rows, width // 2), dtype=gate_up.dtype)
        threads = torch.get_num_threads()
        self._lib.lt_silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, width // 2, threads)
        return out

    def rope_attention(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
        lengths: torch.Tensor,
        heads: int,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        out: torch.Tensor,
        threads: int | None = None,
    ) -> None:
        """One layer's attention for every row of ``qkv`` (``[rows, heads + 2 kv_heads,
        head_dim]``, contiguous): rotates q and k in place, writes k and v into the layer's cache
        at ``(slots, positions)`` (keys in the blocked layout), then each row attends to the
        first ``lengths[row]`` positions of its slot, into ``out`` ``[rows, heads * head_dim]``."""
        num_slots, kv_heads, max_len, head_dim = k_cache.shape
        self._lib.lt_rope_attention(
            qkv.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            slots.data_ptr(),
            positions.data_ptr(),
            lengths.data_ptr(),
            qkv.shape[0],
            heads,
            kv_heads,
            head_dim,
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            num_slots,
            max_len,
            head_dim**-0.5,
            out.data_ptr(),
            torch.get_num_threads() if threads is None else threads,
        )

    def amx_fits(self, weight: torch.Tensor) -> bool:
        """True when ``amx_linear`` can multiply by ``weight`` ``[out, in]`` on this machine."""
        out_features, in_features = weight.shape
        return self.has_amx and out_features % AMX_BLOCK == 0 and in_features % AMX_BLOCK == 0

    def amx_pack(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (bf16 ``[out, in]``, ``amx_fits``) in the tile layout of ``amx_linear``."""
        out_features, in_features = weight.shape
        dense = weight.detach().to(torch.bfloat16).contiguous()
        packed = torch.empty((out_features, in_features), dtype=torch.bfloat16)
        self._lib.lt_amx_pack(dense.data_ptr(), out_features, in_features, packed.data_ptr())
        return packed

    def amx_linear(
        self, x: torch.Tensor, packed: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x @ weight.T`` for ``x`` ``[rows, in]`` (rows may be strided) and ``packed`` from
        ``amx_pack``, into ``out`` ``[rows, out]`` (or a new tensor)."""
        assert x.stride(1) == 1 and x.shape[1] == packed.shape[1]
        out = _product_out(x.shape[0], packed.shape[0], out)
        self.amx_product(packed)(x, out)
        return out

    def amx_product(self, packed: torch.Tensor) -> Product:
        """``amx_linear`` by ``packed`` (from ``amx_pack``), checked once for many calls."""
        assert packed.dtype == torch.bfloat16 and packed.is_contiguous()
        out_features, in_features = packed.shape
        return Product(self._lib.lt_amx_linear, packed, out_features, in_features)

    def q8_linear(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        scales: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x @ weight.T`` for bf16 ``x`` ``[rows, in]`` (rows may be strided) and ``weight = q *
        scales``, each scale repeated over its group of ``Q8_GROUP`` inputs:
        ``q`` int8 ``[out, in]``, ``scales`` float32 ``[out, in / Q8_GROUP]``. Into ``out``
        ``[rows, out]`` bf16 (or a new tensor)."""
        rows, in_features = x.shape
        out_features = q.shape[0]
        assert x.stride(1) == 1 and x.dtype == torch.bfloat16
        assert q.dtype == torch.int8 and q.shape[1] == in_features and q.is_contiguous()
        assert scales.dtype == torch.float32 and scales.is_contiguous()
        assert scales.shape == (out_features, in_features // Q8_GROUP)
        out = _product_out(rows, out_features, out)
        if rows == 0:
            return out
        self._lib.lt_q8_linear(
            x.data_ptr(),
            x.stride(0),
            rows,
            q.data_ptr(),
            scales.data_ptr(),
            out_features,
            in_features,
            out.data_ptr(),
            out.stride(0),
            torch.get_num_threads(),
        )
        return out

    def q4_linear(
        self, x: torch.Tensor, packed: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x @ weight.T`` for bf16 ``x`` ``[rows, in]`` (rows may be strided) and a 4-bit
        ``weight`` packed by ``linear.to_q4``, into ``out`` ``[rows, out]`` bf16 (or a new
        tensor)."""
        product = self.q4_product(packed)
        assert x.stride(1) == 1 and x.dtype == torch.bfloat16
        assert x.shape[1] == product.in_features
        out = _product_out(x.shape[0], product.out_features, out)
        product(x, out)
        return out

    def q4_product(self, packed: torch.Tensor) -> Product:
        """``q4_linear`` by ``packed`` (uint8 ``[out / Q4_LANES, in / Q4_GROUP * Q4_STRIDE]``,
        from ``linear.to_q4``), checked once for many calls."""
        assert packed.dtype == torch.uint8 and packed.is_contiguous() and packed.dim() == 2
        assert packed.shape[1] % Q4_STRIDE == 0
        out_features = packed.shape[0] * Q4_LANES
        in_features = packed.shape[1] // Q4_STRIDE * Q4_GROUP
        return Product(self._lib.lt_q4_linear, packed, out_features, in_features)

    def run_layers(self, layers: int, count: int, step: int) -> bool:
        """``lt_layers`` (``cpu_layers.c``) on the addresses of its structures, as
        ``native_layers.NativeLayers`` makes them; False where a weight lacked a form."""
        return int(self._lib.lt_layers(layers, count, step, torch.get_num_threads())) == 0

    def argmax(self, logits: torch.Tensor) -> list[int]:
        """First index of each row's largest value (``[rows, vocab]``, contiguous)."""
        rows, vocab = logits.shape
        out = torch.empty(rows, dtype=torch.int64)
        self._lib.lt_argmax(logits.data_ptr(), rows, vocab, out.data_ptr())
        result: list[int] = out.tolist()
        return result


class Product:
    """One weight of the AMX or 4-bit products, with what a call needs worked out once: ``Linear``
    calls one a hundred times a step, where checking tensors costs more than the call (measured:
    15 us a call checked, 7 unchecked, for a product of a few microseconds at one row)."""

    def __init__(
        self, function: Any, packed: torch.Tensor, out_features: int, in_features: int
    ) -> None:
        self._function = function
        self._packed = packed  # keeps the memory the pointer points to
        self._pointer = packed.data_ptr()
        self.out_features = out_features
        self.in_features = in_features

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """``out = x @ weight.T``; ``x`` ``[rows, in]`` and ``out`` ``[rows, out]`` bf16, both
        with unit column stride (the caller's promise: nothing is checked here)."""
        rows = x.shape[0]
        if rows:
            self._function(
                x.data_ptr(),
                x.stride(0),
                rows,
                self._pointer,
                self.out_features,
                self.in_features,
                out.data_ptr(),
                out.stride(0),
                torch.get_num_threads(),
            )


def _product_out(rows: int, columns: int, out: torch.Tensor | None) -> torch.Tensor:
    """``out`` checked as a product's ``[rows, columns]`` bf16 output with unit column stride, or
    a new one."""
    if out is None:
        return torch.empty((rows, columns), dtype=torch.bfloat16)
    assert out.shape == (rows, columns) and out.stride(1) == 1 and out.dtype == torch.bfloat16
    return out


def load() -> CpuKernels | None:
    """The kernels for this machine, built on first use; None where they cannot be built."""
    with _lock:
        if "cpu" not in _loaded:
            _loaded["cpu"] = _load()
        return _loaded["cpu"]


def _load() -> CpuKernels | None:
    if sys.platform != "linux":
        return None
    path = kernel_build.build()
    if path is None:
        return None
    try:
        return CpuKernels(ctypes.CDLL(str(path)))
    except (OSError, AttributeError) as error:
        logger.warning("loading the CPU kernels from %s failed: %s", path, error)
        return None
