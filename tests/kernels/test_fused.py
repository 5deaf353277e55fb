"""Fused layer kernels (RMSNorm + residual, SiLU x up, rotary + KV write) against the torch references.

Tolerances: float32 within 1e-5 relative; bf16 within 4 ulps of the reference
(each of up to three rounding points may land on the other side; Triton's interpreter
also rounds bf16 differently from the GPU), and bit-exact where no arithmetic
happens (values copied into the cache)."""
from __future__ import annotations

import pytest
import torch

from pensieve.kernels import (
    rms_norm,
    rms_norm_ref,
    rotary_write_kv,
    rotary_write_kv_ref,
    silu_and_mul,
    silu_and_mul_ref,
)

DTYPES = [torch.float32, torch.bfloat16]
IDS = ["fp32", "bf16"]


def _close(a, b, dtype):
    assert not torch.isnan(a.float()).any()
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:  # four bf16 ulps (an ulp is at most 2^-7 of the value): up to three rounding points may flip
        torch.testing.assert_close(a.float(), b.float(), rtol=2**-5, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("rows,hidden", [(1, 64), (7, 576), (5, 96)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(device, dtype, rows, hidden, with_residual):
    g = torch.Generator().manual_seed(rows * hidden)
    x = torch.randn(rows, hidden, generator=g).to(device, dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(device, dtype)
    res = torch.randn(rows, hidden, generator=g).to(device, dtype) if with_residual else None
    ref_out, ref_res = rms_norm_ref(x.clone(), w, 1e-5, None if res is None else res.clone())
    out, new_res = rms_norm(x, w, 1e-5, res, impl="triton")
    _close(out, ref_out, dtype)
    if with_residual:
        assert new_res is res  # updated in place
        _close(new_res, ref_res, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("rows,inter", [(1, 64), (6, 1536), (3, 100)])
def test_silu_and_mul(device, dtype, rows, inter):
    g = torch.Generator().manual_seed(rows + inter)
    gu = (3 * torch.randn(rows, 2 * inter, generator=g)).to(device, dtype)
    _close(silu_and_mul(gu, impl="triton"), silu_and_mul_ref(gu), dtype)


def _cos_sin(max_pos, head_dim, theta=10000.0):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv)
    emb = torch.cat((freqs, freqs), -1)
    return torch.stack([emb.cos(), emb.sin()], 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 32), (9, 3, 64), (8, 8, 16)], ids=["gqa2", "gqa3-d64", "mha"])
@pytest.mark.parametrize("rotary", [True, False])
def test_rotary_write_kv(device, dtype, hq, hkv, d, rotary):
    g = torch.Generator().manual_seed(hq * d)
    t, nb, bs = 11, 6, 16
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(device, dtype)
    positions = torch.randint(0, 500, (t,), generator=g).to(device)
    cs = _cos_sin(512, d).to(device) if rotary else None
    slots = torch.randperm(nb * bs, generator=g)[:t]
    slots[4] = -1  # a padding token: not written
    slots = slots.to(device)
    kc = torch.full((nb, bs, hkv, d), float("nan")).to(device, dtype)
    vc = torch.full_like(kc, float("nan"))
    kr, vr = kc.clone(), vc.clone()
    q_ref = rotary_write_kv_ref(qkv, positions, cs, kr, vr, slots, hq, hkv)
    q = rotary_write_kv(qkv, positions, cs, kc, vc, slots, hq, hkv, impl="triton")
    _close(q, q_ref, dtype)
    assert torch.equal(torch.isnan(kc.float()), torch.isnan(kr.float()))
    written = ~torch.isnan(kr.float())
    assert int(written.sum()) == (t - 1) * hkv * d
    _close(kc.float()[written], kr.float()[written], dtype)
    assert torch.equal(vc[~torch.isnan(vr.float())], vr[~torch.isnan(vr.float())])  # values copied bit for bit
