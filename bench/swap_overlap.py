"""Time to first token of a turn whose history is in the GPU tier, in the CPU tier
(swap-in overlapped with compute layer by layer), or gone (recomputed).

    python bench/swap_overlap.py --shape llama3-8b --history 4096 --new 200

Targets (issue 3): CPU-resident <= 1.3x GPU-resident and <= 0.5x recompute.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from shapes import shape_checkpoint  # noqa: E402


def ttft(engine, prompt, session_id):
    from pensieve.engine import SamplingParams

    _sync(engine)
    start = time.perf_counter()
    engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True), session_id=session_id)
    while engine.has_unfinished():
        engine.step()
    _sync(engine)
    return time.perf_counter() - start


def _sync(engine):
    import torch

    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--history", type=int, default=4096)
    ap.add_argument("--new", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cpu-cache-bytes", default="64Gi")
    ap.add_argument("--workdir", default="/tmp/pensieve-bench")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from pensieve.engine import EngineConfig, LLMEngine

    model = shape_checkpoint(args.shape, args.workdir)
    engine = LLMEngine(EngineConfig(model=model, load_format="dummy", cache_mode="pensieve",
                                    cpu_cache_bytes=args.cpu_cache_bytes,
                                    max_num_batched_tokens=max(8192, args.history + args.new + 64)))
    rng = random.Random(0)
    vocab = engine.model_config["vocab_size"]
    times = {"gpu": [], "cpu": [], "recompute": []}
    for r in range(args.repeats + 1):
        history = [rng.randrange(vocab) for _ in range(args.history)]
        turn = history + [rng.randrange(vocab) for _ in range(args.new)]
        for where in ("gpu", "cpu", "recompute"):
            sid = f"{where}-{r}"
            ttft(engine, history, sid)  # first turn fills the cache
            if where == "cpu":
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
    result = dict(shape=args.shape, device=str(engine.device), history=args.history, new=args.new,
                  ttft_seconds=med, cpu_over_gpu=med["cpu"] / med["gpu"], cpu_over_recompute=med["cpu"] / med["recompute"],
                  swap_in_bytes_per_turn=args.history // engine.config.block_size * engine.runner.bytes_per_block,
                  targets=dict(cpu_over_gpu="<= 1.3", cpu_over_recompute="<= 0.5"))
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
