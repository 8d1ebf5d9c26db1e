"""Runs a step plan on the model: packs its tokens, runs the forward, samples one token per row.

The only part of the engine (with ``llama``, ``kv_cache`` and ``sampler``) that touches tensors.
``run`` is called by the engine loop thread once per step; it raises whatever the model raises,
and the engine then ends that step's requests with an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from llmtree.engine import native
from llmtree.engine.kv_cache import KVCache
from llmtree.engine.llama import DecodeRows, ForwardBatch, LlamaForward, PrefillRows
from llmtree.engine.sampler import Sampler, SampleRow
from llmtree.engine.scheduler import PrefillChunk, StepPlan

SPAN_ALIGN = 32
"""Decode attention spans a multiple of this many cache positions (masked past each row)."""


class ModelRunner:
    """The model, its KV cache and the sampler, driven one ``StepPlan`` at a time."""

    def __init__(
        self, model: LlamaForward, num_slots: int, max_len: int, eos_token_ids: Sequence[int]
    ) -> None:
        self.model = model
        self.device = model.device
        if model.kernels is not None:  # the kernels' key layout is in whole blocks of positions
            max_len = -(-max_len // native.KEY_BLOCK) * native.KEY_BLOCK
        self.cache = KVCache(
            model.num_layers,
            num_slots,
            model.num_kv_heads,
            max_len,
            model.head_dim,
            model.dtype,
            model.device,
        )
        kernels = model.kernels
        self.sampler = Sampler(eos_token_ids, argmax=kernels.argmax if kernels else None)

    def run(self, plan: StepPlan) -> list[int]:
        """One new token id for each sequence of ``plan.samples``, in that order."""
        batch = self._build(plan)
        logits = self.model.forward(batch, self.cache)
        rows = [
            SampleRow(
                temperature=seq.sampling.temperature,
                top_k=seq.sampling.top_k,
                top_p=seq.sampling.top_p,
                uniform=0.0 if seq.is_greedy else seq.rng.random(),
                ban_eos=seq.is_below_min_tokens,
            )
            for seq in plan.samples
        ]
        return self.sampler(logits, rows)

    def release(self, slots: Iterable[int]) -> None:
        """Returns the cache memory of finished sequences' slots to the OS."""
        for slot in slots:
            if slot >= 0:
                self.cache.release(slot)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _build(self, plan: StepPlan) -> ForwardBatch:
        input_ids = [seq.last_token_id for seq in plan.decodes]
        positions = [seq.num_tokens - 1 for seq in plan.decodes]
        slots = [seq.slot for seq in plan.decodes]
        sample_rows = list(range(len(plan.decodes)))
        decode = self._decode_rows(plan) if plan.decodes else None
        prefills = []
        for chunk in plan.prefills:
            row, end = len(input_ids), chunk.start + chunk.num_tokens
            input_ids.extend(chunk.seq.prompt_ids[chunk.start : end])
            positions.extend(range(chunk.start, end))
            slots.extend([chunk.seq.slot] * chunk.num_tokens)
            mask = self._causal(chunk) if self.model.needs_masks else None
            prefills.append(PrefillRows(row, chunk.num_tokens, chunk.seq.slot, chunk.start, mask))
            if chunk.is_last:
                sample_rows.append(row + chunk.num_tokens - 1)
        return ForwardBatch(
            input_ids=self._tensor(input_ids),
            positions=self._tensor(positions),
            slots=self._tensor(slots),
            lengths=self._tensor([position + 1 for position in positions]),
            decode=decode,
            prefills=prefills,
            sample_rows=self._tensor(sample_rows),
        )

    def _decode_rows(self, plan: StepPlan) -> DecodeRows:
        slots = [seq.slot for seq in plan.decodes]
        positions = [seq.num_tokens - 1 for seq in plan.decodes]
        width = max(slots) + 1
        # Rounding the span up keeps each row's attention sums in the same order whatever the
        # other rows' lengths are, so a sequence's numbers do not depend on its neighbours.
        length = min(-(-(max(positions) + 1) // SPAN_ALIGN) * SPAN_ALIGN, self.cache.max_len)
        mask = cache_rows = None
        if self.model.needs_masks:
            lengths = [1] * width
            for slot, position in zip(slots, positions, strict=True):
                lengths[slot] = position + 1
            span = torch.arange(length, device=self.device)
            allowed = span[None, :] < self._tensor(lengths)[:, None]
            mask = self._additive(allowed).view(width, 1, 1, length)
            cache_rows = self._tensor(
                [
                    row
                    for s, p in zip(slots, positions, strict=True)
                    for row in self.cache.row_index(s, p)
                ]
            )
        return DecodeRows(
            num_rows=len(slots),
            slots=self._tensor(slots),
            positions=self._tensor(positions),
            cache_rows=cache_rows,
            width=width,
            length=length,
            mask=mask,
            is_dense=slots == list(range(len(slots))),
        )

    def _causal(self, chunk: PrefillChunk) -> torch.Tensor:
        end = chunk.start + chunk.num_tokens
        keys = torch.arange(end, device=self.device)
        queries = torch.arange(chunk.start, end, device=self.device)
        return self._additive(keys[None, :] <= queries[:, None])

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """A boolean mask as the attention kernel uses it: 0 where allowed, -inf elsewhere."""
        mask = torch.zeros(allowed.shape, dtype=self.model.dtype, device=self.device)
        return mask.masked_fill_(~allowed, float("-inf"))
