"""The forward pass of Llama-family models (Llama, Mistral, Qwen2, Qwen3) over the slot KV cache.

Weights are taken from a loaded Hugging Face model (q/k/v and gate/up fused into one matrix
each) and the HF model is dropped. One ``forward`` runs every token of a step as one packed
batch through the linear layers; attention runs once for all decode rows (a view of the cache,
masked by length) and once per prefill chunk; keys and values of grouped-query heads are never
repeated. Called by the runner on the engine loop thread.

On a CPU in bf16 the glue between the matrix products (RMS norms with the residual adds, rotary
embedding with the cache writes, SiLU-and-multiply, and the decode attention) runs in the fused
kernels of ``native`` when they could be built here: the same rounding steps as the PyTorch
code, in one call each instead of four to eight small operators.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llmtree.engine import native
from llmtree.engine.kv_cache import KVCache
from llmtree.engine.linear import INT4_MAX_ROWS, INT4_MAX_ROWS_AMX, Linear, can_pack
from llmtree.engine.native_layers import NativeLayers
from llmtree.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(slots=True)
class DecodeRows:
    """Attention metadata for the first ``num_rows`` tokens of a step (one per decoding slot)."""

    num_rows: int
    slots: torch.Tensor
    """Slot of each row, ascending."""
    positions: torch.Tensor
    """Where each row's key and value go (the sequence's length before this token)."""
    cache_rows: torch.Tensor | None
    """``[num_rows * kv_heads]``: where each row's keys go in ``KVCache.rows(layer)``
    (PyTorch path only)."""
    width: int
    """Cache rows the attention spans: highest slot + 1."""
    length: int
    """Cache positions the attention spans: the longest sequence, this token included."""
    mask: torch.Tensor | None
    """``[width, 1, 1, length]``: 0 where a row may attend, -inf elsewhere (PyTorch path only)."""
    is_dense: bool
    """True when the slots are exactly 0..num_rows-1, so no scatter is needed."""


@dataclass(slots=True)
class PrefillRows:
    """Attention metadata for one prefill chunk: ``num_tokens`` rows from ``row``."""

    row: int
    num_tokens: int
    slot: int
    start: int
    mask: torch.Tensor | None
    """``[num_tokens, start + num_tokens]``: causal, additive (0 or -inf); PyTorch path only."""


@dataclass(slots=True)
class ForwardBatch:
    """Everything one forward needs; built by the runner from a step plan."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    """The cache slot of every row."""
    lengths: torch.Tensor
    """Cache positions every row attends to: its position + 1."""
    decode: DecodeRows | None
    prefills: list[PrefillRows]
    sample_rows: torch.Tensor
    """Rows whose hidden state becomes logits (decodes, and the last row of finished prompts)."""


@dataclass(slots=True)
class Layer:
    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None


def _cat(*tensors: torch.Tensor | None) -> torch.Tensor | None:
    present = [t.detach() for t in tensors if t is not None]
    return torch.cat(present) if present else None


def _release(module: Any) -> None:
    """Frees a Hugging Face module's weights once they are copied into this forward."""
    for parameter in module.parameters():
        parameter.data = torch.empty(0, dtype=parameter.dtype, device=parameter.device)


def check_supported(config: Any) -> None:
    """Raises ConfigError unless this forward can run the model described by ``config``."""
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model type {model_type!r} is not supported; llmtree runs Llama-family models "
            f"({', '.join(SUPPORTED_MODEL_TYPES)}). Set LLMTREE_MODEL to one of those."
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ConfigError(f"activation {config.hidden_act!r} is not supported (only silu)")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in STATIC_ROPE_TYPES:
        raise ConfigError(f"rope type {rope.get('rope_type')!r} is not supported")


class LlamaForward:
    """Fused weights of a Llama-family model and its forward over a ``KVCache``.

    Takes the weights out of ``hf_model`` (which is emptied) and casts them to ``dtype``.
    """

    def __init__(
        self,
        hf_model: Any,
        max_len: int,
        dtype: torch.dtype,
        allow_int4: bool = True,
        allow_native: bool = True,
    ) -> None:
        """``allow_int4`` False keeps every weight dense (a row's numbers then never depend on
        how many sequences decode beside it); ``allow_native`` False keeps the PyTorch path."""
        config = hf_model.config
        self._allow_int4 = allow_int4
        check_supported(config)
        inner = hf_model.model
        self.num_heads: int = config.num_attention_heads
        self.num_kv_heads: int = config.num_key_value_heads
        self.head_dim: int = getattr(config, "head_dim", None) or (
            config.hidden_size // self.num_heads
        )
        self.groups = self.num_heads // self.num_kv_heads
        self.vocab_size: int = config.vocab_size
        self.eps: float = config.rms_norm_eps
        self.dtype = dtype
        self.device: torch.device = inner.embed_tokens.weight.device
        self._pack = can_pack(self.device, dtype)
        q_norm = getattr(inner.layers[0].self_attn, "q_norm", None) if inner.layers else None
        self.kernels = self._native_kernels(q_norm is not None) if allow_native else None
        self.layers = []
        for layer in inner.layers:
            self.layers.append(self._layer(layer))
            _release(layer)
        self.norm = inner.norm.weight.detach().to(dtype)
        self.embed = inner.embed_tokens.weight.detach().to(dtype)
        self.lm_head = Linear(
            hf_model.lm_head.weight,  # the embedding where tied; as loaded, float32 from a GGUF
            None,
            dtype,
            self._pack,
            allow_int4=False,
            kernels=self.kernels,
            allow_q8=allow_int4,
        )
        rotary = inner.rotary_emb
        positions = torch.arange(max_len, dtype=torch.float32, device=self.device)
        freqs = positions[:, None] * rotary.inv_freq.to(self.device, torch.float32)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = float(rotary.attention_scaling)
        self.cos = (emb.cos() * scale).to(dtype)
        sin = (emb.sin() * scale).to(dtype)
        half = self.head_dim // 2
        self.sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        self.uses_int4 = any(layer.qkv.four_bit for layer in self.layers)
        self.int4_max_rows = (
            INT4_MAX_ROWS_AMX
            if self.layers and self.layers[0].qkv.amx is not None
            else INT4_MAX_ROWS
        )
        """Steps with at most this many decode rows multiply them by the int4 weights."""
        self._layer_loop: tuple[KVCache, NativeLayers | None] | None = None

    def _native_kernels(self, has_qk_norm: bool) -> native.CpuKernels | None:
        """The fused CPU kernels, where they fit this model and device (else None)."""
        fits = (
            self.device.type == "cpu"
            and self.dtype == torch.bfloat16
            and not has_qk_norm
            and self.head_dim <= 512
            and self.head_dim % 2 == 0
        )
        return native.load() if fits else None

    @property
    def needs_masks(self) -> bool:
        """True when attention runs in PyTorch (it takes masks and cache row indexes)."""
        return self.kernels is None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _linear(self, *modules: Any) -> Linear:
        """One ``Linear`` of the HF linears ``modules`` stacked along their outputs."""
        weight = _cat(*(m.weight for m in modules))
        assert weight is not None
        bias = _cat(*(m.bias for m in modules))
        return Linear(
            weight, bias, self.dtype, self._pack, allow_int4=self._allow_int4, kernels=self.kernels
        )

    def _layer(self, layer: Any) -> Layer:
        attn, mlp = layer.self_attn, layer.mlp
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        return Layer(
            qkv=self._linear(attn.q_proj, attn.k_proj, attn.v_proj),
            o=self._linear(attn.o_proj),
            gate_up=self._linear(mlp.gate_proj, mlp.up_proj),
            down=self._linear(mlp.down_proj),
            input_norm=layer.input_layernorm.weight.detach().to(self.dtype),
            post_norm=layer.post_attention_layernorm.weight.detach().to(self.dtype),
            q_norm=None if q_norm is None else q_norm.weight.detach().to(self.dtype),
            k_norm=None if k_norm is None else k_norm.weight.detach().to(self.dtype),
        )

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """As Hugging Face computes it: in float32, scaled by the weight in the model dtype."""
        hidden = x.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True).add_(self.eps))
        return hidden.to(x.dtype).mul_(weight)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding; ``sin`` has its first half negated (``rotate_half`` as a roll)."""
        return x * cos + x.roll(self.head_dim // 2, dims=-1) * sin

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """Logits ``[len(sample_rows), vocab]`` of one step; writes the step's keys and values."""
        if self.kernels is not None:
            return self._forward_native(self.kernels, batch, cache)
        x = F.embedding(batch.input_ids, self.embed)
        cos = self.cos[batch.positions].unsqueeze(1)
        sin = self.sin[batch.positions].unsqueeze(1)
        rows = x.shape[0]
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        decodes = batch.decode.num_rows if batch.decode is not None else 0
        compact = decodes <= self.int4_max_rows
        small = decodes if compact else 0
        for index, layer in enumerate(self.layers):
            qkv = layer.qkv(self.rms_norm(x, layer.input_norm), small).view(rows, -1, head_dim)
            qk, v = qkv[:, : heads + kv_heads], qkv[:, heads + kv_heads :]
            if layer.q_norm is not None and layer.k_norm is not None:
                q, k = (
                    self.rms_norm(qk[:, :heads], layer.q_norm),
                    self.rms_norm(qk[:, heads:], layer.k_norm),
                )
                qk = torch.cat((q, k), dim=1)
            qk = self.rope(qk, cos, sin)
            attn = self._attention(index, qk[:, :heads], qk[:, heads:], v, batch, cache)
            x = x + layer.o(attn, small)
            gate, up = layer.gate_up(self.rms_norm(x, layer.post_norm), small).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up, small)
        return self.head(self.rms_norm(x[batch.sample_rows], self.norm), compact)

    def _forward_native(
        self, kernels: native.CpuKernels, batch: ForwardBatch, cache: KVCache
    ) -> torch.Tensor:
        """``forward`` with the fused CPU kernels; the same numbers up to the attention sums.

        The kernels and the AMX products write into buffers made once per step (hidden,
        attention, activation, and the products' outputs) rather than a new tensor per call: a
        step makes a few hundred calls (measured: a fresh output tensor took 17 us inside a
        32-row step, 3 us in a quiet loop; the step with buffers 1.08x faster, median of four
        interleaved runs)."""
        x = F.embedding(batch.input_ids, self.embed)
        decodes = batch.decode.num_rows if batch.decode is not None else 0
        compact = decodes <= self.int4_max_rows
        small = decodes if compact else 0
        eps, layers, heads = self.eps, self.layers, self.num_heads
        hidden = kernels.rms_norm(x, layers[0].input_norm, eps)
        loop = self._native_layers(kernels, cache)
        if loop is not None and loop.run(
            x, hidden, small, batch.slots, batch.positions, batch.lengths
        ):
            return self.head(hidden[batch.sample_rows], compact)
        rows = x.shape[0]
        attention = x.new_empty(rows, heads * self.head_dim)
        activation: torch.Tensor | None = None
        qkv_out = x.new_empty(rows, layers[0].qkv.out_features)
        gate_up_out = x.new_empty(rows, layers[0].gate_up.out_features)
        delta_out = torch.empty_like(x)
        for index, layer in enumerate(layers):
            qkv = layer.qkv(hidden, small, qkv_out)
            k_cache, v_cache = cache.layer(index)
            kernels.rope_attention(
                qkv,
                self.cos,
                self.sin,
                batch.slots,
                batch.positions,
                batch.lengths,
                heads,
                k_cache,
                v_cache,
                attention,
            )
            delta = layer.o(attention, small, delta_out).contiguous()
            kernels.add_rms_norm(x, delta, layer.post_norm, eps, out=hidden)
            activation = kernels.silu_mul(layer.gate_up(hidden, small, gate_up_out), out=activation)
            delta = layer.down(activation, small, delta_out).contiguous()
            if index + 1 < len(layers):
                kernels.add_rms_norm(x, delta, layers[index + 1].input_norm, eps, out=hidden)
            else:
                x.add_(delta)
        return self.head(kernels.rms_norm(x[batch.sample_rows], self.norm, eps), compact)

    def _native_layers(self, kernels: native.CpuKernels, cache: KVCache) -> NativeLayers | None:
        """The layer loop in one kernel call over ``cache`` (None where it cannot run: the
        Python loop then runs), decided and made once per cache."""
        if self._layer_loop is None or self._layer_loop[0] is not cache:
            built = None
            if NativeLayers.fits(kernels, self.layers):
                rest = (self.norm, cache, self.cos, self.sin, self.num_heads, self.eps)
                built = NativeLayers(kernels, self.layers, *rest)
            self._layer_loop = (cache, built)
        return self._layer_loop[1]

    def head(self, hidden: torch.Tensor, compact: bool) -> torch.Tensor:
        """Logits of the sampled rows. Steps that take the int4 forms for their decode rows (few
        decode rows, or none) take the head's 8-bit form for every sampled row, so a row's
        numbers still depend only on how many sequences decode beside it."""
        return self.lm_head(hidden, hidden.shape[0] if compact else 0)

    def _attention(
        self,
        index: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        cache: KVCache,
    ) -> torch.Tensor:
        """Writes k/v into the cache and attends; returns ``[rows, heads * head_dim]``."""
        num_rows = q.shape[0]
        k_cache, v_cache = cache.layer(index)
        head_dim = self.head_dim
        decode = batch.decode
        out = None if not batch.prefills else q.new_empty(num_rows, self.num_heads * head_dim)
        if decode is not None:
            n = decode.num_rows
            assert decode.cache_rows is not None and decode.mask is not None
            k_rows, v_rows = cache.rows(index)
            k_rows.index_copy_(0, decode.cache_rows, k[:n].reshape(-1, head_dim))
            v_rows.index_copy_(0, decode.cache_rows, v[:n].reshape(-1, head_dim))
            # The heads sharing a kv head become that head's query rows (2x faster on CPU
            # than enable_gqa for one-token queries).
            query = q[:n].view(n, self.num_kv_heads, self.groups, head_dim)
            if not decode.is_dense:
                dense = q.new_zeros(decode.width, self.num_kv_heads, self.groups, head_dim)
                dense[decode.slots] = query
                query = dense
            result = F.scaled_dot_product_attention(
                query,
                k_cache[: decode.width, :, : decode.length],
                v_cache[: decode.width, :, : decode.length],
                attn_mask=decode.mask,
            )
            if not decode.is_dense:
                result = result[decode.slots]
            if out is None:
                return result.reshape(n, -1)
            out[:n] = result.reshape(n, -1)
        assert out is not None
        for chunk in batch.prefills:
            rows = slice(chunk.row, chunk.row + chunk.num_tokens)
            end, size = chunk.start + chunk.num_tokens, chunk.num_tokens
            assert chunk.mask is not None
            k_cache[chunk.slot, :, chunk.start : end] = k[rows].transpose(0, 1)
            v_cache[chunk.slot, :, chunk.start : end] = v[rows].transpose(0, 1)
            result = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1).unsqueeze(0),
                k_cache[chunk.slot : chunk.slot + 1, :, :end],
                v_cache[chunk.slot : chunk.slot + 1, :, :end],
                attn_mask=chunk.mask,
                enable_gqa=True,
            )
            out[rows] = result[0].transpose(0, 1).reshape(size, -1)
        return out
