"""Per-row sampling: greedy, or temperature / top-k / top-p with the request's own random stream.

A sampled row takes one uniform number from its request's generator and picks the token where
that number falls in the cumulative distribution, in vocabulary order. Which tokens top-k and
top-p keep is decided by value, never by a sort order, so a request's sample depends only on
its own logits and its own seed, not on the rows beside it. Called by the runner (loop thread).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

TOP_P_CANDIDATES = 1024
"""Largest probabilities looked at first for top-p; a flatter row falls back to a full sort."""


@dataclass(slots=True)
class SampleRow:
    """How to pick the token of one row of logits."""

    temperature: float
    top_k: int = 0
    top_p: float = 1.0
    uniform: float = 0.0
    """The request's next random number in [0, 1) (unused when greedy)."""
    ban_eos: bool = False
    """True while ``min_tokens`` is not reached."""

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 1e-5


class Sampler:
    """Turns a step's logits into one token id per row."""

    def __init__(
        self,
        eos_token_ids: Sequence[int],
        argmax: Callable[[torch.Tensor], list[int]] | None = None,
    ) -> None:
        """``argmax``: a faster first-index-of-the-maximum for contiguous bf16 CPU logits."""
        self.eos_token_ids = list(eos_token_ids)
        self._argmax = argmax

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> list[int]:
        banned = [i for i, row in enumerate(rows) if row.ban_eos]
        if banned and self.eos_token_ids:
            index = torch.tensor(banned, device=logits.device)
            eos = torch.tensor(self.eos_token_ids, device=logits.device)
            logits[index[:, None], eos[None, :]] = float("-inf")
        tokens = [0] * len(rows)
        greedy = [i for i, row in enumerate(rows) if row.is_greedy]
        sampled = [i for i, row in enumerate(rows) if not row.is_greedy]
        for group, pick in ((greedy, self._greedy), (sampled, self._sample)):
            if not group:
                continue
            chosen = logits if len(group) == len(rows) else logits[group]
            for i, token in zip(group, pick(chosen, [rows[i] for i in group]), strict=True):
                tokens[i] = token
        return tokens

    def _greedy(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> list[int]:
        fast = self._argmax is not None and logits.dtype == torch.bfloat16
        if fast and logits.device.type == "cpu" and logits.is_contiguous():
            assert self._argmax is not None
            return self._argmax(logits)
        return [int(token) for token in logits.float().argmax(dim=-1).tolist()]

    def _sample(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> list[int]:
        device = logits.device
        temperature = torch.tensor([row.temperature for row in rows], device=device)
        logits = logits.float().div_(temperature[:, None])
        if any(row.top_k > 0 for row in rows):
            logits = self._top_k(logits, [row.top_k for row in rows])
        # Unnormalised probabilities; the cumulative sum's last entry is the total mass.
        probs = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
        if any(row.top_p < 1.0 for row in rows):
            probs = self._top_p(
                probs.div_(probs.sum(dim=-1, keepdim=True)), [r.top_p for r in rows]
            )
        cdf = probs.cumsum_(dim=-1)
        uniform = torch.tensor([row.uniform for row in rows], device=device, dtype=cdf.dtype)
        target = (uniform * cdf[:, -1]).unsqueeze(1)
        picked = torch.searchsorted(cdf, target, right=True).squeeze(1)
        return [int(token) for token in picked.clamp_(max=cdf.shape[-1] - 1).tolist()]

    def _top_k(self, logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
        vocab = logits.shape[-1]
        ks = [min(k, vocab) if k > 0 else vocab for k in top_k]
        values = logits.topk(max(ks), dim=-1).values
        index = torch.tensor([k - 1 for k in ks], device=logits.device)
        threshold = values.gather(1, index[:, None])
        keep_all = torch.tensor([k <= 0 for k in top_k], device=logits.device)
        threshold = threshold.masked_fill(keep_all[:, None], float("-inf"))
        return logits.masked_fill(logits < threshold, float("-inf"))

    def _top_p(self, probs: torch.Tensor, top_p: list[float]) -> torch.Tensor:
        """Keeps, per row, the most likely tokens whose mass first reaches ``top_p``."""
        vocab = probs.shape[-1]
        values = probs.topk(min(TOP_P_CANDIDATES, vocab), dim=-1).values
        mass = values.cumsum(dim=-1)
        p = torch.tensor(top_p, device=probs.device, dtype=probs.dtype)[:, None]
        position = (mass < p).sum(dim=-1)
        short = ((position >= values.shape[-1]) & (p[:, 0] < 1.0)).nonzero().flatten().tolist()
        if short:
            full = probs[short].sort(dim=-1, descending=True).values
            full_position = (full.cumsum(dim=-1) < p[short]).sum(dim=-1).clamp_(max=vocab - 1)
            full_threshold = full.gather(1, full_position[:, None])
        position = position.clamp_(max=values.shape[-1] - 1)
        threshold = values.gather(1, position[:, None])
        if short:
            threshold[short] = full_threshold
        threshold = threshold.masked_fill(p >= 1.0, 0.0)
        return probs.masked_fill(probs < threshold, 0.0)
