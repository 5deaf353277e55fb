"""Kernel benchmark: Pensieve paged attention vs FlexAttention (paged) vs SDPA (gathered / contiguous KV).

Usage (GPU):   python3 bench/kernels.py --out results.json
Smoke (CPU):   TRITON_INTERPRET=1 python bench/kernels.py --smoke --out /tmp/k.json

Per shape it prints time (median of triton.testing.do_bench), TB/s and TFLOP/s
counted from the actual lengths, and percentages of the device copy bandwidth
and bf16 matmul rate measured in the same run.

Counting (per shape):
  bytes = K and V of every attended position read once (kv_len x Hkv x D x 2 x 2 B)
          + queries read and outputs written once (T x Hq x D x 2 B each);
  flops = 4 x D x Hq x sum over query tokens of (keys it attends)  (QK^T and PV).
The roofline time is max(bytes / copy bandwidth, flops / matmul rate).

Baselines:
  flex       torch.nn.attention.flex_attention on the *same* paged cache, viewed as
             one sequence of physical slots [1, Hkv, num_blocks*block_size, D];
             queries of all segments packed into [1, Hq, T, D]; a block mask whose
             mask_mod maps a physical slot to (request, logical position) through
             inverse block tables (what PyTorch's paged-attention helper does);
             KV sparse block = the page size (32) where flex accepts it, else 128.
             Block-mask creation is metadata (once per step) and is not timed.
  sdpa_gath  gather each request's blocks into contiguous [B, Hkv, L, D] (timed),
             then F.scaled_dot_product_attention (decodes: the GQA group is packed
             into the query length, no mask; extend: causal_lower_right, GQA).
  sdpa_contig the same SDPA on KV that is already contiguous (no gather): the
             "no paging" reference.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from pensieve.kernels import paged_attention, prepare_paged_attention  # noqa: E402
from pensieve.kernels.triton_attention import GPU_CONFIG, TileConfig  # noqa: E402

HQ, HKV, D, BS = 32, 8, 128, 32


def bench_fn(fn, smoke):
    if smoke:
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def measure_ceilings(dev, smoke):
    if smoke:
        return {"copy_TBps": 0.01, "matmul_TFLOPs": 0.1}
    n = 1 << 29  # 1 GiB of bf16
    a = torch.randn(n, device=dev, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = bench_fn(lambda: b.copy_(a), smoke)
    copy = 2 * a.numel() * 2 / ms / 1e9
    del a, b
    # One 8192^3 median swung from 680 to 778 TFLOP/s between H200 runs (clocks and power
    # settle differently), which moved every prefill ratio by 14%. The ceiling is the best
    # of three medians at two sizes: the rate the chip shows it can reach in this run.
    rates = []
    for m in (8192, 16384):
        x = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
        y = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
        for _ in range(3):
            rates.append(2 * m**3 / bench_fn(lambda: x @ y, smoke) / 1e9)
        del x, y
    return {"copy_TBps": copy, "matmul_TFLOPs": max(rates), "matmul_TFLOPs_samples": [round(r) for r in rates]}


def shapes(smoke):
    if smoke:
        return {
            "decode": [(1, 127)] * 4,
            "extend": [(20, 64)] * 2,
            "mixed": [(40, 0)] * 2 + [(1, 127)] * 4,
        }
    return {
        "decode_64x4k": [(1, 4095)] * 64,
        "decode_256x1k": [(1, 1023)] * 256,
        "decode_256x600": [(1, 599)] * 256,   # the engine benchmark's 256 x (512 + 128) decode
        "decode_64x1.3k": [(1, 1339)] * 64,   # ... and its 64 x (1240 + 200) decode
        "extend_32x200@4k": [(200, 4096)] * 32,
        "mixed_2x2048+64x4k": [(2048, 0)] * 2 + [(1, 4095)] * 64,
    }


class Case:
    """One request per segment; a random permutation of physical blocks; free blocks NaN."""

    def __init__(self, segs, dev, dtype, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.segs = segs
        self.q_lens = [q for q, _ in segs]
        self.kv_lens = [q + p for q, p in segs]
        nblk = [math.ceil(L / BS) for L in self.kv_lens]
        self.max_blocks = max(nblk)
        used = sum(nblk)
        self.num_blocks = used + 64
        perm = torch.randperm(self.num_blocks, generator=g)
        bt = torch.zeros(len(segs), self.max_blocks, dtype=torch.int32)
        self.phys_req = torch.full((self.num_blocks,), -1, dtype=torch.int32)
        self.phys_lblk = torch.zeros(self.num_blocks, dtype=torch.int32)
        c = 0
        for i, n in enumerate(nblk):
            ids = perm[c : c + n]
            c += n
            bt[i, :n] = ids.to(torch.int32)
            self.phys_req[ids] = i
            self.phys_lblk[ids] = torch.arange(n, dtype=torch.int32)
        self.bt = bt.to(dev)
        shape = (self.num_blocks, BS, HKV, D)
        self.k = torch.randn(shape, device=dev, dtype=dtype)
        self.v = torch.randn(shape, device=dev, dtype=dtype)
        free = perm[used:].to(dev)
        self.k[free] = float("nan")
        self.v[free] = float("nan")
        self.T = sum(self.q_lens)
        self.q = torch.randn(self.T, HQ, D, device=dev, dtype=dtype)
        qs = [0]
        for q in self.q_lens:
            qs.append(qs[-1] + q)
        self.qs_cpu = torch.tensor(qs, dtype=torch.int32)
        self.ps_cpu = torch.tensor([p for _, p in segs], dtype=torch.int32)
        self.qs = self.qs_cpu.to(dev)
        self.ps = self.ps_cpu.to(dev)
        self.scale = D**-0.5
        es = self.k.element_size()
        self.bytes = sum(self.kv_lens) * HKV * D * 2 * es + 2 * self.T * HQ * D * es
        self.flops = 4 * D * HQ * sum(q * p + q * (q + 1) // 2 for q, p in segs)

    def groups(self):
        """Uniform groups of segments (same q_len and kv_len) for the SDPA baselines."""
        out = {}
        for i, (q, p) in enumerate(self.segs):
            out.setdefault((q, p), []).append(i)
        return out


def sdpa_group(q, k, v, q_len, kv_len, scale):
    """q [B, q_len, Hq, D] ; k, v [B, Hkv, kv_len, D] -> [B, q_len, Hq, D]."""
    B = q.shape[0]
    group = HQ // HKV
    if q_len == 1:
        # decode: pack the GQA group into the query length, no mask needed
        qh = q.view(B, HKV, group, D)
        o = F.scaled_dot_product_attention(qh, k, v, scale=scale)
        return o.reshape(B, 1, HQ, D)
    qh = q.transpose(1, 2)
    if q_len == kv_len:
        o = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(q_len, kv_len)
        try:
            o = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        except Exception:
            kk = k.repeat_interleave(group, 1)
            vv = v.repeat_interleave(group, 1)
            o = F.scaled_dot_product_attention(qh, kk, vv, attn_mask=mask, scale=scale)
    return o.transpose(1, 2)


def make_sdpa(case, gathered):
    groups = []
    for (q_len, pos), idx in case.groups().items():
        kv = q_len + pos
        nb = math.ceil(kv / BS)
        rows = torch.tensor(idx, device=case.q.device)
        bt = case.bt[rows, :nb].long()
        qi = torch.cat([torch.arange(int(case.qs_cpu[i]), int(case.qs_cpu[i + 1])) for i in idx]).to(case.q.device)
        groups.append((q_len, kv, nb, bt, qi, len(idx)))

    def gather(bt, nb, kv, B):
        k = case.k[bt].view(B, nb * BS, HKV, D)[:, :kv].transpose(1, 2)
        v = case.v[bt].view(B, nb * BS, HKV, D)[:, :kv].transpose(1, 2)
        return k, v

    pre = [gather(bt, nb, kv, B) for (q_len, kv, nb, bt, qi, B) in groups] if not gathered else None
    if pre is not None:
        pre = [(k.contiguous(), v.contiguous()) for k, v in pre]
    out = torch.empty_like(case.q)

    def fn():
        for gi, (q_len, kv, nb, bt, qi, B) in enumerate(groups):
            k, v = gather(bt, nb, kv, B) if gathered else pre[gi]
            q = case.q[qi].view(B, q_len, HQ, D)
            out[qi] = sdpa_group(q, k, v, q_len, kv, case.scale).reshape(-1, HQ, D)
        return out

    return fn


def make_flex(case, info):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = case.q.device
    phys_req = case.phys_req.to(dev)
    phys_lblk = case.phys_lblk.to(dev)
    q_req = torch.repeat_interleave(torch.arange(len(case.segs), device=dev, dtype=torch.int32),
                                    torch.tensor(case.q_lens, device=dev))
    q_pos = torch.cat([torch.arange(p, p + q, device=dev, dtype=torch.int32) for q, p in case.segs])

    def mask_mod(b, h, q_idx, kv_idx):
        blk = kv_idx // BS
        lpos = phys_lblk[blk] * BS + kv_idx % BS
        return (phys_req[blk] == q_req[q_idx]) & (lpos <= q_pos[q_idx])

    kv_len = case.num_blocks * BS
    # the paged cache itself, viewed as one sequence of physical slots (no copy)
    k = case.k.view(kv_len, HKV, D).permute(1, 0, 2).unsqueeze(0)
    v = case.v.view(kv_len, HKV, D).permute(1, 0, 2).unsqueeze(0)
    q = case.q.permute(1, 0, 2).unsqueeze(0)
    compiled = torch.compile(flex_attention, dynamic=False)
    errors = []
    for bs, opts in (((128, BS), {"BLOCK_M": 64, "BLOCK_N": BS}), ((128, BS), None), (128, None)):
        try:
            bm = create_block_mask(mask_mod, None, None, case.T, kv_len, device=dev, BLOCK_SIZE=bs)
            kw = {"kernel_options": opts} if opts else {}

            def fn(bm=bm, kw=kw):
                return compiled(q, k, v, block_mask=bm, scale=case.scale, enable_gqa=True, **kw)

            o = fn()
            torch.cuda.synchronize() if dev.type == "cuda" else None
            info["flex_block_size"] = str(bs)
            info["flex_kernel_options"] = str(opts)
            return fn, o[0].permute(1, 0, 2)
        except Exception as e:  # record and try the next configuration
            errors.append(f"{bs} {opts}: {type(e).__name__}: {str(e)[:300]}")
    info["flex_errors"] = errors
    raise RuntimeError("flex attention failed in every configuration")


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def run_shape(name, segs, dev, dtype, ceil, smoke, variants):
    case = Case(segs, dev, dtype)
    res = {"shape": name, "T": case.T, "num_segments": len(segs), "bytes": case.bytes, "flops": case.flops}
    res["roofline_ms"] = {
        "memory": case.bytes / (ceil["copy_TBps"] * 1e9),
        "compute": case.flops / (ceil["matmul_TFLOPs"] * 1e9),
    }
    timings = {}
    # reference output (contiguous SDPA) for correctness checks of every variant
    sdpa_c = make_sdpa(case, gathered=False)
    ref = sdpa_c().clone()

    def record(vname, fn, out=None):
        try:
            o = fn() if out is None else out
            if dev.type == "cuda":
                torch.cuda.synchronize()
            err = rel_err(o, ref)
            ms = bench_fn(fn, smoke)
            timings[vname] = {
                "ms": ms,
                "TBps": case.bytes / ms / 1e9,
                "TFLOPs": case.flops / ms / 1e9,
                "pct_copy_bw": 100 * case.bytes / ms / 1e9 / ceil["copy_TBps"],
                "pct_matmul": 100 * case.flops / ms / 1e9 / ceil["matmul_TFLOPs"],
                "rel_err_vs_sdpa": err,
                "finite": bool(torch.isfinite(o.float()).all()),
            }
        except Exception as e:
            timings[vname] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            traceback.print_exc()

    # Pensieve kernel: metadata once per step (like the engine), then the kernel alone
    out = torch.empty_like(case.q)
    for vname, kw in variants(name):
        cfg = kw.pop("config", None)
        try:
            md = prepare_paged_attention(case.qs_cpu, case.ps_cpu, HQ, HKV, device=dev, config=cfg, **kw)
        except Exception as e:
            timings[vname] = {"error": f"prepare: {e}"}
            continue
        fn = (lambda md=md: paged_attention(case.q, case.k, case.v, case.bt, case.qs, case.ps, case.scale,
                                            metadata=md, out=out, impl="triton"))
        record(vname, fn)
        if vname in timings and "ms" in timings[vname]:
            timings[vname]["num_splits"] = md.num_splits
    # the plain call (metadata built inside, host work + H2D included)
    record("pensieve_plain_call", lambda: paged_attention(case.q, case.k, case.v, case.bt, case.qs_cpu,
                                                          case.ps_cpu, case.scale, impl="triton"))
    info = {}
    try:
        ffn, fo = make_flex(case, info)
        record("flex_paged", ffn, out=fo)
        timings["flex_paged"].update(info)
    except Exception as e:
        timings["flex_paged"] = {"error": f"{type(e).__name__}: {str(e)[:300]}", **info}
    record("sdpa_gathered", make_sdpa(case, gathered=True))
    record("sdpa_contiguous", sdpa_c, out=ref)
    res["timings"] = timings
    del case
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return res


def variants_for(smoke):
    def v(name):
        if smoke:
            out = [("pensieve", {})]
            if name == "decode":
                out.append(("pensieve_split4", {"num_splits": 4}))
            return out
        out = [("pensieve", {})]
        cfg = dataclasses.replace
        if name.startswith("decode"):
            out += [
                ("pensieve_split2", {"num_splits": 2}),
                ("pensieve_bn64_s3", {"num_splits": 1, "config": cfg(GPU_CONFIG, block_n_small=64, num_stages_small=3)}),
                ("pensieve_bn32_s4", {"num_splits": 1, "config": cfg(GPU_CONFIG, block_n_small=32, num_stages_small=4)}),
                ("pensieve_bn128_s3", {"num_splits": 1, "config": cfg(GPU_CONFIG, num_stages_small=3)}),
                ("pensieve_bn128_w8", {"num_splits": 1, "config": cfg(GPU_CONFIG, num_warps_small=8)}),
                ("pensieve_bn128_w4", {"num_splits": 1, "config": cfg(GPU_CONFIG, block_n_small=128, num_warps_small=4)}),
                ("pensieve_bn64_w4", {"num_splits": 1, "config": cfg(GPU_CONFIG, num_warps_small=4)}),
                ("pensieve_bn256_w8", {"num_splits": 1, "config": cfg(GPU_CONFIG, block_n_small=256, num_warps_small=8)}),
                ("pensieve_split4", {"num_splits": 4}),
            ]
        else:
            def large(m, n, w, st):
                return cfg(GPU_CONFIG, block_m_large=m, block_n_large=n, num_warps_large=w, num_stages_large=st)
            out += [
                ("pensieve_m64n64_w4_s3", {"config": large(64, 64, 4, 3)}),
                ("pensieve_m64n128_w4_s2", {"config": large(64, 128, 4, 2)}),
                ("pensieve_m64n128_w8_s2", {"config": large(64, 128, 8, 2)}),
                ("pensieve_m64n32_w4_s3", {"config": large(64, 32, 4, 3)}),
                ("pensieve_m128n64_w8_s2", {"config": large(128, 64, 8, 2)}),
                ("pensieve_m128n128_w8_s3", {"config": large(128, 128, 8, 3)}),
            ]
        return out

    return v


def main():
    ap = harness.parser(__doc__, shape=False, workdir=False, out_required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU interpreter allowed")
    ap.add_argument("--only", default="", help="comma-separated shape names")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    torch.manual_seed(0)
    try:
        import triton  # noqa: F401  (its version goes into the result)
    except ImportError:
        pass
    env = {"default_gpu_config": GPU_CONFIG.__dict__}
    ceil = measure_ceilings(dev, args.smoke)
    print("ceilings:", ceil, flush=True)
    results = {"env": env, "ceilings": ceil, "shapes": []}
    only = set(filter(None, args.only.split(",")))
    for name, segs in shapes(args.smoke).items():
        if only and name not in only:
            continue
        t0 = time.time()
        r = run_shape(name, segs, dev, dtype, ceil, args.smoke, variants_for(args.smoke))
        r["wall_s"] = time.time() - t0
        results["shapes"].append(r)
        harness.write_result(results, args.out, echo=False, device=str(dev))  # after each shape: partial runs count
        print(f"[{name}] done in {r['wall_s']:.0f}s", flush=True)
    print_table(results)


def print_table(results):
    ceil = results["ceilings"]
    print(f"\ncopy {ceil['copy_TBps']:.2f} TB/s   bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s")
    for r in results["shapes"]:
        rl = r["roofline_ms"]
        print(f"\n{r['shape']}: roofline mem {rl['memory']*1e3:.0f} us, compute {rl['compute']*1e3:.0f} us")
        print(f"  {'variant':24s} {'us':>8s} {'TB/s':>6s} {'TFLOP/s':>8s} {'%bw':>5s} {'%mm':>5s} {'err':>8s}")
        for vname, t in r["timings"].items():
            if "ms" not in t:
                print(f"  {vname:24s} ERROR {t.get('error', '')[:90]}")
                continue
            print(f"  {vname:24s} {t['ms']*1e3:8.1f} {t['TBps']:6.2f} {t['TFLOPs']:8.1f} "
                  f"{t['pct_copy_bw']:5.1f} {t['pct_matmul']:5.1f} {t['rel_err_vs_sdpa']:8.1e}")


if __name__ == "__main__":
    main()
