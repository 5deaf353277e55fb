"""Torch references of every Pensieve kernel.

These are the oracle for the Triton kernels' tests and the implementation used
on machines without a GPU. They favour clarity over speed, but avoid
per-token Python loops so the CPU engine stays usable.

Cache layout (one tensor per layer for keys, one for values):
    cache[num_blocks, block_size, num_kv_heads, head_dim]
A *slot* is ``block_id * block_size + offset``.
"""
from __future__ import annotations

import torch


def write_kv_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter ``key``/``value`` [T, Hkv, D] into the caches at ``slot_mapping`` [T].

    Slots < 0 are skipped (padding tokens).
    """
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    slots = slot_mapping.to(torch.int64)
    keep = slots >= 0
    if not bool(keep.all()):
        slots, key, value = slots[keep], key[keep], value[keep]
    k_cache.view(num_blocks * block_size, num_kv_heads, head_dim).index_copy_(0, slots, key.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, num_kv_heads, head_dim).index_copy_(0, slots, value.to(v_cache.dtype))


def paged_attention_ref(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seg_q_start: torch.Tensor,
    seg_pos_start: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of ragged query segments over a paged KV cache.

    query:         [T, Hq, D]; segments are contiguous row ranges of it.
    block_tables:  int32 [S, max_blocks]; row s lists segment s's blocks in
                   context order (entries past the segment's length are ignored).
    seg_q_start:   int32 [S + 1]; segment s owns query rows
                   ``seg_q_start[s]:seg_q_start[s+1]`` (may be empty).
    seg_pos_start: int32 [S]; absolute context position of segment s's first
                   query token. Query token j of segment s sits at position
                   ``p = seg_pos_start[s] + j`` and attends to keys 0..p.
    Keys and values of every attended position must already be in the cache.
    Two segments may share one block table (a request whose dropped leading
    tokens are recomputed together with its new prompt).

    Returns [T, Hq, D] in query's dtype; accumulation in float32.
    """
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    starts = seg_q_start.tolist()
    pos_starts = seg_pos_start.tolist()
    for s in range(len(pos_starts)):
        q0, q1 = starts[s], starts[s + 1]
        if q1 == q0:
            continue
        kv_len = pos_starts[s] + (q1 - q0)
        n_blocks = (kv_len + block_size - 1) // block_size
        blocks = block_tables[s, :n_blocks].to(torch.int64)
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:kv_len].float()
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:kv_len].float()
        q = query[q0:q1].float()  # [q, Hq, D]
        # [Hkv, group, q, D] x [Hkv, D, kv] -> [Hkv, group, q, kv]
        qh = q.view(q1 - q0, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        scores = torch.matmul(qh, k.permute(1, 2, 0).unsqueeze(1)) * scale
        q_pos = pos_starts[s] + torch.arange(q1 - q0, device=query.device)
        k_pos = torch.arange(kv_len, device=query.device)
        scores.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = torch.matmul(probs, v.permute(1, 0, 2).unsqueeze(1))  # [Hkv, group, q, D]
        out[q0:q1] = o.permute(2, 0, 1, 3).reshape(q1 - q0, num_heads, head_dim).to(query.dtype)
    return out


def copy_blocks_ref(
    src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor
) -> None:
    """dst[dst_ids[i]] = src[src_ids[i]] for block tensors [num_blocks, ...].

    src and dst may live on different devices (the swap path) or be the same
    tensor (defragmentation); ids must not overlap between the two lists when
    they are the same tensor.
    """
    if src_ids.numel() == 0:
        return
    picked = src.index_select(0, src_ids.to(src.device, torch.int64))
    dst.index_copy_(0, dst_ids.to(dst.device, torch.int64), picked.to(dst.device, non_blocking=True))


def gather_blocks_ref(src: torch.Tensor, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """out[i] = src[ids[i]]: pack blocks into a contiguous staging buffer (swap-out).

    ``out`` (optional) has at least ``len(ids)`` blocks, on any device; rows past
    ``len(ids)`` are left untouched. Returns ``out`` (or a new tensor).
    """
    picked = src.index_select(0, ids.to(src.device, torch.int64))
    if out is None:
        return picked
    out[: ids.numel()].copy_(picked)
    return out


def scatter_blocks_ref(src: torch.Tensor, dst: torch.Tensor, ids: torch.Tensor) -> None:
    """dst[ids[i]] = src[i]: unpack a staging buffer into cache blocks (swap-in)."""
    n = ids.numel()
    if n == 0:
        return
    dst.index_copy_(0, ids.to(dst.device, torch.int64), src[:n].to(dst.device, dst.dtype))


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm of ``x`` [T, H] (of ``x + residual`` when given), as Hugging Face's Llama computes it.

    Returns ``(normed, new_residual)``: ``new_residual = x + residual`` rounded to
    ``x``'s dtype (None without a residual). The norm is taken in float32, rounded
    to the input dtype, then scaled by ``weight``.
    """
    if residual is not None:
        x = x + residual
        residual = x
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype), residual


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up`` [T, 2I] holding gate then up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_write_kv_ref(
    qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor | None,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    num_heads: int, num_kv_heads: int,
) -> torch.Tensor:
    """Rotary embedding (rotate-half layout) on q and k, then k and v into the cache.

    qkv:     [T, (Hq + 2 Hkv) * D], q then k then v (one projection's output).
    cos_sin: float32 [max_pos, 2, D] (cos then sin per position), or None: no rotary.
    Returns the rotated query [T, Hq, D] in qkv's dtype. Rotation in float32,
    one rounding to the dtype at the end. Slots < 0 are skipped.
    """
    head_dim = k_cache.shape[-1]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.reshape(-1, num_heads, head_dim)
    k = k.reshape(-1, num_kv_heads, head_dim)
    v = v.reshape(-1, num_kv_heads, head_dim)
    if cos_sin is not None:
        cs = cos_sin.index_select(0, positions.to(torch.int64))
        cos, sin = cs[:, 0].unsqueeze(1), cs[:, 1].unsqueeze(1)
        q = (q.float() * cos + _rotate_half(q.float()) * sin).to(qkv.dtype)
        k = (k.float() * cos + _rotate_half(k.float()) * sin).to(qkv.dtype)
    write_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    return q
