"""Entry points that choose between the Triton kernels and the torch references.

``impl``: "triton" or "ref" (what an engine passes: it decides once, at
start-up, with :func:`resolve_impl`), or "auto" for direct callers (tests,
benchmarks): Triton on CUDA tensors, the reference elsewhere. Nothing here
reads the environment: the choice is the caller's, made once.
"""
from __future__ import annotations

import os

import torch

from . import reference

IMPLS = ("auto", "triton", "ref")


def resolve_impl(requested: str, device: torch.device) -> str:
    """The one decision between Triton and the reference for a process: "triton" or "ref".

    "auto" means Triton on CUDA devices and the reference elsewhere. Triton on a
    CPU device runs only in the interpreter (``TRITON_INTERPRET=1``, read here once).
    """
    if requested not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {requested!r}")
    impl = ("triton" if device.type == "cuda" else "ref") if requested == "auto" else requested
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("Triton kernels on a CPU run only in the interpreter: set TRITON_INTERPRET=1 "
                         "or use the reference (--attention-impl ref)")
    return impl


def _use_triton(t: torch.Tensor, impl: str) -> bool:
    if impl == "ref":
        return False
    if impl == "triton":
        return True
    if impl != "auto":
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return t.is_cuda


def prepare_paged_attention(seg_q_start, seg_pos_start, num_heads, num_kv_heads, **kwargs):
    """Launch plan of one step for :func:`paged_attention` (``metadata=``); reuse it across layers.

    See :func:`pensieve.kernels.triton_attention.prepare_paged_attention`.
    """
    from .triton_attention import prepare_paged_attention as _prep

    return _prep(seg_q_start, seg_pos_start, num_heads, num_kv_heads, **kwargs)


def decode_graph_plan(seg_q_start, seg_pos_start, batch, num_heads, num_kv_heads, **kwargs):
    """Static launch plan for decode steps captured in a CUDA graph.

    See :func:`pensieve.kernels.triton_attention.decode_graph_plan`.
    """
    from .triton_attention import decode_graph_plan as _plan

    return _plan(seg_q_start, seg_pos_start, batch, num_heads, num_kv_heads, **kwargs)


def paged_attention(
    query, k_cache, v_cache, block_tables, seg_q_start, seg_pos_start, scale, *,
    impl="auto", metadata=None, num_splits=None, out=None,
):
    """See :func:`pensieve.kernels.reference.paged_attention_ref` for the contract.

    Optional: ``metadata`` from :func:`prepare_paged_attention` (build once per
    step, pass to every layer); ``num_splits`` (None auto, 1 off, n forced; only
    without metadata); ``out`` [T, Hq, D] to write into (rows outside every
    segment are left untouched).
    """
    if _use_triton(query, impl):
        from .triton_attention import paged_attention_triton

        return paged_attention_triton(
            query, k_cache, v_cache, block_tables, seg_q_start, seg_pos_start, scale,
            metadata=metadata, num_splits=num_splits, out=out,
        )
    res = reference.paged_attention_ref(query, k_cache, v_cache, block_tables, seg_q_start, seg_pos_start, scale)
    if out is None:
        return res
    starts = seg_q_start.tolist()
    for s in range(len(starts) - 1):
        out[starts[s] : starts[s + 1]] = res[starts[s] : starts[s + 1]]
    return out


def write_kv(key, value, k_cache, v_cache, slot_mapping, *, impl="auto"):
    """See :func:`pensieve.kernels.reference.write_kv_ref`."""
    if _use_triton(key, impl) and key.device == k_cache.device:
        from .triton_cache import write_kv_triton

        write_kv_triton(key, value, k_cache, v_cache, slot_mapping)
        return
    reference.write_kv_ref(key, value, k_cache, v_cache, slot_mapping)


def copy_blocks(src, dst, src_ids, dst_ids, *, impl="auto"):
    """See :func:`pensieve.kernels.reference.copy_blocks_ref`. Triton only when src and dst share a device."""
    if _use_triton(src, impl) and src.device == dst.device and src.dtype == dst.dtype:
        from .triton_cache import copy_blocks_triton

        copy_blocks_triton(src, dst, src_ids, dst_ids)
        return
    reference.copy_blocks_ref(src, dst, src_ids, dst_ids)


def gather_blocks(src, ids, out=None, *, impl="auto"):
    """out[i] = src[ids[i]] in one launch (swap-out staging). Returns out.

    See :func:`pensieve.kernels.reference.gather_blocks_ref` and the swap notes
    in :mod:`pensieve.kernels.triton_cache`.
    """
    if out is None:
        out = torch.empty((ids.numel(),) + tuple(src.shape[1:]), dtype=src.dtype, device=src.device)
    if _use_triton(src, impl) and out.device == src.device and out.dtype == src.dtype:
        from .triton_cache import gather_blocks_triton

        return gather_blocks_triton(src, ids, out)
    return reference.gather_blocks_ref(src, ids, out)


def scatter_blocks(src, dst, ids, *, impl="auto"):
    """dst[ids[i]] = src[i] in one launch (swap-in from a staging buffer)."""
    if _use_triton(dst, impl) and src.device == dst.device and src.dtype == dst.dtype:
        from .triton_cache import scatter_blocks_triton

        scatter_blocks_triton(src, dst, ids)
        return
    reference.scatter_blocks_ref(src, dst, ids)


def swap_blocks(src, dst, src_ids, dst_ids, *, impl="auto", max_programs=None, stacked=False):
    """dst[dst_ids[i]] = src[src_ids[i]] between the CPU tier and the GPU cache.

    With a CUDA tensor on one side and a pinned host tensor on the other, the
    Triton path is one launch in which the GPU reads or writes the host memory
    directly (ids on the GPU; launch it on the stream that orders the copy).
    Anything else (CPU only, unpinned host memory, ``impl="ref"``) takes the
    reference, which copies through the usual transfers. ``max_programs`` caps
    the launch's programs (default ``triton_cache.SWAP_PROGRAMS``). ``stacked``:
    src and dst are [T, num_blocks, ...] and the same blocks of each of the T
    caches are copied, in one launch on the Triton path.
    """
    if src_ids.numel() != dst_ids.numel():
        raise ValueError("src_ids and dst_ids differ in length")
    if stacked and src.shape[0] != dst.shape[0]:
        raise ValueError(f"src and dst stack {src.shape[0]} and {dst.shape[0]} caches")
    cross = src.is_cuda != dst.is_cuda
    host = dst if src.is_cuda else src
    if cross and src.dtype == dst.dtype and host.is_pinned() and _use_triton(src if src.is_cuda else dst, impl):
        from .triton_cache import swap_blocks_triton

        swap_blocks_triton(src, dst, src_ids, dst_ids, max_programs, stacked=stacked)
        return
    for s, d in zip(src, dst) if stacked else [(src, dst)]:
        reference.copy_blocks_ref(s, d, src_ids, dst_ids)


def rms_norm(x, weight, eps, residual=None, *, impl="auto"):
    """RMSNorm, fused with the residual add when ``residual`` is given; returns (normed, residual).
    See :func:`pensieve.kernels.reference.rms_norm_ref` (the Triton path updates ``residual`` in place)."""
    if _use_triton(x, impl) and x.dim() == 2:
        from .triton_fused import rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)
    return reference.rms_norm_ref(x, weight, eps, residual)


def silu_and_mul(gate_up, *, impl="auto"):
    """See :func:`pensieve.kernels.reference.silu_and_mul_ref`."""
    if _use_triton(gate_up, impl) and gate_up.dim() == 2:
        from .triton_fused import silu_and_mul_triton

        return silu_and_mul_triton(gate_up)
    return reference.silu_and_mul_ref(gate_up)


def rotary_write_kv(qkv, positions, cos_sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, *,
                    impl="auto"):
    """Rotary on q and k, k and v into the cache; returns q [T, Hq, D].
    See :func:`pensieve.kernels.reference.rotary_write_kv_ref`."""
    head_dim = k_cache.shape[-1]
    pow2 = head_dim >= 2 and head_dim & (head_dim - 1) == 0
    if _use_triton(qkv, impl) and pow2 and qkv.device == k_cache.device:
        from .triton_fused import rotary_write_kv_triton

        return rotary_write_kv_triton(qkv, positions, cos_sin, k_cache, v_cache, slot_mapping,
                                      num_heads, num_kv_heads)
    return reference.rotary_write_kv_ref(qkv, positions, cos_sin, k_cache, v_cache, slot_mapping,
                                         num_heads, num_kv_heads)
