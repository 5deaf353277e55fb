"""First throughput figure of the engine: N requests of fixed prompt and output
lengths, all submitted at once, on dummy weights of a real shape.

    python bench/engine_throughput.py --shape llama3-8b --requests 256 --prompt-len 512 --output-len 128
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from shapes import shape_checkpoint, sync  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--attention-impl", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--workdir", default="/tmp/pensieve-bench")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from pensieve.engine import EngineConfig, LLMEngine, SamplingParams

    model = shape_checkpoint(args.shape, args.workdir)
    engine = LLMEngine(EngineConfig(model=model, load_format="dummy", dtype=args.dtype, cache_mode="none",
                                    max_num_batched_tokens=args.max_num_batched_tokens,
                                    attention_impl=args.attention_impl, max_num_seqs=args.requests))
    rng = random.Random(0)
    vocab = engine.model_config["vocab_size"]
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    params = __import__("pensieve.engine", fromlist=["SamplingParams"]).SamplingParams(
        max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    # warm-up: compiles the kernels of every phase (prefill-only, mixed prefill + decode, decode-only)
    engine.generate(prompts[:16], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    sync(engine)
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    sync(engine)
    elapsed = time.perf_counter() - start
    gen = sum(len(o) for o in outs)
    result = dict(shape=args.shape, device=str(engine.device), dtype=str(engine.dtype), requests=args.requests,
                  prompt_len=args.prompt_len, output_len=args.output_len, seconds=elapsed,
                  output_tokens_per_s=gen / elapsed,
                  total_tokens_per_s=(gen + args.requests * args.prompt_len) / elapsed,
                  gpu_blocks=engine.num_gpu_blocks, steps=engine.stats.steps,
                  attention=("triton" if engine.runner.uses_triton else "reference"))
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0



if __name__ == "__main__":
    sys.exit(main())
