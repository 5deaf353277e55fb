"""Entry points that choose between the Triton kernels and the torch references."""
from __future__ import annotations

import torch

from . import reference


def _use_triton(t: torch.Tensor, impl: str) -> bool:
    if impl == "ref":
        return False
    if impl == "triton":
        return True
    if impl != "auto":
        raise ValueError(f"impl must be 'auto', 'ref' or 'triton', got {impl!r}")
    return t.is_cuda


def paged_attention(query, k_cache, v_cache, block_tables, seg_q_start, seg_pos_start, scale, *, impl="auto"):
    """See :func:`pensieve.kernels.reference.paged_attention_ref` for the contract."""
    if _use_triton(query, impl):
        raise NotImplementedError("Triton paged attention is not built yet")
    return reference.paged_attention_ref(query, k_cache, v_cache, block_tables, seg_q_start, seg_pos_start, scale)


def write_kv(key, value, k_cache, v_cache, slot_mapping, *, impl="auto"):
    """See :func:`pensieve.kernels.reference.write_kv_ref`."""
    if _use_triton(key, impl):
        raise NotImplementedError("Triton KV write is not built yet")
    reference.write_kv_ref(key, value, k_cache, v_cache, slot_mapping)


def copy_blocks(src, dst, src_ids, dst_ids, *, impl="auto"):
    """See :func:`pensieve.kernels.reference.copy_blocks_ref`."""
    if _use_triton(src, impl) and src.is_cuda and dst.is_cuda:
        raise NotImplementedError("Triton block copy is not built yet")
    reference.copy_blocks_ref(src, dst, src_ids, dst_ids)
