"""Triton KV write and block copy / gather / scatter.

Contracts: :func:`pensieve.kernels.reference.write_kv_ref`,
:func:`~pensieve.kernels.reference.copy_blocks_ref`,
:func:`~pensieve.kernels.reference.gather_blocks_ref`,
:func:`~pensieve.kernels.reference.scatter_blocks_ref`.

Swap path (how the engine should use gather/scatter with a pinned host buffer):

* swap-out, per layer (or for a group of layers): on the copy stream, after an
  event recorded on the compute stream, ``gather_blocks(k_cache, gpu_ids,
  out=staging_gpu[:n])`` packs the blocks into a contiguous device staging
  buffer in one launch; then ``cpu_tier_staging[:n].copy_(staging_gpu[:n],
  non_blocking=True)`` (pinned host memory, one DMA); after the copy stream's
  event completes, the host scatters the staging rows into the CPU tier's
  blocks (``cpu_k[cpu_ids] = cpu_tier_staging[:n]``, or index_copy_). The GPU
  blocks may be reused only after that event.
* swap-in, per layer ``i``: the host gathers the CPU blocks into a pinned
  staging buffer (``torch.index_select(cpu_k, 0, cpu_ids, out=pinned[:n])``),
  the copy stream does ``staging_gpu[:n].copy_(pinned[:n], non_blocking=True)``
  then ``scatter_blocks(staging_gpu[:n], k_cache, gpu_ids)`` and records layer
  ``i``'s event; layer ``i``'s attention waits on that event only. Keep one
  pinned buffer per in-flight layer (or a ring) so the host never overwrites
  a buffer a DMA still reads.

All kernels compute offsets in int64 and treat each block as a contiguous run of
``numel / num_blocks`` elements (the cache layout [num_blocks, block_size,
num_kv_heads, head_dim] is contiguous per block).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._interpreter import apply_interpreter_patch

apply_interpreter_patch()


@triton.jit(do_not_specialize=["stride_kt", "stride_vt"])
def _write_kv_kernel(
    key_ptr, val_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    offs_h = tl.arange(0, H_PAD).to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HEAD_DIM) & (slot >= 0)
    k = tl.load(key_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(val_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    kc = kc_ptr + blk * stride_kcb + off * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :]
    vc = vc_ptr + blk * stride_vcb + off * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :]
    tl.store(kc, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(vc_ptr.dtype.element_ty), mask=mask)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def write_kv_triton(key, value, k_cache, v_cache, slot_mapping) -> None:
    num_tokens, num_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if key.stride(-1) != 1 or value.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the head dimension must be contiguous")
    block_size = k_cache.shape[1]
    slots = slot_mapping if slot_mapping.dtype in (torch.int32, torch.int64) else slot_mapping.to(torch.int64)
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slots,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, H_PAD=_next_pow2(num_heads), D_PAD=_next_pow2(head_dim),
        BLOCK_SIZE=block_size, num_warps=4,
    )


@triton.jit
def _copy_blocks_kernel(
    src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr, block_numel, stride_src, stride_dst,
    SRC_IDENTITY: tl.constexpr, DST_IDENTITY: tl.constexpr, CHUNK: tl.constexpr,
):
    i = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64)
    if SRC_IDENTITY:
        s = i.to(tl.int64)
    else:
        s = tl.load(src_ids_ptr + i).to(tl.int64)
    if DST_IDENTITY:
        d = i.to(tl.int64)
    else:
        d = tl.load(dst_ids_ptr + i).to(tl.int64)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    mask = offs < block_numel
    x = tl.load(src_ptr + s * stride_src + offs, mask=mask)
    tl.store(dst_ptr + d * stride_dst + offs, x.to(dst_ptr.dtype.element_ty), mask=mask)


def _check_blocks(t: torch.Tensor, name: str) -> int:
    if t.dim() < 1:
        raise ValueError(f"{name}: expected a block tensor [num_blocks, ...]")
    if t.shape[0] and not t[0].is_contiguous():
        raise ValueError(f"{name}: each block must be contiguous")
    numel = 1
    for s in t.shape[1:]:
        numel *= s
    return numel


_CHUNK = 4096


def _block_numel_and_chunk(src, dst) -> tuple[int, int]:
    """Elements per block (equal on both sides) and the elements one program copies."""
    numel = _check_blocks(src, "src")
    if _check_blocks(dst, "dst") != numel:
        raise ValueError("src and dst blocks differ in size")
    return numel, min(_CHUNK, _next_pow2(numel))


def _launch_copy(src, dst, src_ids, dst_ids, n, src_identity, dst_identity) -> None:
    if n == 0:
        return
    numel, chunk = _block_numel_and_chunk(src, dst)
    dummy = src_ids if src_ids is not None else dst_ids
    _copy_blocks_kernel[(n, triton.cdiv(numel, chunk))](
        src, dst, src_ids if src_ids is not None else dummy, dst_ids if dst_ids is not None else dummy,
        numel, src.stride(0), dst.stride(0),
        SRC_IDENTITY=src_identity, DST_IDENTITY=dst_identity, CHUNK=chunk, num_warps=4,
    )


def _ids(ids: torch.Tensor, device) -> torch.Tensor:
    ids = ids.to(device, non_blocking=True)
    return ids if ids.dtype in (torch.int32, torch.int64) else ids.to(torch.int64)


def copy_blocks_triton(src, dst, src_ids, dst_ids) -> None:
    """dst[dst_ids[i]] = src[src_ids[i]], src and dst on the same device."""
    n = src_ids.numel()
    if n != dst_ids.numel():
        raise ValueError("src_ids and dst_ids differ in length")
    _launch_copy(src, dst, _ids(src_ids, src.device), _ids(dst_ids, src.device), n, False, False)


def gather_blocks_triton(src, ids, out) -> torch.Tensor:
    """out[i] = src[ids[i]] (out: a contiguous staging buffer of >= len(ids) blocks)."""
    _launch_copy(src, out, _ids(ids, src.device), None, ids.numel(), False, True)
    return out


def scatter_blocks_triton(src, dst, ids) -> None:
    """dst[ids[i]] = src[i] (src: a staging buffer)."""
    _launch_copy(src, dst, None, _ids(ids, dst.device), ids.numel(), True, False)


# total/iters/programs/per_tensor change with every swap: compiling a variant per value class
# (1, multiple of 16, other) would happen while serving.
@triton.jit(do_not_specialize=["total", "iters", "programs", "per_tensor"])
def _swap_blocks_kernel(
    src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr, total, iters, programs, per_tensor, n_chunks, block_numel,
    stride_src_t, stride_dst_t, stride_src, stride_dst, CHUNK: tl.constexpr,
):
    # Persistent: a few programs stride over the (tensor, block, chunk) items, so that a
    # copy running beside the forward pass holds only a few SMs while it waits on
    # the link. Item k of program p is p + k * programs; past ``total`` it is masked.
    pid = tl.program_id(0)
    for k in range(0, iters):
        item = pid + k * programs
        valid = item < total
        item = tl.minimum(item, total - 1)
        t = (item // per_tensor).to(tl.int64)
        rest = item % per_tensor
        i = rest // n_chunks
        c = (rest % n_chunks).to(tl.int64)
        s = tl.load(src_ids_ptr + i).to(tl.int64)
        d = tl.load(dst_ids_ptr + i).to(tl.int64)
        offs = c * CHUNK + tl.arange(0, CHUNK)
        mask = (offs < block_numel) & valid
        x = tl.load(src_ptr + t * stride_src_t + s * stride_src + offs, mask=mask)
        tl.store(dst_ptr + t * stride_dst_t + d * stride_dst + offs, x.to(dst_ptr.dtype.element_ty), mask=mask)


#: Programs of a swap launch: enough loads in flight to fill the host link
#: (bench/swap_overlap.py measures 16-132), few enough to leave the SMs to compute.
SWAP_PROGRAMS = 32


def swap_blocks_triton(src, dst, src_ids, dst_ids, max_programs: int | None = None, stacked: bool = False) -> None:
    """dst[dst_ids[i]] = src[src_ids[i]] with one side in pinned host memory.

    The GPU's threads load from (or store to) the host side directly: pinned
    memory is mapped into the device's address space (unified addressing), so
    one launch moves every block over the link, with no staging copy and no
    per-block DMA call. ``src_ids``/``dst_ids`` live on the GPU.

    ``stacked``: src and dst are [T, num_blocks, ...], T caches side by side (the
    engine's K and V of a group of layers), and the launch copies the same blocks
    of each: dst[t, dst_ids[i]] = src[t, src_ids[i]] for every t < T.
    """
    device = src.device if src.is_cuda else dst.device
    n = src_ids.numel()
    if n != dst_ids.numel():
        raise ValueError("src_ids and dst_ids differ in length")
    if not stacked:
        src, dst = src.unsqueeze(0), dst.unsqueeze(0)
    if src.shape[0] != dst.shape[0]:
        raise ValueError(f"src and dst stack {src.shape[0]} and {dst.shape[0]} caches")
    if n == 0 or src.shape[0] == 0:
        return
    numel, chunk = _block_numel_and_chunk(src[0], dst[0])
    n_chunks = triton.cdiv(numel, chunk)
    per_tensor = n * n_chunks
    total = src.shape[0] * per_tensor
    programs = max(1, min(total, max_programs or SWAP_PROGRAMS))
    _swap_blocks_kernel[(programs,)](
        src, dst, _ids(src_ids, device), _ids(dst_ids, device), total, triton.cdiv(total, programs), programs,
        per_tensor, n_chunks, numel, src.stride(0), dst.stride(0), src.stride(1), dst.stride(1),
        CHUNK=chunk, num_warps=4,
    )
