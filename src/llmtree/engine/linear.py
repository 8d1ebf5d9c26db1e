"""One weight matrix, kept in the forms that are fastest for the number of rows it multiplies.

On a CPU a decode step is limited by memory bandwidth: every step reads every weight once.

* Dense weights are pre-packed once: into the AMX tile layout of the fused CPU kernels
  (``native.amx_linear``) where this CPU has AMX, else into oneDNN's blocked layout (``mkldnn``
  reorder), instead of being re-laid out by every call.
* A weight that is exactly 4-bit per group of 32 (what a Q4_0/Q4_1 GGUF file holds) also keeps
  a 4-bit copy for steps with few rows, where reading the weights is the whole cost: about a
  third of the bytes of bf16. Where the fused kernels run with AVX-512 VNNI it is the blocks'
  exact values (``to_q4``, ``native.q4_linear``), multiplied by the inputs rounded to 8 bits per
  group of 32 as llama.cpp does (Q4_1 x Q8_1: the 120 products of SmolLM2 2.4x faster than AMX
  bf16 at 1 row, 1.9x at 8); else PyTorch's int4 form (``to_int4``), whose scales and zeros are
  rounded to bf16.
* A weight that is exactly 8-bit per group of 32 with one scale (a Q8_0 block: how GGUF files
  hold the token embedding that SmolLM2 also uses as its output head) keeps an 8-bit copy, used
  in the same steps as the int4 forms (``native.q8_linear``): half the bytes of bf16, and the
  file's own values where the bf16 form rounds them.

Built by ``LlamaForward`` at start; called by it on the engine loop thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from llmtree.engine.native import Q4_GROUP, Q4_LANES, Q4_STRIDE, Q8_GROUP

if TYPE_CHECKING:
    from llmtree.engine.native import CpuKernels, Product

INT4_GROUP = 32
"""Weights per scale/zero pair in the int4 form (the GGUF block size)."""
INT4_MAX_ROWS = 8
"""Steps that decode at most this many sequences use the int4 form for their decode rows
(measured crossover against oneDNN on AVX-512); prompt rows always use the dense form. So a row's
numbers depend only on how many sequences decode beside it, never on prompts being prefilled."""
INT4_MAX_ROWS_AMX = 8
"""The same crossover against the AMX products of ``native.amx_linear`` (measured, the 120
products of SmolLM2-135M with nothing in cache: the 4-bit form 2.4x faster at 1 row, 1.9x at 8,
even at 16, AMX 1.5x faster at 32)."""
PACK_BATCH_HINT = 64
"""Rows oneDNN tunes the packed layout for."""


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """True where oneDNN pre-packing is available (CPU with mkldnn, bf16 or fp32)."""
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
        and dtype in (torch.bfloat16, torch.float32)
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def to_int4(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The packed int4 form of ``weight`` ``[out, in]`` if it loses nothing, else None.

    Each group of 32 inputs must hold at most 16 evenly spaced values from its minimum to its
    maximum, which is how llama.cpp's Q4_0/Q4_1 blocks de-quantize.
    """
    out_features, in_features = weight.shape
    if in_features % INT4_GROUP or weight.device.type != "cpu":
        return None
    w = weight.detach().float().view(out_features, in_features // INT4_GROUP, INT4_GROUP)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = (high - low) / 15
    levels = torch.where(scale > 0, (w - low) / scale.clamp(min=1e-30), torch.zeros_like(w))
    q = levels.round().clamp_(0, 15)
    error = ((q * scale + low) - w).abs()
    if bool((error > 1e-3 * scale + 1e-7).any()):
        return None
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        q.to(torch.int32).view(out_features, in_features), 1
    )
    zero = low + 8 * scale
    scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return packed, scales_and_zeros


def to_q4(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` ``[out, in]`` packed for ``native.q4_linear``, if 4-bit values times a float16
    scale plus a float16 minimum per group of ``Q4_GROUP`` inputs give back every weight exactly,
    else None. A Q4_1 block holds exactly that (its scale is ``(max - min) / 15``), de-quantized
    as ``q * scale + min`` in float32.

    Packed in blocks of ``Q4_LANES`` outputs; per block and group, ``Q4_STRIDE`` bytes: four
    times 64, byte ``4j + b`` of the ``c``-th holding inputs ``4c + b`` (low half) and
    ``16 + 4c + b`` (high half) of output ``j``, then the outputs' scales, then their minimums
    (the layout ``cpu_quant.c`` documents)."""
    out_features, in_features = weight.shape
    if (
        in_features % Q4_GROUP
        or out_features % Q4_LANES
        or weight.device.type != "cpu"
        or weight.dtype != torch.float32
    ):
        return None
    groups = in_features // Q4_GROUP
    w = weight.detach().reshape(out_features, groups, Q4_GROUP)
    low = w.amin(-1, keepdim=True)
    minimum = low.to(torch.float16).float()
    scale = ((w.amax(-1, keepdim=True) - low) / 15).to(torch.float16).float()
    if not torch.equal(minimum, low) or not bool(torch.isfinite(scale).all()):
        return None
    q = torch.where(scale > 0, (w - minimum) / scale.clamp(min=1e-30), torch.zeros_like(w))
    q = q.round_().clamp_(0, 15)
    if not torch.equal(q * scale + minimum, w):
        return None
    blocks = out_features // Q4_LANES
    nibbles = q.to(torch.uint8).view(blocks, Q4_LANES, groups, 2, Q4_GROUP // 8, 4)
    # block, group, load, lane, byte: inputs 4c + b (low half) and 16 + 4c + b (high half)
    pairs = (nibbles[:, :, :, 0] | (nibbles[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4)
    halves = torch.stack((scale, minimum)).view(2, blocks, Q4_LANES, groups).to(torch.float16)
    halves = halves.permute(1, 3, 0, 2).contiguous().view(torch.uint8)  # block, group, 2, lane
    packed = torch.cat((pairs.reshape(blocks, groups, -1), halves.view(blocks, groups, -1)), dim=2)
    return packed.reshape(blocks, groups * Q4_STRIDE).contiguous()


def to_q8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(q, scales)``: ``weight`` ``[out, in]`` as int8 ``q`` times one scale per group of
    ``Q8_GROUP`` inputs, if that loses nothing, else None. A Q8_0 block holds exactly that: its
    scale is ``max|w| / 127``, a float16 (kept as float32 here, which the kernel reads faster)."""
    out_features, in_features = weight.shape
    if in_features % Q8_GROUP or weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None  # a weight already rounded to bf16 no longer holds the block's values
    w = weight.detach().reshape(out_features, in_features // Q8_GROUP, Q8_GROUP)
    scale = w.abs().amax(-1, keepdim=True) / 127
    half = scale.to(torch.float16)
    if not torch.equal(half.float(), scale):
        return None
    q = torch.where(scale > 0, w / scale.clamp(min=1e-30), torch.zeros_like(w)).round_()
    if not torch.equal(q * scale, w):
        return None
    return (
        q.to(torch.int8).view(out_features, in_features).contiguous(),
        scale.view(out_features, -1).contiguous(),
    )


class Linear:
    """``y = x @ weight.T + bias`` with the weight in its best forms for this device."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        pack: bool,
        allow_int4: bool,
        kernels: CpuKernels | None = None,
        allow_q8: bool = False,
    ) -> None:
        """``kernels`` (bf16 on a CPU only) multiply in the AMX tile layout where they fit, and
        by the 8-bit form if ``allow_q8`` and ``weight`` (float32) is one."""
        self.out_features = weight.shape[0]
        self.kernels = kernels if dtype == torch.bfloat16 else None
        self.q4: torch.Tensor | None = None
        self.int4: tuple[torch.Tensor, torch.Tensor] | None = None
        if allow_int4 and pack:
            if self.kernels is not None and self.kernels.has_q4:
                self.q4 = to_q4(weight)
            if self.q4 is None:
                self.int4 = to_int4(weight, dtype)
        self.bias = None if bias is None else bias.detach().to(dtype)
        dense = weight.detach().to(dtype).contiguous()
        self.packed: torch.Tensor | None = None
        self.weight: torch.Tensor | None = dense
        self.amx: torch.Tensor | None = None
        self.q8: tuple[torch.Tensor, torch.Tensor] | None = None
        if allow_q8 and self.kernels is not None and self.kernels.has_q8:
            self.q8 = to_q8(weight)
        self._q4_product: Product | None = None
        if self.q4 is not None and self.kernels is not None:
            self._q4_product = self.kernels.q4_product(self.q4)
        self._amx_product: Product | None = None
        if self.kernels is not None and self.kernels.amx_fits(dense):
            self.amx = self.kernels.amx_pack(dense)
            self._amx_product = self.kernels.amx_product(self.amx)
            self.weight = None
        elif pack:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(dense, PACK_BATCH_HINT)
            self.weight = None

    def __call__(
        self, x: torch.Tensor, int4_rows: int = 0, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x @ weight.T + bias``; the first ``int4_rows`` rows use the 4-bit form if any. The
        8-bit form, if any, takes all rows or none: all when ``int4_rows`` covers them.

        ``out`` (``[rows, out_features]``, contiguous) is a buffer the AMX, 8-bit and 4-bit
        products write into instead of a new tensor; the PyTorch forms ignore it, so use what
        is returned.
        """
        if self.q8 is not None and int4_rows >= x.shape[0]:
            assert self.kernels is not None
            y = self.kernels.q8_linear(_unit_stride(x), *self.q8, out)
            return y if self.bias is None else y.add_(self.bias)
        if self.q4 is not None and int4_rows > 0:
            return self._q4(x, int4_rows, out)
        if self.int4 is None or int4_rows <= 0:
            return self._dense(x, out)
        if int4_rows >= x.shape[0]:
            return self._int4(x)
        return torch.cat((self._int4(x[:int4_rows]), self._dense(x[int4_rows:])))

    @property
    def four_bit(self) -> bool:
        """True when this weight has a 4-bit form (``q4`` or ``int4``) for steps with few rows."""
        return self.q4 is not None or self.int4 is not None

    def _q4(self, x: torch.Tensor, int4_rows: int, out: torch.Tensor | None) -> torch.Tensor:
        """The first ``int4_rows`` rows by the 4-bit form, the rest by the dense one, into
        ``out`` (or a new tensor)."""
        assert self._q4_product is not None
        x = _unit_stride(x)
        rows = x.shape[0]
        if out is None:
            out = x.new_empty(rows, self.out_features)
        if int4_rows >= rows:  # every row (a decode step): no views to make
            self._q4_product(x, out)
            return out if self.bias is None else out.add_(self.bias)
        small, rest = out[:int4_rows], out[int4_rows:]
        self._q4_product(x[:int4_rows], small)
        if self.bias is not None:
            small.add_(self.bias)
        dense = self._dense(x[int4_rows:], rest)
        if dense is not rest:  # oneDNN or PyTorch made a tensor of their own
            rest.copy_(dense)
        return out

    def _int4(self, x: torch.Tensor) -> torch.Tensor:
        assert self.int4 is not None
        packed, scales_and_zeros = self.int4
        y: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, packed, INT4_GROUP, scales_and_zeros
        )
        return y if self.bias is None else y + self.bias

    def _dense(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self._amx_product is not None:
            x = _unit_stride(x)
            if out is None:
                out = x.new_empty(x.shape[0], self.out_features)
            self._amx_product(x, out)
            return out if self.bias is None else out.add_(self.bias)
        if self.packed is not None:
            y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
                x, self.packed, self.bias, "none", [], ""
            )
            return y
        assert self.weight is not None
        return F.linear(x, self.weight, self.bias)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its rows are contiguous (the kernels take any row stride), else a copy.
    ``is_contiguous`` first: the common case, and a third of the cost of reading a stride."""
    return x if x.is_contiguous() or x.stride(-1) == 1 else x.contiguous()
