"""The sampler and the int4/KV-cache helpers on hand-made tensors (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from llmtree.engine.kv_cache import KVCache
from llmtree.engine.linear import INT4_GROUP, Linear, to_int4
from llmtree.engine.sampler import Sampler, SampleRow

EOS = 3


def logits_of(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_greedy_takes_the_most_likely_token_and_min_tokens_bans_eos() -> None:
    sampler = Sampler([EOS])
    logits = logits_of([0.0, 1.0, 2.0, 5.0], [0.0, 1.0, 2.0, 5.0])
    rows = [SampleRow(temperature=0.0), SampleRow(temperature=0.0, ban_eos=True)]
    assert sampler(logits, rows) == [EOS, 2]


def test_uniform_picks_by_cumulative_probability() -> None:
    sampler = Sampler([EOS])
    row = [math.log(0.5), math.log(0.25), math.log(0.25), -math.inf]
    picks = [sampler(logits_of(row), [SampleRow(1.0, uniform=u)])[0] for u in (0.1, 0.6, 0.9)]
    assert picks == [0, 1, 2]


def test_top_k_and_top_p_keep_only_the_likely_tokens() -> None:
    sampler = Sampler([EOS])
    row = [math.log(0.5), math.log(0.3), math.log(0.2), -math.inf]
    for uniform in (0.0, 0.5, 0.99):
        assert sampler(logits_of(row), [SampleRow(1.0, top_k=1, uniform=uniform)]) == [0]
        assert sampler(logits_of(row), [SampleRow(1.0, top_p=0.5, uniform=uniform)]) == [0]
    kept = {
        sampler(logits_of(row), [SampleRow(1.0, top_p=0.8, uniform=u / 10)])[0] for u in range(10)
    }
    assert kept == {0, 1}


def test_a_rows_token_does_not_depend_on_its_neighbours() -> None:
    generator = torch.Generator().manual_seed(0)
    mine = torch.randn(1, 1000, generator=generator) * 3
    others = torch.randn(5, 1000, generator=generator) * 3
    sampler = Sampler([EOS])
    for uniform in (0.01, 0.37, 0.93):
        row = SampleRow(temperature=0.8, top_p=0.9, top_k=50, uniform=uniform)
        alone = sampler(mine.clone(), [row])
        together = sampler(
            torch.cat([others[:2], mine, others[2:]]),
            [SampleRow(1.3, uniform=0.5), SampleRow(0.0), row, SampleRow(0.7, top_p=0.5)]
            + [SampleRow(1.0, uniform=0.2)],
        )
        assert together[2] == alone[0]


def q4_1_like(out_features: int, in_features: int) -> torch.Tensor:
    """Weights as a Q4_1 GGUF block de-quantizes: min + scale * q, q in 0..15, min/max present."""
    generator = torch.Generator().manual_seed(1)
    groups = in_features // INT4_GROUP
    q = torch.randint(0, 16, (out_features, groups, INT4_GROUP), generator=generator)
    q[..., 0], q[..., 1] = 0, 15
    scale = torch.rand(out_features, groups, 1, generator=generator) * 0.01 + 1e-3
    low = torch.randn(out_features, groups, 1, generator=generator) * 0.05
    return (low + scale * q).view(out_features, in_features)


def test_int4_form_is_kept_only_when_it_loses_nothing() -> None:
    weight = q4_1_like(64, 128)
    assert to_int4(weight, torch.bfloat16) is not None
    assert to_int4(torch.randn(64, 128), torch.bfloat16) is None


@pytest.mark.parametrize("rows", [1, 5, 20])
def test_int4_and_dense_forms_agree(rows: int) -> None:
    weight = q4_1_like(96, 256)
    linear = Linear(weight, None, torch.float32, pack=True, allow_int4=True)
    assert linear.int4 is not None
    x = torch.randn(rows, 256)
    expected = x @ weight.T
    torch.testing.assert_close(linear(x, int4_rows=rows), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(linear(x), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(linear(x, int4_rows=1), expected, rtol=1e-4, atol=1e-4)


def test_released_slot_reads_zero_and_others_keep_their_values() -> None:
    cache = KVCache(2, 3, 2, 4096, 64, torch.bfloat16, torch.device("cpu"))
    for layer in range(2):
        keys, values = cache.layer(layer)
        keys[:, :, :100] = 1.0
        values[:, :, :100] = 2.0
    cache.release(1)
    keys, values = cache.layer(1)
    assert float(keys[1].abs().sum()) == 0.0 and float(values[1].abs().sum()) == 0.0
    assert float(keys[0, :, :100].min()) == 1.0 and float(values[2, :, :100].min()) == 2.0
