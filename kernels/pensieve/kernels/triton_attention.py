"""Triton paged attention for mixed batches (prefill, chunked prefill, recompute, decode).

Contract: :func:`pensieve.kernels.reference.paged_attention_ref`.

Launch grid
-----------
One program handles (tile, kv head, kv split). A *tile* is a run of query
tokens of one segment; its rows are ``tokens x GP`` where GP is the number of
query heads that share a KV head (padded to a power of two): row ``r`` is token
``r // GP`` and query head ``kv_head * group + r % GP``. K/V tiles are therefore
loaded once for all the query heads that read them (GQA packing).

Segments fall in two classes, each with its own tile shape:

* *small* (``q_len * GP <= BLOCK_M_S``, i.e. decodes and tiny chunks): one tile
  per segment, a 16-row tile and a short key tile;
* *large* (everything else): ``ceil(q_len * GP / BLOCK_M_L)`` tiles of 128 rows.

Both classes go into one launch: program ids ``[0, n_large)`` run the large
tile code, the rest the small one (constexpr branches, so a batch with one
class compiles only that branch). The host builds the tile list once per step
(:func:`prepare_paged_attention`, vectorized torch on host tensors); it does not
depend on the layer and is passed to every layer's call.

Split-KV: for decode-only batches whose ``tiles x kv heads`` would not fill the
GPU, each program handles one of ``num_splits`` ranges of the keys and writes a
float32 partial (normalised output, running max, running sum); a second kernel
merges them. Empty splits write max = -inf, sum = 0 and are ignored by the merge.

Masking: each key tile is split into an unmasked part (keys every row of the
tile attends: below the tile's first position) and a masked part (diagonal and
the tail past the sequence length). In the masked part, the block-table read,
the K load and the V load are all masked (other=0) and scores are set to -inf,
so freed blocks (garbage, NaN) never reach the output: a NaN in V times a zero
probability would still be NaN, hence the V mask. Fully masked rows keep
max = -inf; the rescale uses a safe max of 0 there, so no -inf - -inf NaN.
Offsets into the caches and the query are computed in int64.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import triton
import triton.language as tl

from ._interpreter import apply_interpreter_patch

_LOG2E = 1.4426950408889634


apply_interpreter_patch()


# --------------------------------------------------------------------------- kernels


@triton.jit
def _load_rows(ptrs, row_mask, offs_d, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    if MASK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _attn_inner(
    acc, m_i, l_i, q,
    k_ptr, v_ptr, bt_row_ptr, k_head_off, v_head_off,
    row_pos, lo, hi, kv_end,
    stride_kb, stride_ks, stride_vb, stride_vs,
    qk_scale, offs_d,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
    MASKED: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        if MASKED:
            n_valid = n < kv_end
            blk = tl.load(bt_row_ptr + n // BLOCK_SIZE, mask=n_valid, other=0)
        else:
            n_valid = n >= 0  # unused
            blk = tl.load(bt_row_ptr + n // BLOCK_SIZE)
        blk = blk.to(tl.int64)
        within = (n % BLOCK_SIZE).to(tl.int64)
        k_off = blk * stride_kb + within * stride_ks + k_head_off
        k = _load_rows(k_ptr + k_off[:, None] + offs_d[None, :], n_valid, offs_d, HEAD_DIM, EVEN_D, MASKED)
        if UPCAST_DOT:
            qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision=DOT_PREC) * qk_scale
        else:
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if MASKED:
            keep = (n[None, :] <= row_pos[:, None]) & n_valid[None, :]
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v_off = blk * stride_vb + within * stride_vs + v_head_off
        v = _load_rows(v_ptr + v_off[:, None] + offs_d[None, :], n_valid, offs_d, HEAD_DIM, EVEN_D, MASKED)
        if UPCAST_DOT:
            acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision=DOT_PREC)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_tile(
    tile_id, kvh, split,
    q_ptr, k_ptr, v_ptr, bt_ptr, o_ptr, po_ptr, pml_ptr,
    tiles_ptr, n_tiles, seg_q_ptr, seg_pos_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_pos, stride_pot, stride_poh, stride_pmls, stride_pmlt, stride_pmlh,
    qk_scale,
    GROUP: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
    TOK: tl.constexpr = BLOCK_M // GP
    seg = tl.load(tiles_ptr + tile_id)
    tok0 = tl.load(tiles_ptr + n_tiles + tile_id)
    q_start = tl.load(seg_q_ptr + seg)
    q_len = tl.load(seg_q_ptr + seg + 1) - q_start
    pos0 = tl.load(seg_pos_ptr + seg)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    tok = tok0 + offs_m // GP
    hh = offs_m % GP
    row_valid = (tok < q_len) & (hh < GROUP)
    row_pos = tl.where(row_valid, pos0 + tok, -1)
    head = (kvh * GROUP + hh).to(tl.int64)
    row_tok = (q_start + tok).to(tl.int64)

    q_off = row_tok * stride_qt + head * stride_qh
    q = _load_rows(q_ptr + q_off[:, None] + offs_d[None, :], row_valid, offs_d, HEAD_DIM, EVEN_D, True)

    last_tok = tl.minimum(tok0 + TOK, q_len) - 1
    kv_end = pos0 + last_tok + 1
    # keys [0, full_end) are attended by every row of the tile: no mask needed
    full_end = ((pos0 + tok0 + 1) // BLOCK_N) * BLOCK_N
    if NUM_SPLITS == 1:
        lo = 0
        hi = kv_end
    else:
        chunk = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.maximum(tl.minimum(lo + chunk, kv_end), lo)
    mid = tl.minimum(tl.maximum(full_end, lo), hi)

    bt_row_ptr = bt_ptr + seg.to(tl.int64) * stride_bt
    k_head_off = kvh.to(tl.int64) * stride_kh
    v_head_off = kvh.to(tl.int64) * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    acc, m_i, l_i = _attn_inner(
        acc, m_i, l_i, q, k_ptr, v_ptr, bt_row_ptr, k_head_off, v_head_off,
        row_pos, lo, mid, kv_end, stride_kb, stride_ks, stride_vb, stride_vs, qk_scale, offs_d,
        BLOCK_N, BLOCK_SIZE, HEAD_DIM, EVEN_D, False, DOT_PREC, UPCAST_DOT,
    )
    acc, m_i, l_i = _attn_inner(
        acc, m_i, l_i, q, k_ptr, v_ptr, bt_row_ptr, k_head_off, v_head_off,
        row_pos, mid, hi, kv_end, stride_kb, stride_ks, stride_vb, stride_vs, qk_scale, offs_d,
        BLOCK_N, BLOCK_SIZE, HEAD_DIM, EVEN_D, True, DOT_PREC, UPCAST_DOT,
    )
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if EVEN_D:
        st_mask = row_valid[:, None]
    else:
        st_mask = row_valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    if NUM_SPLITS == 1:
        o_off = row_tok * stride_ot + head * stride_oh
        tl.store(o_ptr + o_off[:, None] + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=st_mask)
    else:
        sp = split.to(tl.int64)
        po_off = sp * stride_pos + row_tok * stride_pot + head * stride_poh
        tl.store(po_ptr + po_off[:, None] + offs_d[None, :], out, mask=st_mask)
        ml_off = sp * stride_pmls + row_tok * stride_pmlt + head * stride_pmlh
        tl.store(pml_ptr + ml_off, m_i, mask=row_valid)
        tl.store(pml_ptr + ml_off + 1, l_i, mask=row_valid)


# Values that change from step to step are not specialized on (Triton would
# otherwise compile a variant per class of value: 1, multiple of 16, other).
@triton.jit(do_not_specialize=["n_tiles", "n_large", "stride_bt", "stride_pos", "stride_pot", "stride_pmls",
                               "stride_pmlt"])
def _paged_attn_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, o_ptr, po_ptr, pml_ptr,
    tiles_ptr, n_tiles, n_large, seg_q_ptr, seg_pos_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_pos, stride_pot, stride_poh, stride_pmls, stride_pmlt, stride_pmlh,
    qk_scale,
    GROUP: tl.constexpr, GP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M_L: tl.constexpr, BLOCK_N_L: tl.constexpr, BLOCK_M_S: tl.constexpr, BLOCK_N_S: tl.constexpr,
    MODE: tl.constexpr,  # 0: both classes, 1: large only, 2: small only
    NUM_SPLITS: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if MODE == 1:
        _attn_tile(
            pid, kvh, split, q_ptr, k_ptr, v_ptr, bt_ptr, o_ptr, po_ptr, pml_ptr,
            tiles_ptr, n_tiles, seg_q_ptr, seg_pos_ptr, stride_qt, stride_qh, stride_ot, stride_oh,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
            stride_pos, stride_pot, stride_poh, stride_pmls, stride_pmlt, stride_pmlh, qk_scale,
            GROUP, GP, BLOCK_M_L, BLOCK_N_L, HEAD_DIM, D_PAD, BLOCK_SIZE, NUM_SPLITS, DOT_PREC, UPCAST_DOT,
        )
    elif MODE == 2:
        _attn_tile(
            pid, kvh, split, q_ptr, k_ptr, v_ptr, bt_ptr, o_ptr, po_ptr, pml_ptr,
            tiles_ptr, n_tiles, seg_q_ptr, seg_pos_ptr, stride_qt, stride_qh, stride_ot, stride_oh,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
            stride_pos, stride_pot, stride_poh, stride_pmls, stride_pmlt, stride_pmlh, qk_scale,
            GROUP, GP, BLOCK_M_S, BLOCK_N_S, HEAD_DIM, D_PAD, BLOCK_SIZE, NUM_SPLITS, DOT_PREC, UPCAST_DOT,
        )
    else:
        if pid < n_large:
            _attn_tile(
                pid, kvh, split, q_ptr, k_ptr, v_ptr, bt_ptr, o_ptr, po_ptr, pml_ptr,
                tiles_ptr, n_tiles, seg_q_ptr, seg_pos_ptr, stride_qt, stride_qh, stride_ot, stride_oh,
                stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
                stride_pos, stride_pot, stride_poh, stride_pmls, stride_pmlt, stride_pmlh, qk_scale,
                GROUP, GP, BLOCK_M_L, BLOCK_N_L, HEAD_DIM, D_PAD, BLOCK_SIZE, NUM_SPLITS, DOT_PREC, UPCAST_DOT,
            )
        else:
            _attn_tile(
                pid, kvh, split, q_ptr, k_ptr, v_ptr, bt_ptr, o_ptr, po_ptr, pml_ptr,
                tiles_ptr, n_tiles, seg_q_ptr, seg_pos_ptr, stride_qt, stride_qh, stride_ot, stride_oh,
                stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
                stride_pos, stride_pot, stride_poh, stride_pmls, stride_pmlt, stride_pmlh, qk_scale,
                GROUP, GP, BLOCK_M_S, BLOCK_N_S, HEAD_DIM, D_PAD, BLOCK_SIZE, NUM_SPLITS, DOT_PREC, UPCAST_DOT,
            )


@triton.jit(do_not_specialize=["stride_pos", "stride_pot", "stride_pmls", "stride_pmlt"])
def _split_merge_kernel(
    po_ptr, pml_ptr, o_ptr, rows_ptr,
    stride_pos, stride_pot, stride_poh, stride_pmls, stride_pmlt, stride_pmlh,
    stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
):
    t = tl.load(rows_ptr + tl.program_id(0)).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    s_mask = offs_s < NUM_SPLITS
    ml_off = offs_s.to(tl.int64) * stride_pmls + t * stride_pmlt + h * stride_pmlh
    m = tl.load(pml_ptr + ml_off, mask=s_mask, other=float("-inf"))
    l = tl.load(pml_ptr + ml_off + 1, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(m == float("-inf"), 0.0, l * tl.math.exp2(m - m_max))
    po_off = offs_s.to(tl.int64) * stride_pos + t * stride_pot + h * stride_poh
    msk = s_mask[:, None] & (offs_d[None, :] < HEAD_DIM) & (w[:, None] > 0.0)
    o = tl.load(po_ptr + po_off[:, None] + offs_d[None, :], mask=msk, other=0.0)
    num = tl.sum(o * w[:, None], 0)
    den = tl.sum(w, 0)
    den = tl.where(den == 0.0, 1.0, den)
    tl.store(o_ptr + t * stride_ot + h * stride_oh + offs_d, (num / den).to(o_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


# --------------------------------------------------------------------------- host side


@dataclass(frozen=True)
class TileConfig:
    """Tile shapes per phase. ``block_m_*`` count rows (tokens x padded GQA group).

    Defaults: the fastest of the variants ``bench/kernels.py`` timed. Extend and
    mixed (H100, Llama-3-8B heads, block size 32): 64 rows by 64 keys with 4
    warps and 3 stages (more programs and less register pressure than 128 x 64
    with 8 warps, which was 24% slower on extend and 20% on mixed). Decode (H200,
    the engine benchmark's 256 x 600 and 64 x 1.3k decodes and 256 x 1k): 64 keys
    per iteration with 2 warps, 4-7% faster than 128 keys with 4 warps, which won
    on the H100's longer 4k decodes.
    """

    block_m_large: int = 64
    block_n_large: int = 64
    block_m_small: int = 16
    block_n_small: int = 64
    num_warps_large: int = 4
    num_stages_large: int = 3
    num_warps_small: int = 2
    num_stages_small: int = 2


#: The interpreter runs every program in Python: small tiles keep CPU tests fast
#: and exercise many tiles per segment.
INTERPRETER_CONFIG = TileConfig(32, 16, 16, 16, 4, 1, 4, 1)
GPU_CONFIG = TileConfig()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def default_tile_config(device: torch.device) -> TileConfig:
    if device.type != "cuda" or _interpreting():
        return INTERPRETER_CONFIG
    return GPU_CONFIG


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


#: Split counts a decode-only launch may use: powers of two, so that start-up can
#: compile every variant (the split count is a compile-time constant).
SPLIT_CHOICES = (1, 2, 4, 8, 16, 32)


def decode_splits(n_seqs: int, num_kv_heads: int, device: torch.device, max_kv: int = 1 << 30) -> int:
    """Key splits for a decode-only launch of ``n_seqs`` sequences: enough programs
    to fill the GPU about four times over when the batch alone would not fill it
    twice, at least 256 keys per split, a power of two up to 32."""
    programs = max(1, n_seqs * num_kv_heads)
    sms = _sm_count(device)
    if programs >= 2 * sms:
        return 1
    want = min(max(1, (4 * sms) // programs), max(1, max_kv // 256), SPLIT_CHOICES[-1])
    return 1 << (want.bit_length() - 1)  # round down to a power of two


@dataclass
class PagedAttentionMetadata:
    """Per-step launch plan; independent of the layer, so build it once per step.

    ``tiles`` is int32 [2, n_tiles] on the device: row 0 the segment of each
    tile, row 1 its first query token (within the segment); large tiles first.
    """

    tiles: torch.Tensor
    n_large: int
    n_small: int
    num_splits: int
    group: int
    num_kv_heads: int
    config: TileConfig
    seg_q_start: torch.Tensor  # int32, on the device
    seg_pos_start: torch.Tensor  # int32, on the device
    split_rows: torch.Tensor | None = None  # query rows to merge (split-KV only)
    max_kv_len: int = 0
    extra: dict = field(default_factory=dict)


def prepare_paged_attention(
    seg_q_start: torch.Tensor,
    seg_pos_start: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    *,
    device: torch.device | str | None = None,
    num_splits: int | None = None,
    config: TileConfig | None = None,
    staging: Callable[[int], torch.Tensor] | None = None,
) -> PagedAttentionMetadata:
    """Build the launch plan of one step (reuse it for every layer).

    Pass host (CPU) copies of ``seg_q_start``/``seg_pos_start`` to avoid a device
    sync; device copies are made here (non-blocking). ``num_splits``: None picks
    automatically (split-KV only for decode-only batches that underfill the GPU),
    1 disables, n > 1 forces n splits (decode-only batches; ignored otherwise).
    ``staging(n)``: a pinned int32 host tensor of n elements the plan is copied from
    (the caller keeps it unchanged until the copy has run); without it a pinned
    buffer is allocated per call, which can make the host wait for the device.
    """
    if device is None:
        device = seg_q_start.device
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if num_heads % num_kv_heads:
        raise ValueError("num_heads must be a multiple of num_kv_heads")
    group = num_heads // num_kv_heads
    gp = _next_pow2(group)
    cfg = config or default_tile_config(device)
    bm_l = max(cfg.block_m_large, gp)
    bm_s = max(cfg.block_m_small, gp)
    tok_l, tok_s = bm_l // gp, bm_s // gp

    qs = seg_q_start.detach().to("cpu", torch.int64)
    ps = seg_pos_start.detach().to("cpu", torch.int64)
    q_len = qs[1:] - qs[:-1]
    kv_len = ps + q_len
    nseg = q_len.numel()
    small = (q_len > 0) & (q_len <= tok_s)
    large = q_len > tok_s
    tiles_per = torch.where(large, (q_len + tok_l - 1) // tok_l, 0)
    seg_ids = torch.arange(nseg, dtype=torch.int64)
    l_seg = torch.repeat_interleave(seg_ids, tiles_per)
    first = torch.cumsum(tiles_per, 0) - tiles_per
    l_tok0 = (torch.arange(l_seg.numel(), dtype=torch.int64) - first[l_seg]) * tok_l
    if l_seg.numel():
        # longest key ranges first: better tail behaviour
        order = torch.argsort(ps[l_seg] + l_tok0, descending=True, stable=True)
        l_seg, l_tok0 = l_seg[order], l_tok0[order]
    s_seg = seg_ids[small]
    if s_seg.numel():
        s_seg = s_seg[torch.argsort(kv_len[s_seg], descending=True, stable=True)]
    n_large, n_small = int(l_seg.numel()), int(s_seg.numel())
    tiles = torch.stack([torch.cat([l_seg, s_seg]), torch.cat([l_tok0, torch.zeros_like(s_seg)])]).to(torch.int32)
    max_kv = int(kv_len.max()) if nseg else 0

    splits = 1
    if n_large == 0 and n_small > 0:
        if num_splits is None:
            if max_kv >= 1024:
                splits = decode_splits(n_small, num_kv_heads, device, max_kv)
        else:
            splits = max(1, int(num_splits))
    rows = torch.zeros(0, dtype=torch.int32)
    if splits > 1:
        seg_of_row = torch.repeat_interleave(seg_ids, q_len)
        rows = torch.nonzero(small[seg_of_row]).flatten().to(torch.int32)
    # One copy, from pinned memory: a copy from pageable memory makes the host wait for
    # the stream, so the next step could not be prepared while this one runs.
    # Each part starts on a 64-byte boundary (Triton specializes on pointer alignment).
    parts = [tiles.reshape(-1), qs.to(torch.int32), ps.to(torch.int32), rows]
    padded = [torch.nn.functional.pad(p, (0, -p.numel() % 16)) for p in parts]
    flat = torch.cat(padded)
    if device.type == "cuda":
        if staging is not None:
            host = staging(flat.numel())
            host.copy_(flat)
            flat = host.to(device, non_blocking=True)
        else:
            flat = flat.pin_memory().to(device, non_blocking=True)
    d_tiles, d_qs, d_ps, d_rows = (c[:p.numel()] for c, p in zip(torch.split(flat, [q.numel() for q in padded]), parts))
    return PagedAttentionMetadata(
        tiles=d_tiles.view(2, -1),
        n_large=n_large,
        n_small=n_small,
        num_splits=splits,
        group=group,
        num_kv_heads=num_kv_heads,
        config=cfg,
        seg_q_start=d_qs,
        seg_pos_start=d_ps,
        split_rows=d_rows if splits > 1 else None,
        max_kv_len=max_kv,
    )


def decode_graph_plan(
    seg_q_start: torch.Tensor,
    seg_pos_start: torch.Tensor,
    batch: int,
    num_heads: int,
    num_kv_heads: int,
    *,
    num_splits: int | None = None,
    config: TileConfig | None = None,
    staging: Callable[[int], torch.Tensor] | None = None,
) -> PagedAttentionMetadata:
    """A launch plan for decode steps replayed from a CUDA graph: ``batch`` one-token
    segments, tile i = segment i, whatever the step's lengths. ``seg_q_start`` and
    ``seg_pos_start`` are the graph's static device buffers (the kernel reads them
    at replay); a padding segment has q_len 0 and writes nothing. The split count
    is fixed at capture (by default for long contexts; empty splits cost little).
    """
    device = seg_q_start.device
    group = num_heads // num_kv_heads
    ids = torch.arange(batch, dtype=torch.int32, device=device)
    splits = num_splits or decode_splits(batch, num_kv_heads, device)
    return PagedAttentionMetadata(
        tiles=torch.stack([ids, torch.zeros_like(ids)]).contiguous(),
        n_large=0,
        n_small=batch,
        num_splits=splits,
        group=group,
        num_kv_heads=num_kv_heads,
        config=config or default_tile_config(device),
        seg_q_start=seg_q_start,
        seg_pos_start=seg_pos_start,
        split_rows=ids if splits > 1 else None,
        max_kv_len=0,
    )


def paged_attention_triton(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seg_q_start: torch.Tensor,
    seg_pos_start: torch.Tensor,
    scale: float,
    *,
    metadata: PagedAttentionMetadata | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if metadata is None:
        metadata = prepare_paged_attention(
            seg_q_start, seg_pos_start, num_heads, num_kv_heads, device=query.device, num_splits=num_splits
        )
    md = metadata
    if md.group != num_heads // num_kv_heads or md.num_kv_heads != num_kv_heads:
        raise ValueError("metadata was built for other head counts")
    if out is None:
        out = torch.empty_like(query)
    if query.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("the head dimension must be contiguous")
    n_tiles = md.n_large + md.n_small
    if n_tiles == 0 or num_tokens == 0:
        return out
    cfg = md.config
    group = md.group
    gp = _next_pow2(group)
    d_pad = max(16, _next_pow2(head_dim))
    if md.n_large and md.n_small:
        mode, warps, stages = 0, cfg.num_warps_large, cfg.num_stages_large
    elif md.n_large:
        mode, warps, stages = 1, cfg.num_warps_large, cfg.num_stages_large
    else:
        mode, warps, stages = 2, cfg.num_warps_small, cfg.num_stages_small
    splits = md.num_splits if mode == 2 else 1
    dot_prec = "ieee" if query.dtype == torch.float32 else "tf32"
    bt = block_tables if block_tables.dtype in (torch.int32, torch.int64) else block_tables.to(torch.int32)
    if splits > 1:
        po = torch.empty((splits, num_tokens, num_heads, head_dim), device=query.device, dtype=torch.float32)
        pml = torch.empty((splits, num_tokens, num_heads, 2), device=query.device, dtype=torch.float32)
    else:
        po = pml = out  # unused
    grid = (n_tiles, num_kv_heads, splits)
    _paged_attn_kernel[grid](
        query, k_cache, v_cache, bt, out, po, pml,
        md.tiles, n_tiles, md.n_large, md.seg_q_start, md.seg_pos_start,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        bt.stride(0),
        po.stride(0), po.stride(1), po.stride(2), pml.stride(0), pml.stride(1), pml.stride(2),
        float(scale) * _LOG2E,
        GROUP=group, GP=gp, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size,
        BLOCK_M_L=max(cfg.block_m_large, gp), BLOCK_N_L=cfg.block_n_large,
        BLOCK_M_S=max(cfg.block_m_small, gp), BLOCK_N_S=cfg.block_n_small,
        MODE=mode, NUM_SPLITS=splits, DOT_PREC=dot_prec,
        # Triton 3.6's interpreter computes tl.dot on bf16 operands as integers:
        # there, upcast the operands (P is still rounded to the input dtype first).
        UPCAST_DOT=_interpreting() and query.device.type != "cuda",
        num_warps=warps, num_stages=stages,
    )
    if splits > 1:
        rows = md.split_rows
        _split_merge_kernel[(rows.numel(), num_heads)](
            po, pml, out, rows,
            po.stride(0), po.stride(1), po.stride(2), pml.stride(0), pml.stride(1), pml.stride(2),
            out.stride(0), out.stride(1),
            NUM_SPLITS=splits, S_PAD=max(2, _next_pow2(splits)), HEAD_DIM=head_dim, D_PAD=d_pad,
            num_warps=4,
        )
    return out
