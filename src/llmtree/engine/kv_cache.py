"""The slot KV cache: keys and values of every running sequence, one row (slot) each.

Layout ``[layers, slots, kv_heads, max_len, head_dim]`` for keys and for values, so the decode
attention reads ``cache[layer, :n, :, :length]`` as a view, without gathering. On CPU the memory
is an anonymous mapping: pages are only backed when a token is written there, and
``release(slot)`` hands a finished sequence's pages back to the OS, so resident memory follows
the tokens actually held, not ``slots * max_len``. Used by the runner on the engine loop thread.
"""

from __future__ import annotations

import mmap

import torch


class KVCache:
    """Pre-allocated keys and values for ``num_slots`` sequences of up to ``max_len`` tokens."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        self.num_slots = num_slots
        self.max_len = max_len
        self._buffers: list[mmap.mmap] = []
        if device.type == "cpu":
            self.k = self._lazy_cpu_tensor(dtype)
            self.v = self._lazy_cpu_tensor(dtype)
        else:
            # Zeros, not garbage: masked positions are multiplied by 0, and 0 * NaN is NaN.
            self.k = torch.zeros(self.shape, dtype=dtype, device=device)
            self.v = torch.zeros(self.shape, dtype=dtype, device=device)
        self._layers = [(self.k[i], self.v[i]) for i in range(num_layers)]
        self._rows = [(k.view(-1, head_dim), v.view(-1, head_dim)) for k, v in self._layers]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer, ``[slots, kv_heads, max_len, head_dim]`` each."""
        return self._layers[index]

    def rows(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same memory as ``[slots * kv_heads * max_len, head_dim]``, for row writes."""
        return self._rows[index]

    def row_index(self, slot: int, position: int) -> list[int]:
        """Where the keys of ``slot`` at ``position`` are in ``rows()``, one per kv head."""
        _, _, heads, max_len, _ = self.shape
        return [(slot * heads + head) * max_len + position for head in range(heads)]

    @property
    def slot_bytes(self) -> int:
        """Bytes one slot spans in one layer of keys (or values)."""
        _, _, heads, max_len, head_dim = self.shape
        return heads * max_len * head_dim * self.k.element_size()

    def release(self, slot: int) -> None:
        """Gives the memory of ``slot`` back to the OS (CPU only; its contents become zeros)."""
        if not self._buffers:
            return
        page = mmap.PAGESIZE
        num_layers, num_slots = self.shape[0], self.shape[1]
        for buffer in self._buffers:
            for layer in range(num_layers):
                begin = (layer * num_slots + slot) * self.slot_bytes
                start = -(-begin // page) * page
                end = (begin + self.slot_bytes) // page * page
                if end > start:
                    buffer.madvise(mmap.MADV_DONTNEED, start, end - start)

    def _lazy_cpu_tensor(self, dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for size in self.shape:
            numel *= size
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            buffer.madvise(mmap.MADV_NOHUGEPAGE)
        self._buffers.append(buffer)
        return torch.frombuffer(buffer, dtype=dtype).view(self.shape)
