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
