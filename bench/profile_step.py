"""Where a step's time goes, host and device: one prefill turn over a cached
history and a few decode steps of a large batch, under cProfile (Python) and
torch.profiler (operators and kernels).

    python bench/profile_step.py --shape llama3-8b --history 4096 --new 200 --decodes 256
"""
from __future__ import annotations

import cProfile
import io
import pstats
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
from shapes import shape_checkpoint, sync as sync_engine  # noqa: E402


def profiled(name, fn, sync, rows=22):
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm: compiles, allocator
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    wall = time.perf_counter() - t0
    pr = cProfile.Profile()
    pr.enable()
    fn()
    sync()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(rows)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn()
        sync()
    print(f"\n===== {name}: {wall * 1e3:.1f} ms wall (unprofiled)")
    print("\n".join(line for line in s.getvalue().splitlines() if line.strip())[:6000])
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


def main() -> int:
    ap = harness.parser(__doc__, out=False)
    ap.add_argument("--history", type=int, default=4096)
    ap.add_argument("--new", type=int, default=200)
    ap.add_argument("--decodes", type=int, default=256)
    args = ap.parse_args()

    from pensieve.engine import EngineConfig, LLMEngine, SamplingParams

    model = shape_checkpoint(args.shape, args.workdir)
    engine = LLMEngine(EngineConfig(model=model, load_format="dummy", cache_mode="pensieve", cpu_cache_bytes="2Gi",
                                    max_num_seqs=max(256, args.decodes), max_num_batched_tokens=8192))

    def sync():
        sync_engine(engine)

    rng = random.Random(0)
    vocab = engine.model_config["vocab_size"]
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    history = [rng.randrange(vocab) for _ in range(args.history)]
    counter = [0]

    def turn():
        counter[0] += 1
        sid = f"p{counter[0]}"
        engine.add_request(history, one, session_id=sid)
        while engine.has_unfinished():
            engine.step()
        sync()
        engine.add_request(history + [rng.randrange(vocab) for _ in range(args.new)], one, session_id=sid)
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        sync()
        turn.last = time.perf_counter() - t0
        engine.delete_session(sid)

    profiled(f"turn of {args.new} new tokens over {args.history} cached (includes the first turn)", turn, sync)
    print(f"cached turn alone: {turn.last * 1e3:.1f} ms")

    for i in range(args.decodes):
        engine.add_request([rng.randrange(vocab) for _ in range(512)],
                           SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()

    def decode_steps():
        for _ in range(4):
            engine.step()

    profiled(f"4 decode steps of {args.decodes} sequences", decode_steps, sync)
    for rid in list(engine.requests):
        engine.abort(rid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
