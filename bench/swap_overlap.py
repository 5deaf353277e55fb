"""Time to first token of a turn whose history is in the GPU tier, in the CPU tier
(swap-in overlapped with compute layer by layer), or gone (recomputed).

    python bench/swap_overlap.py --shape llama3-8b --history 4096 --new 200

Targets (issue 3): CPU-resident <= 1.3x GPU-resident and <= 0.5x recompute.
"""
from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
from shapes import shape_checkpoint, sync  # noqa: E402


def ttft(engine, prompt, session_id):
    from pensieve.engine import SamplingParams

    sync(engine)
    start = time.perf_counter()
    engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True), session_id=session_id)
    while engine.has_unfinished():
        engine.step()
    sync(engine)
    return time.perf_counter() - start



def use_impl(swapper, spec: str) -> None:
    """``kernel:N`` (N programs; 0 = one per (block, chunk) item) or ``dma``."""
    impl, _, programs = spec.partition(":")
    swapper.impl = impl
    swapper.programs = (int(programs) or 1 << 30) if programs else None


def link_bandwidth(engine, blocks: int, specs: list[str]) -> dict:
    """GB/s of one turn's swap-in without compute: one big DMA (the link's ceiling),
    the per-layer kernel and per-run DMA over randomly placed blocks."""
    import torch

    if engine.device.type != "cuda":
        return {}
    runner = engine.runner
    nbytes = blocks * runner.bytes_per_block
    host = torch.empty(nbytes // 2, dtype=torch.bfloat16, pin_memory=True)
    dev = torch.empty_like(host, device=engine.device)

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return nbytes / (time.perf_counter() - t0) / 1e9

    gen = torch.Generator().manual_seed(0)
    cpu_ids = torch.randperm(engine.cache.cpu.num_blocks, generator=gen)[:blocks].tolist()
    gpu_ids = torch.randperm(engine.cache.gpu.num_blocks, generator=gen)[:blocks].tolist()
    from pensieve.engine.cache_manager import SwapPlan

    def swap_in(spec):
        def run():
            swapper = runner.swapper
            use_impl(swapper, spec)
            swapper.begin(SwapPlan(swap_in=list(zip(cpu_ids, gpu_ids))))
            swapper.finish_without_compute()
        return run

    out = dict(one_dma_GBps=timed(lambda: dev.copy_(host, non_blocking=True)))
    out.update({f"{spec}_GBps": timed(swap_in(spec)) for spec in specs})
    return out


def main() -> int:
    ap = harness.parser(__doc__)
    ap.add_argument("--history", type=int, default=4096)
    ap.add_argument("--new", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cpu-cache-bytes", default="8Gi")
    ap.add_argument("--swap-impls", default="kernel:16,kernel:32,kernel:64,kernel:0,dma",
                    help="CPU-tier copy implementations to time (kernel:N = N programs, 0 = one per item)")
    args = ap.parse_args()

    from pensieve.engine import EngineConfig, LLMEngine

    model = shape_checkpoint(args.shape, args.workdir)
    engine = LLMEngine(EngineConfig(model=model, load_format="dummy", cache_mode="pensieve",
                                    cpu_cache_bytes=args.cpu_cache_bytes,
                                    max_num_batched_tokens=max(8192, args.history + args.new + 64)))
    rng = random.Random(0)
    vocab = engine.model_config["vocab_size"]
    impls = args.swap_impls.split(",")
    places = ["gpu"] + [f"cpu:{i}" for i in impls] + ["recompute"]
    times = {p: [] for p in places}
    for r in range(args.repeats + 1):
        history = [rng.randrange(vocab) for _ in range(args.history)]
        turn = history + [rng.randrange(vocab) for _ in range(args.new)]
        for where in places:
            sid = f"{where}-{r}"
            ttft(engine, history, sid)  # first turn fills the cache
            if where.startswith("cpu"):
                use_impl(engine.runner.swapper, where[4:])
                engine.offload_session(sid)
                assert not engine.get_session(sid).block_ids
            if where == "recompute":
                engine.delete_session(sid)
                sid = None
            t = ttft(engine, turn, sid)
            if r > 0:  # the first round warms up kernels and allocators
                times[where].append(t)
            if sid:
                engine.delete_session(sid)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = min(impls, key=lambda i: med[f"cpu:{i}"])
    result = dict(shape=args.shape, device=str(engine.device), history=args.history, new=args.new,
                  repeats=args.repeats, ttft_seconds=med, best_swap_impl=best,
                  cpu_over_gpu={i: med[f"cpu:{i}"] / med["gpu"] for i in impls},
                  cpu_over_recompute={i: med[f"cpu:{i}"] / med["recompute"] for i in impls},
                  swap_in_bytes_per_turn=args.history // engine.config.block_size * engine.runner.bytes_per_block,
                  link=link_bandwidth(engine, args.history // engine.config.block_size, impls),
                  targets=dict(cpu_over_gpu="<= 1.3", cpu_over_recompute="<= 0.5"))
    harness.write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
