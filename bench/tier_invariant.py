"""The cache-tier invariant at a real shape: many multi-turn sessions in a random
interleaving, GPU and CPU tiers small enough to force swap-out, swap-in, drop,
recompute and suspension; every turn's greedy tokens are compared with
``--cache-mode none`` on the same weights.

In bf16 two batchings of the same computation may round differently, so a
token may flip where the reference's two best logits are nearly equal. Each
difference is reported with the reference's logit of its own pick minus the
logit of ours (the margin by which the reference preferred its token) next to
the spread of the logits: a near-tie has a margin of a few bf16 ulps of the
logit scale, a real bug shows margins of the order of the spread.

    python bench/tier_invariant.py --shape llama3-8b --out tier_invariant.json
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
from shapes import shape_checkpoint  # noqa: E402


def reference_logits(oracle, ids):
    """The oracle's float32 logits of the next token after ``ids``."""
    from pensieve.engine import SamplingParams
    from pensieve.engine.scheduler import ScheduledChunk, SchedulerOutput

    rid = oracle.add_request(ids, SamplingParams(max_tokens=1))
    req = oracle.requests[rid]
    assert oracle.cache.grow(req, len(ids))
    logits = oracle.runner.execute(SchedulerOutput([ScheduledChunk(req, 0, len(ids))]), all_logits=True)[-1].float()
    oracle.abort(rid)
    return logits


def main() -> int:
    ap = harness.parser(__doc__)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--gpu-blocks", type=int, default=40)
    ap.add_argument("--cpu-blocks", type=int, default=16)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--dtype", default="auto", help="bfloat16 (the checkpoint's) or float32 (no rounding flips)")
    args = ap.parse_args()

    import torch
    from pensieve.engine import EngineConfig, LLMEngine, SamplingParams

    model = shape_checkpoint(args.shape, args.workdir)
    common = dict(model=model, load_format="dummy", seed=args.seed, max_num_batched_tokens=256, dtype=args.dtype)
    engine = LLMEngine(EngineConfig(**common, cache_mode="pensieve", num_gpu_blocks=args.gpu_blocks,
                                    num_cpu_blocks=args.cpu_blocks))
    oracle = LLMEngine(EngineConfig(**common, cache_mode="none", num_gpu_blocks=256))
    print(f"engines ready ({engine.dtype}, {engine.device})", flush=True)
    rng = random.Random(args.seed)
    vocab = engine.model_config["vocab_size"]
    turns = {f"s{i}": [[rng.randrange(vocab) for _ in range(rng.randint(20, 200))] for _ in range(args.turns)]
             for i in range(args.sessions)}
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    history = {s: [] for s in turns}
    next_turn = {s: 0 for s in turns}
    in_flight, produced, report = {}, {}, []
    ulp = torch.finfo(engine.dtype).eps / 2  # spacing relative to the value, per dtype
    start = time.perf_counter()
    while any(next_turn[s] < args.turns for s in turns) or in_flight:
        busy = {v[0] for v in in_flight.values()}
        idle = [s for s in turns if s not in busy and next_turn[s] < args.turns]
        for sid in rng.sample(idle, k=rng.randint(0, len(idle))):
            prompt = history[sid] + turns[sid][next_turn[sid]]
            rid = engine.add_request(prompt, params, session_id=sid)
            in_flight[rid], produced[rid] = (sid, prompt), []
            next_turn[sid] += 1
        for _ in range(rng.randint(1, 4)):
            for out in engine.step():
                produced[out.request_id].extend(out.new_token_ids)
                if not out.finished:
                    continue
                sid, prompt = in_flight.pop(out.request_id)
                ours = produced[out.request_id]
                ref = oracle.generate([prompt], params)[0]
                row = dict(session=sid, prompt_len=len(prompt), equal=ours == ref)
                if ours != ref:
                    i = next(k for k, (a, b) in enumerate(zip(ours, ref)) if a != b)
                    logits = reference_logits(oracle, prompt + ref[:i])
                    row.update(first_difference=i, margin=float(logits[ref[i]] - logits[ours[i]]),
                               logit_std=float(logits.std()), ulp_at_top=float(abs(logits[ref[i]])) * ulp)
                    print(f"difference: {row}", flush=True)
                report.append(row)
                print(f"turn {len(report)}/{args.sessions * args.turns}: {'equal' if row['equal'] else 'differs'} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
                history[sid] = prompt + ours
            engine.cache.check_invariants()
    elapsed = time.perf_counter() - start
    stats = engine.cache.stats
    diffs = [r for r in report if not r["equal"]]
    result = dict(shape=args.shape, device=str(engine.device), dtype=str(engine.dtype), turns=len(report),
                  equal_turns=len(report) - len(diffs), differences=diffs,
                  max_margin=max((d["margin"] for d in diffs), default=0.0),
                  context_tokens=dict(stats.context_tokens), swap_in_blocks=stats.swap_in_blocks,
                  swap_out_blocks=stats.swap_out_blocks, evicted_tokens=dict(stats.evicted_tokens),
                  gpu_blocks=args.gpu_blocks, cpu_blocks=args.cpu_blocks, seconds=elapsed)
    for sid in list(engine.cache.sessions):
        engine.delete_session(sid)
    result["leaked_gpu_blocks"] = args.gpu_blocks - engine.cache.gpu.num_free
    result["leaked_cpu_blocks"] = args.cpu_blocks - engine.cache.cpu.num_free
    harness.write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
