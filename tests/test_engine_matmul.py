"""The AMX matrix products (``engine/cpu_matmul.c``) and the 8-bit and 4-bit ones
(``engine/cpu_quant.c``) against PyTorch's.

On a CPU with AMX (this project's CI machine has it) every dense weight of the bf16 forward is
multiplied there: the products must equal float32 sums rounded once to bf16, for any number of
rows, strided inputs and outputs, and must not write outside the rows asked for. A row's result
must not depend on the rows beside it. Where the CPU has no AMX, nothing may claim it does.

The 8-bit products (``lt_q8_linear``) multiply by the exact values of a Q8_0 weight (the GGUF
form of SmolLM2's output head) in the steps that take the int4 forms.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmtree.engine import native
from llmtree.engine.linear import Linear, to_q4, to_q8


@pytest.fixture(scope="module")
def kernels() -> native.CpuKernels:
    built = native.load()
    assert built is not None, "the CPU kernels did not build (is a C compiler installed?)"
    return built


def cpu_flags() -> set[str]:
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return flags


def cpu_has_amx() -> bool:
    return {"amx_tile", "amx_bf16", "avx512_bf16"} <= cpu_flags()


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float32 sums of the bf16 inputs, rounded once to bf16."""
    return F.linear(x.float(), weight.float()).bfloat16()


def test_amx_is_used_exactly_where_the_cpu_has_it(kernels: native.CpuKernels) -> None:
    assert kernels.has_amx == cpu_has_amx()
    weight = torch.randn(64, 96).bfloat16()
    assert kernels.amx_fits(weight) == cpu_has_amx()
    assert not kernels.amx_fits(torch.randn(48, 96).bfloat16())  # 48 outputs: not whole blocks
    assert not kernels.amx_fits(torch.randn(64, 40).bfloat16())


needs_amx = pytest.mark.skipif(not cpu_has_amx(), reason="this CPU has no AMX (checked above)")


@needs_amx
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 32, 45, 64, 130])
@pytest.mark.parametrize(("out_features", "in_features"), [(960, 576), (576, 1536), (64, 32)])
def test_amx_linear_is_the_rounded_float32_product(
    kernels: native.CpuKernels, rows: int, out_features: int, in_features: int
) -> None:
    torch.manual_seed(rows * 7 + out_features)
    weight = (torch.randn(out_features, in_features) * 0.05).bfloat16()
    wide = torch.randn(rows, in_features + 24).bfloat16()
    x = wide[:, 8 : 8 + in_features]  # rows strided, as a slice of a wider tensor is
    sentinel = torch.full((rows + 3, out_features + 16), 7.0, dtype=torch.bfloat16)
    out = sentinel[:rows, 16:]
    result = kernels.amx_linear(x, kernels.amx_pack(weight), out=out)
    assert result.data_ptr() == out.data_ptr()
    expected = reference(x, weight)
    # the same float32 sums in another order: at most a rounding step of bf16 apart
    torch.testing.assert_close(result.float(), expected.float(), rtol=8e-3, atol=1e-3)
    assert (sentinel[rows:] == 7.0).all() and (sentinel[:, :16] == 7.0).all()


@needs_amx
def test_a_row_does_not_depend_on_the_rows_beside_it(kernels: native.CpuKernels) -> None:
    torch.manual_seed(3)
    weight = (torch.randn(3072, 576) * 0.05).bfloat16()
    packed = kernels.amx_pack(weight)
    batch = torch.randn(37, 576).bfloat16()
    together = kernels.amx_linear(batch, packed)
    for row in (0, 15, 16, 36):
        alone = kernels.amx_linear(batch[row : row + 1], packed)
        assert torch.equal(alone[0], together[row])


@needs_amx
def test_no_rows_is_an_empty_product(kernels: native.CpuKernels) -> None:
    packed = kernels.amx_pack(torch.randn(64, 64).bfloat16())
    assert kernels.amx_linear(torch.empty(0, 64, dtype=torch.bfloat16), packed).shape == (0, 64)


def test_a_linear_uses_amx_where_it_fits_and_onednn_elsewhere(kernels: native.CpuKernels) -> None:
    torch.manual_seed(5)
    x = torch.randn(9, 96).bfloat16()
    for out_features, fits in ((64, cpu_has_amx()), (40, False)):
        weight = (torch.randn(out_features, 96) * 0.1).bfloat16()
        bias = torch.randn(out_features).bfloat16()
        linear = Linear(weight, bias, torch.bfloat16, pack=True, allow_int4=False, kernels=kernels)
        assert (linear.amx is not None) == fits
        expected = F.linear(x.float(), weight.float(), bias.float())
        torch.testing.assert_close(linear(x).float(), expected, rtol=2e-2, atol=2e-2)


def q8_weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """A float32 weight made the way llama.cpp makes a Q8_0 block: per 32 inputs, a float16
    scale ``max|w| / 127`` and integers in [-127, 127] (the largest magnitude 127)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (out_features, in_features // 32, 32), generator=generator)
    q[..., 0] = 127
    scale = (torch.rand(out_features, in_features // 32, 1, generator=generator) * 0.01).half()
    return (q.float() * scale.float()).view(out_features, in_features)


def test_to_q8_finds_the_blocks_exactly_and_refuses_anything_else() -> None:
    weight = q8_weight(64, 96, seed=1)
    q8 = to_q8(weight)
    assert q8 is not None
    q, scales = q8
    assert q.dtype == torch.int8 and scales.shape == (64, 3)
    rebuilt = (q.float().view(64, 3, 32) * scales.view(64, 3, 1)).view(64, 96)
    assert torch.equal(rebuilt, weight)
    zero_block = weight.clone()
    zero_block[5, 32:64] = 0.0  # a block of zeros has the scale 0
    assert to_q8(zero_block) is not None
    assert to_q8(torch.randn(64, 96)) is None  # not 8-bit
    assert to_q8(weight.bfloat16()) is None  # rounded to bf16: the block values are gone
    assert to_q8(q8_weight(64, 96, seed=1)[:, :80]) is None  # not whole blocks
    nudged = weight.clone()
    nudged[0, 1] += scales[0, 0] / 2  # half a step off the grid
    assert to_q8(nudged) is None


def test_q8_is_used_exactly_where_the_cpu_has_avx512(kernels: native.CpuKernels) -> None:
    assert kernels.has_q8 == ("avx512f" in cpu_flags())
    assert kernels.has_q4 == ({"avx512f", "avx512bw", "avx512_vnni"} <= cpu_flags())


needs_q8 = pytest.mark.skipif(
    "avx512f" not in cpu_flags(),
    reason="no AVX-512 here: the 8-bit products are not used (checked above)",
)
needs_q4 = pytest.mark.skipif(
    not {"avx512f", "avx512bw", "avx512_vnni"} <= cpu_flags(),
    reason="no AVX-512 VNNI here: the 4-bit products are not used (checked above)",
)


def check_exact_product(
    product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    weight: torch.Tensor,
    rows: int,
    atol: float,
) -> torch.Tensor:
    """``product(x, out)`` on strided rows, into a view of a larger buffer: the exact product
    rounded once (float32 sums of exact products: a bf16 step or so), nothing written outside
    ``out``. Returns the result."""
    torch.manual_seed(rows)
    wide = torch.randn(rows, 600).bfloat16()
    x = wide[:, 8:584]  # strided rows
    sentinel = torch.full((rows + 2, 336), 7.0, dtype=torch.bfloat16)
    out = sentinel[:rows, 16:]
    result = product(x, out)
    assert result.data_ptr() == out.data_ptr()
    exact = (x.double() @ weight.double().T).bfloat16()
    torch.testing.assert_close(result.float(), exact.float(), rtol=8e-3, atol=atol)
    assert (sentinel[rows:] == 7.0).all() and (sentinel[:, :16] == 7.0).all()
    return result


@needs_q8
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
def test_q8_linear_is_the_exact_weight_times_the_input(
    kernels: native.CpuKernels, rows: int
) -> None:
    weight = q8_weight(320, 576, seed=rows)
    q8 = to_q8(weight)
    assert q8 is not None
    check_exact_product(lambda x, out: kernels.q8_linear(x, *q8, out=out), weight, rows, 1e-3)


@needs_q8
def test_q8_refuses_what_it_cannot_take(kernels: native.CpuKernels) -> None:
    q8 = to_q8(q8_weight(64, 96, seed=2))
    assert q8 is not None
    with pytest.raises(AssertionError):
        kernels.q8_linear(torch.randn(1, 64).bfloat16(), *q8)  # wrong number of inputs
    with pytest.raises(AssertionError):
        kernels.q8_linear(torch.randn(1, 96), *q8)  # float32 input
    assert kernels.q8_linear(torch.empty(0, 96, dtype=torch.bfloat16), *q8).shape == (0, 64)


@needs_q8
def test_a_linear_takes_the_8bit_form_only_where_asked(kernels: native.CpuKernels) -> None:
    weight = q8_weight(128, 96, seed=3)
    head = Linear(
        weight, None, torch.bfloat16, True, allow_int4=False, kernels=kernels, allow_q8=True
    )
    assert head.q8 is not None
    layer = Linear(weight, None, torch.bfloat16, True, allow_int4=False, kernels=kernels)
    assert layer.q8 is None  # only where asked for: the head, not the layers
    torch.manual_seed(4)
    for rows in (1, 3, 9):
        x = torch.randn(rows, 96).bfloat16()
        exact = x.double() @ weight.double().T
        compact, dense = head(x, rows), head(x)
        assert torch.equal(compact, kernels.q8_linear(x, *head.q8))
        torch.testing.assert_close(compact.double(), exact, rtol=8e-3, atol=1e-3)
        # the bf16 form rounds the weights (up to 1.27 here): sums of 96 terms a few steps off
        torch.testing.assert_close(dense.double(), exact, rtol=2e-2, atol=8e-2)
        assert torch.equal(head(x, rows - 1), dense)  # all rows or none


def q4_weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """A float32 weight made the way llama.cpp makes and reads a Q4_1 block: per 32 inputs, a
    float16 minimum and scale ``(max - min) / 15``, values 0..15 (both ends used), read back as
    ``q * scale + min`` in float32."""
    generator = torch.Generator().manual_seed(seed)
    shape = (out_features, in_features // 32)
    q = torch.randint(0, 16, (*shape, 32), generator=generator).float()
    q[..., 0], q[..., 1] = 0.0, 15.0
    scale = (torch.rand(*shape, 1, generator=generator) * 0.01).half().float()
    minimum = (torch.randn(*shape, 1, generator=generator) * 0.05).half().float()
    return (q * scale + minimum).view(out_features, in_features)


def unpack_q4(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The weight ``packed`` holds, read in the order ``cpu_quant.c`` documents."""
    groups, lanes = in_features // 32, native.Q4_LANES
    blocks = packed.view(out_features // lanes, groups, native.Q4_STRIDE)
    loads = blocks[..., : 16 * lanes].view(-1, groups, 4, lanes, 4).long()  # block, group, c, j, b
    values = torch.stack((loads & 15, loads >> 4), dim=2).float()  # block, group, half, c, j, b
    values = values.permute(0, 4, 1, 2, 3, 5).reshape(-1, lanes, groups, 32)  # input 16h + 4c + b
    halves = blocks[..., 16 * lanes :].contiguous().view(torch.float16).float()
    scale, minimum = halves.view(-1, groups, 2, lanes).permute(2, 0, 3, 1)  # block, lane, group
    weight = values * scale[..., None] + minimum[..., None]
    return weight.reshape(out_features, in_features)


def q8_1(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the 4-bit product reads it: llama.cpp's Q8_1 blocks, per 32 inputs a scale
    ``max |x| / 127`` and integers ``x / scale`` rounded to the nearest (ties to even), in the
    float32 steps of ``q8_quantize_rows`` in ``cpu_quant.c``; returned as float64 values."""
    groups = x.float().reshape(x.shape[0], -1, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    # a tensor divided (``127.0 / amax`` would multiply by a rounded reciprocal instead)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(groups * inverse)
    return (q.double() * (amax / 127.0).double()).reshape(x.shape)


def test_to_q4_finds_the_blocks_exactly_and_refuses_anything_else() -> None:
    weight = q4_weight(48, 96, seed=1)
    packed = to_q4(weight)
    assert packed is not None
    assert packed.dtype == torch.uint8 and packed.shape == (3, 3 * native.Q4_STRIDE)
    assert torch.equal(unpack_q4(packed, 48, 96), weight)
    constant = weight.clone()
    constant[5, 32:64] = 0.25  # one value: scale 0
    assert to_q4(constant) is not None
    assert to_q4(torch.randn(48, 96)) is None  # not 4-bit
    assert to_q4(weight.bfloat16()) is None  # rounded to bf16
    assert to_q4(weight[:, :80]) is None  # not whole blocks of inputs
    assert to_q4(weight[:40]) is None  # not whole blocks of outputs
    nudged = weight.clone()
    nudged[0, 2] += 1e-4  # off the grid
    assert to_q4(nudged) is None


@needs_q4
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 17])
def test_q4_linear_is_the_weight_times_the_input_in_8_bits(
    kernels: native.CpuKernels, rows: int
) -> None:
    """llama.cpp's Q4_1 x Q8_1 product: exact for the 8-bit input (float32 sums rounded once),
    within the input's 8-bit rounding of the product of the input itself."""
    weight = q4_weight(320, 576, seed=rows)
    packed = to_q4(weight)
    assert packed is not None
    torch.manual_seed(rows)
    wide = torch.randn(rows, 600).bfloat16()
    x = wide[:, 8:584]  # strided rows
    sentinel = torch.full((rows + 2, 336), 7.0, dtype=torch.bfloat16)
    out = sentinel[:rows, 16:]
    result = kernels.q4_linear(x, packed, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert (sentinel[rows:] == 7.0).all() and (sentinel[:, :16] == 7.0).all()
    exact = (q8_1(x) @ weight.double().T).bfloat16()
    torch.testing.assert_close(result.float(), exact.float(), rtol=8e-3, atol=2e-3)
    unquantized = x.double() @ weight.double().T
    error = (result.double() - unquantized).abs().max() / unquantized.abs().max()
    assert error < 0.02, error
    alone = torch.cat([kernels.q4_linear(x[r : r + 1], packed) for r in range(rows)])
    assert torch.equal(alone, result)  # a row's numbers do not depend on the rows beside it


@needs_q4
def test_q4_refuses_what_it_cannot_take(kernels: native.CpuKernels) -> None:
    packed = to_q4(q4_weight(64, 96, seed=2))
    assert packed is not None
    with pytest.raises(AssertionError):
        kernels.q4_linear(torch.randn(1, 64).bfloat16(), packed)  # wrong number of inputs
    with pytest.raises(AssertionError):
        kernels.q4_linear(torch.randn(1, 96), packed)  # float32 input
    assert kernels.q4_linear(torch.empty(0, 96, dtype=torch.bfloat16), packed).shape == (0, 64)


@needs_q4
def test_a_linear_takes_the_4bit_form_for_the_rows_asked(kernels: native.CpuKernels) -> None:
    weight = q4_weight(64, 96, seed=3)
    bias = torch.randn(64).bfloat16()
    linear = Linear(weight, bias, torch.bfloat16, True, allow_int4=True, kernels=kernels)
    assert linear.q4 is not None and linear.int4 is None and linear.four_bit
    dense_only = Linear(weight, bias, torch.bfloat16, True, allow_int4=False, kernels=kernels)
    assert dense_only.q4 is None and not dense_only.four_bit
    torch.manual_seed(4)
    x = torch.randn(5, 96).bfloat16()
    small = kernels.q4_linear(x[:2], linear.q4).add_(bias)
    mixed = linear(x, 2)
    assert torch.equal(mixed[:2], small)  # the first rows by the 4-bit form...
    assert torch.equal(mixed[2:], dense_only(x[2:]))  # ...the others by the dense one
    assert torch.equal(linear(x, 5), kernels.q4_linear(x, linear.q4).add_(bias))
    assert torch.equal(linear(x), dense_only(x))
