"""Every decoder layer of a step in one call of the fused kernels (``cpu_layers.c``).

``LlamaForward._forward_native`` calls about eight kernels per layer from Python; at one decode
row the Python and ctypes work between them is about a sixth of the step. ``NativeLayers`` hands
the whole loop to ``lt_layers``, which calls the same kernels in the same order on the same
buffers, so the step's numbers are the Python loop's, bit for bit (``tests/test_engine_native.py``
holds it to that). It applies where every product of every layer has its AMX form, none has a
bias, and, for steps whose decode rows take the 4-bit forms, every product has its own 4-bit
kernel's form; elsewhere (``fits`` is False, or ``run`` returns False) the Python loop runs.

Built by ``LlamaForward`` for the KV cache it is given; used on the engine loop thread.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from llmtree.engine.kv_cache import KVCache
    from llmtree.engine.linear import Linear
    from llmtree.engine.llama import Layer
    from llmtree.engine.native import CpuKernels

_p = ctypes.c_void_p
_i = ctypes.c_int64
_f = ctypes.c_float


class _Weight(ctypes.Structure):
    _fields_ = [("amx", _p), ("q4", _p), ("n", _i), ("k", _i)]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("qkv", _Weight),
        ("o", _Weight),
        ("gate_up", _Weight),
        ("down", _Weight),
        ("post_norm", _p),
        ("next_norm", _p),
        ("k_cache", _p),
        ("v_cache", _p),
    ]


class _Step(ctypes.Structure):
    _fields_ = [
        *((name, _i) for name in ("rows", "small", "heads", "kv_heads", "head_dim")),
        *((name, _i) for name in ("num_slots", "max_len", "hidden_size", "inter")),
        ("scale", _f),
        ("eps", _f),
        *((name, _p) for name in ("cos", "sin", "slots", "positions", "lengths")),
        *((name, _p) for name in ("x", "hidden", "qkv", "attention", "delta", "gate_up")),
        ("activation", _p),
    ]


def _weight(linear: Linear) -> _Weight:
    q4 = linear.q4.data_ptr() if linear.q4 is not None else None
    assert linear.amx is not None
    return _Weight(linear.amx.data_ptr(), q4, linear.out_features, linear.amx.shape[1])


class NativeLayers:
    """The decoder layers of one ``LlamaForward`` over one ``KVCache``, for ``lt_layers``."""

    @staticmethod
    def fits(kernels: CpuKernels, layers: list[Layer]) -> bool:
        """True where ``lt_layers`` can run ``layers``: AMX here, and every product with its AMX
        form and no bias."""
        linears = [lin for y in layers for lin in (y.qkv, y.o, y.gate_up, y.down)]
        usable = all(linear.amx is not None and linear.bias is None for linear in linears)
        return kernels.has_amx and bool(layers) and usable

    def __init__(
        self,
        kernels: CpuKernels,
        layers: list[Layer],
        final_norm: torch.Tensor,
        cache: KVCache,
        cos: torch.Tensor,
        sin: torch.Tensor,
        heads: int,
        eps: float,
    ) -> None:
        """``layers`` must ``fit``; the tensors must outlive this object."""
        self.kernels = kernels
        self.cache = cache
        self.has_q4 = all(
            lin.q4 is not None for y in layers for lin in (y.qkv, y.o, y.gate_up, y.down)
        )
        self._keep = (layers, final_norm, cos, sin)
        array = (_Layer * len(layers))()
        for index, layer in enumerate(layers):
            next_norm = layers[index + 1].input_norm if index + 1 < len(layers) else final_norm
            k_cache, v_cache = cache.layer(index)
            array[index] = _Layer(
                _weight(layer.qkv),
                _weight(layer.o),
                _weight(layer.gate_up),
                _weight(layer.down),
                layer.post_norm.data_ptr(),
                next_norm.data_ptr(),
                k_cache.data_ptr(),
                v_cache.data_ptr(),
            )
        self._layers = array
        num_slots, kv_heads, max_len, head_dim = cache.layer(0)[0].shape
        self._widths = (layers[0].qkv.out_features, layers[0].gate_up.out_features)
        self._step = _Step(
            rows=0,
            small=0,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            num_slots=num_slots,
            max_len=max_len,
            hidden_size=array[0].qkv.k,
            inter=array[0].down.k,
            scale=head_dim**-0.5,
            eps=eps,
            cos=cos.data_ptr(),
            sin=sin.data_ptr(),
        )

    def run(
        self,
        x: torch.Tensor,
        hidden: torch.Tensor,
        small: int,
        slots: torch.Tensor,
        positions: torch.Tensor,
        lengths: torch.Tensor,
    ) -> bool:
        """Runs every layer on ``x`` (the residual, ``[rows, hidden]``; updated in place) and
        ``hidden`` (its first input norm; the final norm on return), the first ``small`` rows by
        the 4-bit forms; ``slots``, ``positions`` and ``lengths`` as ``ForwardBatch`` has them.
        False, having done nothing, where a 4-bit form is missing."""
        if small > 0 and not self.has_q4:
            return False
        rows = x.shape[0]
        qkv_width, gate_up_width = self._widths
        step = self._step
        buffers = (
            x.new_empty(rows, qkv_width),
            x.new_empty(rows, step.heads * step.head_dim),
            torch.empty_like(x),
            x.new_empty(rows, gate_up_width),
            x.new_empty(rows, gate_up_width // 2),
        )
        step.rows, step.small = rows, small
        step.slots, step.positions, step.lengths = (
            slots.data_ptr(),
            positions.data_ptr(),
            lengths.data_ptr(),
        )
        step.x, step.hidden = x.data_ptr(), hidden.data_ptr()
        step.qkv, step.attention, step.delta, step.gate_up, step.activation = (
            buffer.data_ptr() for buffer in buffers
        )
        return self.kernels.run_layers(
            ctypes.addressof(self._layers), len(self._layers), ctypes.addressof(step)
        )
