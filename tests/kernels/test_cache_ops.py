"""Triton KV write and block copy / gather / scatter against the torch references.

These ops move bits: the Triton result must equal the reference exactly
(torch.equal; NaN-poisoned destinations make unwritten or stray writes visible).
"""
from __future__ import annotations

import pytest
import torch

from pensieve.kernels import (
    copy_blocks,
    copy_blocks_ref,
    gather_blocks,
    gather_blocks_ref,
    scatter_blocks,
    scatter_blocks_ref,
    swap_blocks,
    write_kv,
    write_kv_ref,
)


def _eq(a, b):
    # equal including NaN positions
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(
        torch.nan_to_num(a.float(), nan=0.0), torch.nan_to_num(b.float(), nan=0.0)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("block_size,heads,dim", [(16, 2, 32), (32, 1, 40), (64, 4, 16), (32, 3, 64)])
def test_write_kv(device, dtype, block_size, heads, dim):
    g = torch.Generator().manual_seed(block_size + heads)
    nb, t = 9, 23
    k_cache = torch.full((nb, block_size, heads, dim), float("nan")).to(device, dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    key = torch.randn(t, heads, dim, generator=g).to(device, dtype)
    value = torch.randn(t, heads, dim, generator=g).to(device, dtype)
    slots = torch.randperm(nb * block_size, generator=g)[:t].to(torch.int64)
    slots[[3, 10, 17]] = -1  # padding tokens: skipped
    slots = slots.to(device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_ref(key, value, k_ref, v_ref, slots)
    write_kv(key, value, k_cache, v_cache, slots, impl="triton")
    assert _eq(k_cache, k_ref) and _eq(v_cache, v_ref)
    assert torch.isnan(k_cache.float()).sum() == (nb * block_size - (t - 3)) * heads * dim


def test_write_kv_int32_slots_and_strided_input(device):
    g = torch.Generator().manual_seed(1)
    k_cache = torch.zeros(4, 16, 2, 32, device=device, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    qkv = torch.randn(10, 3, 2, 32, generator=g).to(device, torch.bfloat16)  # fused qkv: strided k and v
    key, value = qkv[:, 1], qkv[:, 2]
    slots = torch.tensor([0, 1, 2, 17, 18, 33, 63, -1, 40, 41], dtype=torch.int32, device=device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_ref(key, value, k_ref, v_ref, slots)
    write_kv(key, value, k_cache, v_cache, slots, impl="triton")
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_copy_gather_scatter(device, dtype):
    g = torch.Generator().manual_seed(7)
    shape = (12, 16, 2, 24)
    src = torch.randn(shape, generator=g).to(device, dtype)
    dst = torch.full(shape, float("nan")).to(device, dtype)
    src_ids = torch.tensor([3, 0, 11, 5], device=device)
    dst_ids = torch.tensor([1, 7, 2, 10], device=device)
    d_ref = dst.clone()
    copy_blocks_ref(src, d_ref, src_ids, dst_ids)
    copy_blocks(src, dst, src_ids, dst_ids, impl="triton")
    assert _eq(dst, d_ref)

    staging = torch.full((6,) + shape[1:], float("nan")).to(device, dtype)  # larger than needed
    s_ref = gather_blocks_ref(src, src_ids, staging.clone())
    got = gather_blocks(src, src_ids, out=staging, impl="triton")
    assert got is staging and _eq(staging, s_ref)
    assert torch.isnan(staging[4:].float()).all()  # rows past len(ids) untouched

    cache = torch.full(shape, float("nan")).to(device, dtype)
    c_ref = cache.clone()
    scatter_blocks_ref(staging, c_ref, dst_ids)
    scatter_blocks(staging, cache, dst_ids, impl="triton")
    assert _eq(cache, c_ref)
    assert torch.equal(cache[dst_ids.long()], src[src_ids.long()])  # round trip through staging

    # empty id lists are no-ops
    copy_blocks(src, dst, src_ids[:0], dst_ids[:0], impl="triton")
    scatter_blocks(staging, cache, dst_ids[:0], impl="triton")


def test_copy_blocks_across_devices_uses_reference(device):
    # CPU <-> device copies go through the reference (index_select + copy)
    src = torch.randn(5, 16, 2, 8)
    dst = torch.zeros(5, 16, 2, 8, device=device)
    copy_blocks(src, dst, torch.tensor([4, 1]), torch.tensor([0, 3]))
    assert torch.equal(dst[0].cpu(), src[4]) and torch.equal(dst[3].cpu(), src[1])


@pytest.mark.gpu
def test_gather_scatter_large_gpu():
    dev = torch.device("cuda")
    cache = torch.randn(4096, 32, 8, 128, device=dev, dtype=torch.bfloat16)
    ids = torch.randperm(4096, device=dev)[:777]
    staging = gather_blocks(cache, ids)
    assert torch.equal(staging, cache[ids])
    pinned = torch.empty(staging.shape, dtype=staging.dtype, pin_memory=True)
    pinned.copy_(staging, non_blocking=True)
    torch.cuda.synchronize()
    back = torch.zeros_like(cache)
    scatter_blocks(pinned.to(dev, non_blocking=True), back, ids)
    assert torch.equal(back[ids], cache[ids])


def test_swap_blocks_without_pinned_memory_uses_reference(device):
    # a CPU tier that is not pinned (or no GPU at all) copies through the reference
    src = torch.randn(6, 16, 2, 8)
    dst = torch.full((4, 16, 2, 8), float("nan"), device=device)
    swap_blocks(src, dst, torch.tensor([5, 0, 2]), torch.tensor([1, 3, 0]))
    ref = torch.full((4, 16, 2, 8), float("nan"))
    copy_blocks_ref(src, ref, torch.tensor([5, 0, 2]), torch.tensor([1, 3, 0]))
    assert _eq(dst.cpu(), ref)
    with pytest.raises(ValueError):
        swap_blocks(src, dst, torch.tensor([5, 0]), torch.tensor([1]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("register", [False, True], ids=["pin_memory", "host_register"])
def test_swap_blocks_pinned_host_gpu(register):
    """One launch each way between pinned host memory and the GPU, exact, NaN-poisoned."""
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(3)
    shape = (300, 32, 8, 128)
    if register:  # the engine's CPU tier: plain memory, page-locked in place
        host = torch.randn(shape, generator=g).to(torch.bfloat16)
        assert int(torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel() * 2, 0)) == 0
    else:
        host = torch.randn(shape, generator=g).to(torch.bfloat16).pin_memory()
    assert host.is_pinned()
    gpu = torch.full((500,) + shape[1:], float("nan"), device=dev, dtype=torch.bfloat16)
    src_ids = torch.randperm(300, generator=g)[:257]
    dst_ids = torch.randperm(500, generator=g)[:257]
    swap_blocks(host, gpu, src_ids.to(dev), dst_ids.to(dev))
    expect = torch.full_like(gpu, float("nan")).cpu()
    copy_blocks_ref(host, expect, src_ids, dst_ids)
    torch.cuda.synchronize()
    assert _eq(gpu.cpu(), expect)
    back = torch.full_like(host, float("nan"))
    if register:
        assert int(torch.cuda.cudart().cudaHostRegister(back.data_ptr(), back.numel() * 2, 0)) == 0
    else:
        back = back.pin_memory()
    swap_blocks(gpu, back, dst_ids.to(dev), src_ids.to(dev))
    torch.cuda.synchronize()
    expect_back = torch.full_like(host, float("nan"))
    copy_blocks_ref(expect, expect_back, dst_ids, src_ids)
    assert _eq(back, expect_back)
    if register:
        for t in (host, back):
            torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


@pytest.mark.parametrize("programs", [1, 3, 64])
def test_swap_kernel_programs_stride_over_every_block(device, programs):
    """The persistent swap kernel: any number of programs covers every (block, chunk) item once."""
    from pensieve.kernels.triton_cache import swap_blocks_triton

    g = torch.Generator().manual_seed(programs)
    src = torch.randn(9, 16, 2, 8, generator=g).to(device)
    dst = torch.full((7, 16, 2, 8), float("nan"), device=device)
    src_ids, dst_ids = torch.tensor([8, 0, 3, 5]), torch.tensor([6, 2, 0, 4])
    swap_blocks_triton(src, dst, src_ids.to(device), dst_ids.to(device), max_programs=programs)
    ref = torch.full((7, 16, 2, 8), float("nan"))
    copy_blocks_ref(src.cpu(), ref, src_ids, dst_ids)
    assert _eq(dst.cpu(), ref)


@pytest.mark.parametrize("programs", [1, 5])
def test_swap_kernel_stacked_copies_the_same_blocks_of_every_cache(device, programs):
    """One launch over a stack [T, num_blocks, ...] (the engine's K and V of a run of layers),
    each side a slice of a larger stack as in the engine: every cache gets the same blocks."""
    from pensieve.kernels.triton_cache import swap_blocks_triton

    g = torch.Generator().manual_seed(11)
    src_all = torch.randn(6, 9, 16, 2, 8, generator=g).to(device)
    dst_all = torch.full((6, 7, 16, 2, 8), float("nan"), device=device)
    src_ids, dst_ids = torch.tensor([8, 0, 3]), torch.tensor([6, 2, 0])
    swap_blocks_triton(src_all[2:5], dst_all[2:5], src_ids.to(device), dst_ids.to(device), max_programs=programs,
                       stacked=True)
    ref = torch.full((6, 7, 16, 2, 8), float("nan"))
    for t in range(2, 5):
        copy_blocks_ref(src_all[t].cpu(), ref[t], src_ids, dst_ids)
    assert _eq(dst_all.cpu(), ref)  # entries 0, 1 and 5 untouched
    with pytest.raises(ValueError):
        swap_blocks_triton(src_all[2:5], dst_all[2:4], src_ids.to(device), dst_ids.to(device), stacked=True)


def test_swap_blocks_stacked_reference():
    src = torch.randn(4, 6, 16, 2, 8)
    dst = torch.full((4, 3, 16, 2, 8), float("nan"))
    swap_blocks(src, dst, torch.tensor([5, 1]), torch.tensor([0, 2]), stacked=True)
    assert torch.equal(dst[:, 0], src[:, 5]) and torch.equal(dst[:, 2], src[:, 1]) and dst[:, 1].isnan().all()
    with pytest.raises(ValueError):
        swap_blocks(src, dst[:3], torch.tensor([5]), torch.tensor([0]), stacked=True)
