"""Fused elementwise kernels of the decoder layers (Triton).

Contracts: :func:`pensieve.kernels.reference.rms_norm_ref`,
:func:`~pensieve.kernels.reference.silu_and_mul_ref`,
:func:`~pensieve.kernels.reference.rotary_write_kv_ref`.

Why: unfused, each of these is three to eight passes over the activations
(float32 upcast, square, mean, scale, downcast, weight; silu then multiply;
rotate-half's two slices and concatenation, then the cache write). At a
4096-token prefill step those passes cost more than a tenth of the step; in a
decode step they are hundreds of tiny launches. Each kernel here reads its
inputs once and writes its outputs once. Rounding follows the references:
the same points where torch rounds to the activation dtype round here.

Integer arguments that vary from step to step (token counts, row strides) are
marked ``do_not_specialize`` so that no new variant is compiled while serving.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._interpreter import apply_interpreter_patch

apply_interpreter_patch()


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, eps,
                     N: tl.constexpr, N_PAD: tl.constexpr, HAS_RES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, N_PAD)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(r_ptr + row * stride_r + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / N
    y = (xf * tl.math.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + offs, (y.to(tl.float32) * w.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """See :func:`pensieve.kernels.reference.rms_norm_ref`. With a residual, the new residual
    (x + residual) is written into ``residual`` in place and returned."""
    rows, n = x.shape
    out = torch.empty_like(x)
    if rows == 0:
        return out, residual
    if x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("rows must be contiguous")
    n_pad = _next_pow2(n)
    r = residual if residual is not None else x
    _rms_norm_kernel[(rows,)](x, r, weight, out, x.stride(0), r.stride(0), out.stride(0), float(eps),
                              N=n, N_PAD=n_pad, HAS_RES=residual is not None,
                              num_warps=min(16, max(1, n_pad // 512)))
    return out, residual


@triton.jit(do_not_specialize=["stride_in", "stride_out"])
def _silu_mul_kernel(gu_ptr, out_ptr, stride_in, stride_out, I: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(gu_ptr + row * stride_in + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_in + I + offs, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + offs, (s.to(tl.float32) * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    rows, two_i = gate_up.shape
    inter = two_i // 2
    out = torch.empty((rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0:
        return out
    block = min(2048, _next_pow2(inter))
    _silu_mul_kernel[(rows, triton.cdiv(inter, block))](gate_up, out, gate_up.stride(0), out.stride(0),
                                                        I=inter, BLOCK=block, num_warps=4)
    return out


@triton.jit(do_not_specialize=["stride_t", "stride_qt", "stride_qh"])
def _rotary_write_kernel(
    qkv_ptr, pos_ptr, cs_ptr, slot_ptr, kc_ptr, vc_ptr, q_out_ptr,
    stride_t, stride_qt, stride_qh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    HQ: tl.constexpr, HKV: tl.constexpr, HQ_PAD: tl.constexpr, HKV_PAD: tl.constexpr,
    D: tl.constexpr, HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr, ROTARY: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_j = tl.arange(0, HALF)
    base = qkv_ptr + t * stride_t
    if ROTARY:
        pos = tl.load(pos_ptr + t).to(tl.int64)
        cs = cs_ptr + pos * (2 * D)
        # the rotate-half layout repeats each frequency in both halves
        cos = tl.load(cs + offs_j)[None, :]
        sin = tl.load(cs + D + offs_j)[None, :]
    # query heads: rotated into q_out
    offs_hq = tl.arange(0, HQ_PAD)
    mq = (offs_hq < HQ)[:, None]
    qp = base + offs_hq[:, None] * D + offs_j[None, :]
    q1 = tl.load(qp, mask=mq, other=0.0).to(tl.float32)
    q2 = tl.load(qp + HALF, mask=mq, other=0.0).to(tl.float32)
    if ROTARY:
        o1 = q1 * cos - q2 * sin
        o2 = q2 * cos + q1 * sin
    else:
        o1 = q1
        o2 = q2
    op = q_out_ptr + t * stride_qt + offs_hq[:, None].to(tl.int64) * stride_qh + offs_j[None, :]
    tl.store(op, o1.to(q_out_ptr.dtype.element_ty), mask=mq)
    tl.store(op + HALF, o2.to(q_out_ptr.dtype.element_ty), mask=mq)
    # key and value heads: into the cache slot
    slot = tl.load(slot_ptr + t).to(tl.int64)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    offs_hk = tl.arange(0, HKV_PAD)
    mk = ((offs_hk < HKV) & (slot >= 0))[:, None]
    kp = base + HQ * D + offs_hk[:, None] * D + offs_j[None, :]
    k1 = tl.load(kp, mask=mk, other=0.0).to(tl.float32)
    k2 = tl.load(kp + HALF, mask=mk, other=0.0).to(tl.float32)
    if ROTARY:
        n1 = k1 * cos - k2 * sin
        n2 = k2 * cos + k1 * sin
    else:
        n1 = k1
        n2 = k2
    hk = offs_hk[:, None].to(tl.int64)
    kc = kc_ptr + blk * stride_kcb + off * stride_kcs + hk * stride_kch + offs_j[None, :]
    tl.store(kc, n1.to(kc_ptr.dtype.element_ty), mask=mk)
    tl.store(kc + HALF, n2.to(kc_ptr.dtype.element_ty), mask=mk)
    vp = base + (HQ + HKV) * D + offs_hk[:, None] * D + offs_j[None, :]
    vc = vc_ptr + blk * stride_vcb + off * stride_vcs + hk * stride_vch + offs_j[None, :]
    tl.store(vc, tl.load(vp, mask=mk, other=0.0).to(vc_ptr.dtype.element_ty), mask=mk)
    tl.store(vc + HALF, tl.load(vp + HALF, mask=mk, other=0.0).to(vc_ptr.dtype.element_ty), mask=mk)


def rotary_write_kv_triton(qkv, positions, cos_sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads):
    """See :func:`pensieve.kernels.reference.rotary_write_kv_ref`. One program per token."""
    tokens = qkv.shape[0]
    _, block_size, _, head_dim = k_cache.shape
    q = torch.empty((tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if tokens == 0:
        return q
    if head_dim % 2 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be an even power of two for the fused rotary kernel, got {head_dim}")
    if qkv.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the head dimension must be contiguous")
    rotary = cos_sin is not None
    cs = cos_sin if rotary else qkv
    _rotary_write_kernel[(tokens,)](
        qkv, positions, cs, slot_mapping, k_cache, v_cache, q,
        qkv.stride(0), q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HQ=num_heads, HKV=num_kv_heads, HQ_PAD=_next_pow2(num_heads), HKV_PAD=_next_pow2(num_kv_heads),
        D=head_dim, HALF=head_dim // 2, BLOCK_SIZE=block_size, ROTARY=rotary, num_warps=4,
    )
    return q
