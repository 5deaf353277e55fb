"""Building blocks shared by the model families."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from pensieve.kernels import paged_attention, rms_norm, rotary_write_kv


@dataclass
class AttentionMetadata:
    """Where each token of a flat batch goes in the paged KV cache (built once per step).

    slot_mapping:  int64 [T]   cache slot of each new token's key/value
    block_tables:  int32 [S, max_blocks] one row per query segment
    seg_q_start:   int32 [S+1] segment s owns rows seg_q_start[s]:seg_q_start[s+1]
    seg_pos_start: int32 [S]   context position of each segment's first token
    wait_for_layer: called before layer i reads the cache, so that a swap-in of
                    that layer (on its own stream) can finish just in time.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seg_q_start: torch.Tensor
    seg_pos_start: torch.Tensor
    impl: str  # "triton" or "ref": resolved once by the runner (pensieve.kernels.resolve_impl)
    wait_for_layer: Callable[[int], None] | None = None
    kernel_plan: object | None = None  # the Triton kernel's launch plan, built once per step


class Attention(nn.Module):
    """Rotates q and k (when the model has a rotary table), writes the new keys and
    values into the paged cache (one fused kernel), then attends over the cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, layer_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.layer_idx = layer_idx

    def forward(self, qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor | None,
                meta: AttentionMetadata, kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """qkv: [T, (Hq + 2 Hkv) * D], q then k then v. Returns [T, Hq * D]."""
        if meta.wait_for_layer is not None:
            meta.wait_for_layer(self.layer_idx)  # this layer's swap-ins (and urgent swap-outs) are done
        k_cache, v_cache = kv_cache
        q = rotary_write_kv(qkv, positions, cos_sin, k_cache, v_cache, meta.slot_mapping,
                            self.num_heads, self.num_kv_heads, impl=meta.impl)
        out = paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seg_q_start, meta.seg_pos_start,
                              self.scale, impl=meta.impl, metadata=meta.kernel_plan)
        return out.reshape(-1, self.num_heads * self.head_dim)


class RMSNorm(nn.Module):
    """RMSNorm; given a residual, adds it first (fused) and returns the sum as the new residual."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, impl: str, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual, impl=impl)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the rotate-half layout of Hugging Face checkpoints."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        inv_freq = _scale_inv_freq(inv_freq, scaling)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        # float32 [max_positions, 2, head_dim]: cos then sin of each position (kept in
        # float32 whatever the model dtype; the kernel rotates in float32).
        self.register_buffer("cos_sin", torch.stack([emb.cos(), emb.sin()], dim=1), persistent=False)


def _scale_inv_freq(inv_freq: torch.Tensor, scaling: dict | None) -> torch.Tensor:
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise NotImplementedError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


# ---------------------------------------------------------------- tensor parallelism (Megatron sharding)
#
# Every parameter whose rank-local shape differs from the checkpoint's carries
# ``tp_take(full) -> local``: the one function that cuts this rank's shard out of the
# full tensor (checkpoint loading of unfused tensors, and dummy weights, which are
# generated at full size on every rank and cut, so that a shard at size N is exactly a
# slice of the size-1 tensor). ``tp_full_shape`` is that full shape. Parameters
# without them are replicated. At size 1 the factories return plain nn.Linear and
# nn.Embedding: the single-device path has no collective and no extra call.


def mark_shard(param: nn.Parameter, full_shape: tuple[int, ...], take: Callable) -> None:
    param.tp_full_shape = tuple(full_shape)
    param.tp_take = take


def column_linear(in_features: int, out_sizes: list[int], bias: bool, tp) -> nn.Linear:
    """y = x W^T with W's output rows split across ranks; ``out_sizes``: the full sizes of the
    pieces fused into one matmul (q, k, v or gate, up), each split separately. No collective."""
    local = [tp.split(n, "projection width") for n in out_sizes]
    layer = nn.Linear(in_features, sum(local), bias=bias)
    if tp.enabled:
        def take(full: torch.Tensor) -> torch.Tensor:
            return torch.cat([tp.narrow(p, 0) for p in full.split(out_sizes, dim=0)], dim=0)
        mark_shard(layer.weight, (sum(out_sizes), in_features), take)
        if bias:
            mark_shard(layer.bias, (sum(out_sizes),), take)
    return layer


class RowParallelLinear(nn.Linear):
    """y = sum over ranks of x_r W_r^T, then the bias once: input features split across
    ranks (the output of a column-parallel layer), one all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp):
        super().__init__(tp.split(in_features, "projection width"), out_features, bias=bias)
        self.tp = tp
        mark_shard(self.weight, (out_features, in_features), lambda full: tp.narrow(full, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(nn.functional.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y


def row_linear(in_features: int, out_features: int, bias: bool, tp) -> nn.Linear:
    if not tp.enabled:
        return nn.Linear(in_features, out_features, bias=bias)
    return RowParallelLinear(in_features, out_features, bias, tp)


class VocabParallelEmbedding(nn.Embedding):
    """Each rank holds ``vocab_part`` rows of the table; ids outside them embed to zero
    here and the all-reduce sums the one rank's row into every rank."""

    def __init__(self, vocab: int, dim: int, tp):
        super().__init__(tp.vocab_part(vocab), dim)
        self.tp = tp
        self.start = tp.rank * self.num_embeddings
        mark_shard(self.weight, (vocab, dim), tp.vocab_shard)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        x = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(x.masked_fill(outside.unsqueeze(-1), 0.0))


def vocab_embedding(vocab: int, dim: int, tp) -> nn.Embedding:
    return nn.Embedding(vocab, dim) if not tp.enabled else VocabParallelEmbedding(vocab, dim, tp)


class LMHead(nn.Linear):
    """Logits: each rank its ``vocab_part`` rows of the output matrix; the slices are
    gathered (every rank gets them; rank 0 samples) and the padding rows cut off."""

    def __init__(self, dim: int, vocab: int, tp):
        super().__init__(dim, tp.vocab_part(vocab), bias=False)
        self.tp, self.vocab = tp, vocab
        mark_shard(self.weight, (vocab, dim), tp.vocab_shard)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tp.gather_last(nn.functional.linear(hidden, self.weight))[..., :self.vocab]


def lm_head(dim: int, vocab: int, tp) -> nn.Linear:
    return nn.Linear(dim, vocab, bias=False) if not tp.enabled else LMHead(dim, vocab, tp)
