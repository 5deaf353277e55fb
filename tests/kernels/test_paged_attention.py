"""Triton paged attention against the torch reference.

Error bound (stated and justified)
----------------------------------
The oracle is ``paged_attention_ref`` run on the *upcast* (float32) copies of
the very same low-precision inputs, so input rounding is common to both sides
and only the kernel's own arithmetic is measured. The kernel accumulates QK^T,
the softmax statistics and PV in float32; the two roundings it adds are
(1) the probabilities P cast to the input dtype before the PV matrix product
and (2) the final cast of the output to the input dtype. Each is a relative
error of at most one half-ulp: 2^-9 = 2.0e-3 for bf16 (8 significant bits),
2^-12 = 2.4e-4 for fp16 (11 bits). (1) enters as a convex combination of V rows
with perturbed weights, so the absolute error is bounded by about
2^-9 * max|V| and mostly averages out; (2) adds 2^-9 * |out|. We therefore
require, over every query row of every segment:

* relative Frobenius error ||out - ref|| / ||ref|| <= 1e-2 (bf16), 2e-3 (fp16),
  1e-4 (fp32: only accumulation order differs, and dots run in IEEE fp32);
* max absolute error <= 4 * 2^-9 * max|V| (bf16), 4 * 2^-12 * max|V| (fp16),
  1e-4 (fp32); the factor 4 covers (1) + (2) with margin;
* every element finite (freed blocks are NaN-poisoned, the output is
  NaN-poisoned before the call, so a leaked or unwritten value fails).
"""
from __future__ import annotations

import math

import pytest
import torch

from pensieve.kernels import paged_attention, paged_attention_ref, prepare_paged_attention
from pensieve.kernels.triton_attention import default_tile_config

TOL = {
    torch.bfloat16: (1e-2, 4 * 2**-9),
    torch.float16: (2e-3, 4 * 2**-12),
    torch.float32: (1e-4, None),
}


def build_case(segs, num_heads, num_kv_heads, head_dim, block_size, dtype, device, seed, share_prefix=False):
    """segs: list of (request, q_len, pos_start). Segments of one request share a block table.

    Returns tensors plus the list of (request, kv_len). Every cache slot outside
    the valid range of some request is NaN, and block-table entries past a
    request's length point at NaN blocks.
    """
    g = torch.Generator().manual_seed(seed)
    reqs = sorted({r for r, _, _ in segs})
    kv_len = {r: max(p + q for rr, q, p in segs if rr == r) for r in reqs}
    nblk = {r: max(1, math.ceil(kv_len[r] / block_size)) for r in reqs}
    max_blocks = max(nblk.values()) + 2
    shared = 1 if share_prefix and len(reqs) > 1 else 0  # one physical block reused by every request
    total = sum(nblk.values()) - shared * (len(reqs) - 1)
    num_blocks = total + 6  # free blocks
    perm = torch.randperm(num_blocks, generator=g)
    free = perm[total:]
    tables = torch.empty(len(reqs), max_blocks, dtype=torch.int32)
    cursor = 0
    shared_block = None
    for i, r in enumerate(reqs):
        ids = []
        for b in range(nblk[r]):
            if shared and b == 0 and shared_block is not None:
                ids.append(shared_block)
                continue
            ids.append(int(perm[cursor]))
            cursor += 1
            if shared and b == 0:
                shared_block = ids[0]
        tables[i, : nblk[r]] = torch.tensor(ids, dtype=torch.int32)
        tables[i, nblk[r] :] = free[torch.randint(len(free), (max_blocks - nblk[r],), generator=g)].to(torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.full(shape, float("nan"))
    v = torch.full(shape, float("nan"))
    flat_k, flat_v = k.view(-1, num_kv_heads, head_dim), v.view(-1, num_kv_heads, head_dim)
    for i, r in enumerate(reqs):
        pos = torch.arange(kv_len[r])
        slots = tables[i, pos // block_size].long() * block_size + pos % block_size
        flat_k[slots] = torch.randn(len(pos), num_kv_heads, head_dim, generator=g)
        flat_v[slots] = torch.randn(len(pos), num_kv_heads, head_dim, generator=g)
    # a shared block is written by each request in turn; all read its final content
    row_of = {r: i for i, r in enumerate(reqs)}
    bt = torch.stack([tables[row_of[r]] for r, _, _ in segs])
    q_lens = [q for _, q, _ in segs]
    seg_q_start = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)
    seg_pos_start = torch.tensor([p for _, _, p in segs], dtype=torch.int32)
    query = torch.randn(int(seg_q_start[-1]), num_heads, head_dim, generator=g)
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return to(query), to(k), to(v), bt.to(device), seg_q_start.to(device), seg_pos_start.to(device)


def check(out, query, k, v, bt, qs, ps, scale):
    ref = paged_attention_ref(query.float(), k.float(), v.float(), bt, qs, ps, scale)
    n = int(qs[-1])
    out, ref = out[:n].float(), ref[:n]
    assert torch.isfinite(ref).all(), "reference produced non-finite values (test setup bug)"
    assert torch.isfinite(out).all(), "kernel output has NaN/inf (poison leaked or a row was not written)"
    rel_bound, abs_factor = TOL[query.dtype]
    rel = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert rel <= rel_bound, f"relative error {rel:.3e} > {rel_bound:.1e}"
    vmax = torch.nan_to_num(v.float(), nan=0.0).abs().max().item()
    abs_bound = 1e-4 if abs_factor is None else abs_factor * vmax
    err = (out - ref).abs().max().item()
    assert err <= abs_bound, f"max abs error {err:.3e} > {abs_bound:.3e}"
    return rel, err


def run(query, k, v, bt, qs, ps, scale, **kw):
    out = torch.full_like(query, float("nan"))
    res = paged_attention(query, k, v, bt, qs, ps, scale, impl="triton", out=out, **kw)
    assert res is out
    return out


def ragged_mix(device, group, block_size):
    """The issue's ragged mix, sized relative to the tile in use on this device."""
    cfg = default_tile_config(device)
    gp = 1 << (group - 1).bit_length()
    tok_l = max(cfg.block_m_large, gp) // gp
    tok_s = max(cfg.block_m_small, gp) // gp
    return [
        (0, 1, 37),                         # decode, context not a multiple of the block size
        (1, 1, 0),                          # context 0, one token
        (2, 0, 11),                         # empty segment
        (3, max(1, tok_l - 1), 0),          # prefill below the tile
        (4, 2 * tok_l + 3, block_size - 2), # above the tile, block boundary on the diagonal
        (5, tok_s + 1, 2 * block_size),     # just above the small tile, starts on a block boundary
        (6, 20, 0),                         # recompute segment of request 6 (attends itself only)...
        (6, 7, 45),                         # ...and its new prompt in the same batch (attends all)
        (7, 3, block_size * 3 - 1),         # small chunk crossing a block boundary
    ]


@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("heads", [(2, 2), (8, 2), (8, 1)], ids=["gqa1", "gqa4", "gqa8"])
def test_ragged_mix_bf16(device, heads, block_size):
    hq, hkv = heads
    segs = ragged_mix(device, hq // hkv, block_size)
    case = build_case(segs, hq, hkv, 32, block_size, torch.bfloat16, device, seed=block_size + hq * 7 + hkv)
    scale = 32**-0.5
    out = run(*case, scale)
    check(out, *case, scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_ragged_mix_dtypes(device, dtype):
    segs = ragged_mix(device, 4, 16)
    case = build_case(segs, 8, 2, 32, 16, dtype, device, seed=3)
    out = run(*case, 0.3)
    check(out, *case, 0.3)


def test_head_dim_not_power_of_two_and_reused_block(device):
    # head_dim 40 exercises the padded-D masks; requests share a physical prefix block
    segs = [(0, 5, 20), (1, 1, 33), (2, 9, 0)]
    case = build_case(segs, 4, 2, 40, 16, torch.bfloat16, device, seed=11, share_prefix=True)
    out = run(*case, 0.15)
    check(out, *case, 0.15)


@pytest.mark.parametrize("splits", [None, 1, 3, 8])
def test_decode_split_kv(device, splits):
    # decode-only batch; 8 splits over 70 keys leaves some splits empty
    segs = [(0, 1, 69), (1, 1, 0), (2, 1, 130), (3, 1, 31)]
    case = build_case(segs, 8, 2, 32, 16, torch.bfloat16, device, seed=5)
    out = run(*case, 0.2, num_splits=splits)
    check(out, *case, 0.2)


def test_metadata_reused_across_layers(device):
    segs = ragged_mix(device, 4, 32)
    q, k, v, bt, qs, ps = build_case(segs, 8, 2, 32, 32, torch.bfloat16, device, seed=21)
    md = prepare_paged_attention(qs.cpu(), ps.cpu(), 8, 2, device=device)
    for layer in range(2):
        k2 = k * (1 + layer)  # another layer's cache, same plan
        out = run(q, k2, v, bt, qs, ps, 0.2, metadata=md)
        check(out, q, k2, v, bt, qs, ps, 0.2)


def test_untouched_rows_outside_segments(device):
    segs = [(0, 3, 10), (1, 1, 5)]
    q, k, v, bt, qs, ps = build_case(segs, 8, 2, 32, 16, torch.bfloat16, device, seed=8)
    q = torch.cat([q, torch.randn_like(q[:2])])  # two padding rows past the last segment
    out = run(q, k, v, bt, qs, ps, 0.2)
    check(out, q, k, v, bt, qs, ps, 0.2)
    assert torch.isnan(out[-2:]).all(), "kernel wrote rows that belong to no segment"


def test_detects_wrong_block_table(device):
    """The oracle comparison is not a tautology: a permuted block table must fail it."""
    # (swapping two fully attended blocks would be invisible: attention is
    # permutation invariant over keys; here the causal rows 0..15 see the swap)
    segs = [(0, 20, 0), (1, 1, 60)]
    q, k, v, bt, qs, ps = build_case(segs, 8, 2, 32, 16, torch.bfloat16, device, seed=9)
    bad = bt.clone()
    bad[0, 0], bad[0, 1] = bt[0, 1], bt[0, 0]
    out = run(q, k, v, bad, qs, ps, 0.2)
    with pytest.raises(AssertionError):
        check(out, q, k, v, bt, qs, ps, 0.2)


def test_impl_is_decided_once_and_never_read_from_the_environment(monkeypatch):
    import pensieve.kernels.dispatch as dispatch
    from pensieve.kernels import resolve_impl

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_impl("auto", cpu) == "ref" and resolve_impl("auto", cuda) == "triton"
    assert resolve_impl("ref", cuda) == "ref"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl("triton", cpu) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="interpreter"):
        resolve_impl("triton", cpu)
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("fast", cpu)
    # Per call, "auto" depends on the tensor only: the old PENSIEVE_KERNELS switch is gone.
    monkeypatch.setenv("PENSIEVE_KERNELS", "triton")
    assert dispatch._use_triton(torch.empty(1), "auto") is False
    assert dispatch._use_triton(torch.empty(1), "triton") is True
    assert dispatch._use_triton(torch.empty(1), "ref") is False


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_llama3_shapes_gpu(dtype):
    """Llama-3-8B heads (32/8, D=128), block 32: a mixed batch with long contexts, and split-KV decode."""
    dev = torch.device("cuda")
    segs = [(0, 300, 0), (1, 200, 1000), (2, 1, 2047), (3, 1, 4095), (4, 129, 31), (5, 40, 0), (5, 17, 500)]
    segs += [(6 + i, 1, 100 * i + 7) for i in range(20)]
    case = build_case(segs, 32, 8, 128, 32, dtype, dev, seed=1)
    out = run(*case, 128**-0.5)
    check(out, *case, 128**-0.5)
    dec = [(i, 1, 3000 + 37 * i) for i in range(4)]
    case = build_case(dec, 32, 8, 128, 32, dtype, dev, seed=2)
    for splits in (None, 1, 4, 16):
        out = run(*case, 128**-0.5, num_splits=splits)
        check(out, *case, 128**-0.5)


def test_split_request_ignored_for_batches_with_prefill(device):
    # split-KV is a decode-only path: asking for it on a mixed batch must not change results
    segs = ragged_mix(device, 8, 16)
    q, k, v, bt, qs, ps = build_case(segs, 8, 1, 32, 16, torch.float16, device, seed=12)
    md = prepare_paged_attention(qs.cpu(), ps.cpu(), 8, 1, device=device, num_splits=4)
    assert md.num_splits == 1 or md.n_large == 0
    out = run(q, k, v, bt, qs, ps, 0.25, metadata=md)
    check(out, q, k, v, bt, qs, ps, 0.25)


def test_small_segments_split_kv_fp32_gqa1(device):
    # small-tile segments with several query tokens under split-KV: the low rows
    # of a tile have no keys in the late splits (fully masked partials, merged away)
    segs = [(i, 1 + 2 * (i % 3), 17 * i + 5) for i in range(5)]
    case = build_case(segs, 2, 2, 32, 32, torch.float32, device, seed=13)
    out = run(*case, 0.2, num_splits=5)
    check(out, *case, 0.2)


# SmolLM2-135M's attention (issue 13): 9 query heads over 3 KV heads, a GQA group of 3 (not a
# power of two: the kernel pads the group to 4 rows per KV head and masks the fourth), head dim 64.
SMOLLM2_HEADS, SMOLLM2_DIM = (9, 3), 64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("block_size", [16, 32])
def test_gqa_group3_head_dim64_ragged_mix(device, dtype, block_size):
    hq, hkv = SMOLLM2_HEADS
    segs = ragged_mix(device, hq // hkv, block_size)
    case = build_case(segs, hq, hkv, SMOLLM2_DIM, block_size, dtype, device, seed=block_size + 93)
    out = run(*case, SMOLLM2_DIM**-0.5)
    check(out, *case, SMOLLM2_DIM**-0.5)


@pytest.mark.parametrize("splits", [None, 3])
def test_gqa_group3_head_dim64_split_kv_decode(device, splits):
    hq, hkv = SMOLLM2_HEADS
    segs = [(i, 1, 29 * i + 40) for i in range(4)]
    case = build_case(segs, hq, hkv, SMOLLM2_DIM, 32, torch.bfloat16, device, seed=31)
    out = run(*case, SMOLLM2_DIM**-0.5, num_splits=splits)
    check(out, *case, SMOLLM2_DIM**-0.5)


@pytest.mark.gpu
def test_smollm2_shapes_gpu():
    """The real model's heads at long contexts on the GPU: a mixed batch, then split-KV decodes."""
    dev = torch.device("cuda")
    hq, hkv = SMOLLM2_HEADS
    segs = [(0, 300, 0), (1, 200, 1000), (2, 1, 2047), (3, 1, 8000), (4, 129, 31), (5, 40, 0), (5, 17, 500)]
    segs += [(6 + i, 1, 100 * i + 7) for i in range(20)]
    for dtype in (torch.bfloat16, torch.float16):
        case = build_case(segs, hq, hkv, SMOLLM2_DIM, 32, dtype, dev, seed=5)
        out = run(*case, SMOLLM2_DIM**-0.5)
        check(out, *case, SMOLLM2_DIM**-0.5)
    dec = [(i, 1, 4000 + 37 * i) for i in range(4)]
    case = build_case(dec, hq, hkv, SMOLLM2_DIM, 32, torch.bfloat16, dev, seed=6)
    for splits in (None, 1, 4, 16):
        out = run(*case, SMOLLM2_DIM**-0.5, num_splits=splits)
        check(out, *case, SMOLLM2_DIM**-0.5)
