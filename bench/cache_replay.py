"""Replay the multi-turn sweep's workload through the real scheduler and cache tiers, without a model.

    python bench/cache_replay.py --rates 8 12 16                 # ShareGPT, the sweep's tier sizes
    python bench/cache_replay.py --modes pensieve --rates 12 --out /tmp/replay.json

What it is for: the cache's decisions at the sweep's scale (hundreds of sessions, thousands of
chunks) on any machine, in seconds, before a device call. bench/multiturn_sweep.py's sessions
(same shapes, seeds and tier sizes) drive ``Scheduler`` and ``CacheManager`` themselves; a step
"takes" the time of a simple H200 model of the Llama-3-8B shape (weights read once, linear
layers at the matmul rate, KV reads, in-step copies over a 25 GB/s link), and the next turn of a
session is sent a think time after its reply. Per mode and rate it counts what the tiers plan:
swap-ins, in-step and ahead-of-time swap-outs (and the steps that have them), decode steps that
would run eagerly for in-step copies, preemptions, steps with requests left waiting, where the
context came from, and the host time ``Scheduler.schedule`` took per step on this machine.

What it is not: a latency measurement. Its latencies come from the step model, which knows
nothing of the host's launch costs or of copies competing with compute; the H200 sweep measures
those (issue 12: the replay found the in-step swap-outs that the H200's step-statistics log then
showed to be pensieve mode's largest cost).
"""
from __future__ import annotations

import argparse
import dataclasses
import heapq
import itertools
import json
import math
import os
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multiturn as mt  # noqa: E402
import multiturn_sweep as ms  # noqa: E402

from pensieve.engine.cache_manager import CacheManager  # noqa: E402
from pensieve.engine.cost_model import CostModel  # noqa: E402
from pensieve.engine.request import Request, RequestStatus  # noqa: E402
from pensieve.engine.sampling import SamplingParams  # noqa: E402
from pensieve.engine.scheduler import Scheduler  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336)
KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # K and V, every layer, bf16


def step_seconds(out, block_size: int) -> float:
    """The model of one step on the H200: the linear layers read the weights once (3.6 ms) or run
    at 600 TFLOP/s, whichever is longer; attention reads the KV at 3.5 TB/s and computes its pairs
    at 350 TFLOP/s; the layers wait for in-step copies over a 25 GB/s link."""
    tokens = out.num_batched_tokens
    context = sum(c.start + c.num_tokens for c in out.chunks)
    pairs = sum(c.num_tokens * c.start + c.num_tokens * (c.num_tokens + 1) // 2 for c in out.chunks)
    linear = max(3.6e-3, tokens * 16e9 / 600e12) + 0.02e-3 * len(out.chunks)
    attention = context * KV_BYTES_PER_TOKEN / 3.5e12 + pairs * 4 * 32 * 32 * 128 / 350e12
    copies = (len(out.swaps.swap_in) + len(out.swaps.swap_out)) * block_size * KV_BYTES_PER_TOKEN / 25e9
    return max(linear + attention, copies + 1e-4)


def replay(mode: str, rate: float, v: ms.Variant, sizing: ms.Sizing, seed: int, token_factor: float) -> dict:
    plans = mt.make_workload(ms.workload_args(v, rate, seed))
    clock = [0.0]
    cache = CacheManager(sizing.num_gpu_blocks, sizing.block_size, mode,
                         num_cpu_blocks=sizing.num_cpu_blocks if mode == "pensieve" else 0,
                         cost_model=CostModel.analytic(LLAMA3_8B, sizing.block_size, 8192), clock=lambda: clock[0])
    sched = Scheduler(cache, 2048, 256)
    ids = itertools.count(1000)  # token ids: unique, so that only a session's own history matches
    due = [(p.arrival, n, i, 0) for n, (i, p) in enumerate(enumerate(plans))]
    heapq.heapify(due)
    order = itertools.count(len(plans))
    history: dict[int, list[int]] = {}
    sent: dict[str, tuple[int, int, float]] = {}
    counts: Counter = Counter()
    latency, ttft = [], []
    host = 0.0
    end = v.window + v.drain
    while clock[0] < end and (due or sched.has_unfinished()):
        while due and due[0][0] <= clock[0]:
            _, _, i, j = heapq.heappop(due)
            turn = plans[i].turns[j]
            prompt = history.get(i, []) + [next(ids) for _ in range(max(1, round(turn.input_tokens * token_factor)))]
            rid = f"{i}-{j}"
            session = sched.open_turn(plans[i].session_id, None, rid)
            req = Request(rid, prompt, len(prompt), SamplingParams(max_tokens=turn.output_tokens),
                          turn.output_tokens, session=session)
            req.stored_context = len(history.get(i, []))  # as the server's session store says (append mode)
            sched.add(req)
            sent[rid] = (i, j, clock[0])
        if not sched.has_unfinished():
            clock[0] = due[0][0]
            continue
        t0 = time.perf_counter()
        out = sched.schedule()
        host += time.perf_counter() - t0
        swaps = out.swaps
        decode_only = bool(out.chunks) and all(c.num_tokens == 1 and not c.recompute for c in out.chunks)
        counts.update(steps=1, preempted=len(out.preempted), swap_in_blocks=len(swaps.swap_in),
                      in_step_swap_out_blocks=len(swaps.swap_out), ahead_swap_out_blocks=len(swaps.swap_out_ahead),
                      steps_with_swap_in=bool(swaps.swap_in), steps_with_in_step_swap_out=bool(swaps.swap_out),
                      ahead_batches=bool(swaps.swap_out_ahead), steps_waiting_for_ahead_copies=bool(swaps.wait_for_batch),
                      decode_steps_eager_for_swap_in=decode_only and bool(swaps.swap_in),
                      steps_with_requests_waiting=bool(sched.waiting))
        clock[0] += step_seconds(out, sizing.block_size) if (out.chunks or swaps.swap_in or swaps.swap_out) else 1e-4
        sched.step_done()
        if swaps.ahead_batch:
            sched.copies_done(swaps.ahead_batch)  # the model's copies finish within the step
        for c in out.chunks:
            if c.recompute:
                c.request.recompute_pos += c.num_tokens
            else:
                c.request.num_computed_tokens += c.num_tokens
        for c in out.chunks:
            req = c.request
            if not c.samples:
                continue
            req.token_ids.append(next(ids))
            if req.first_token_time is None:
                req.first_token_time = clock[0]
                ttft.append(clock[0] - sent[req.request_id][2])
            if len(req.token_ids) - req.num_prompt_tokens >= req.max_tokens:
                i, j, t_sent = sent.pop(req.request_id)
                req.status = RequestStatus.FINISHED
                sched.finish(req)
                latency.append((clock[0] - t_sent) / req.max_tokens)
                history[i] = list(req.token_ids)
                if j + 1 < len(plans[i].turns):
                    heapq.heappush(due, (clock[0] + plans[i].turns[j + 1].think_time, next(order), i, j + 1))
    context = dict(cache.stats.context_tokens)
    total = sum(context.values()) or 1
    return {"mode": mode, "rate": rate, "turns_done": len(latency), "counts": dict(counts),
            "schedule_host_us_per_step": 1e6 * host / max(1, counts["steps"]),
            "context_fraction": {k: x / total for k, x in context.items()},
            "model_normalized_latency_p90": mt.percentiles(latency).get("p90", math.nan),
            "model_ttft_p90": mt.percentiles(ttft).get("p90", math.nan)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=["sharegpt", "ultrachat"], default="sharegpt")
    ap.add_argument("--modes", default="pensieve,gpu-only,none")
    ap.add_argument("--rates", type=float, nargs="*", default=[8.0, 12.0, 16.0])
    # the variant's timing and sizing are the sweep's; the token factor is the one the H200 run measured
    ap.add_argument("--token-factor", type=float, default=1.3751, help="server tokens per planned token")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results as JSON")
    args = ap.parse_args(argv)
    v = ms.VARIANTS[args.variant]
    sizing_rate = v.sizing_rate or max(v.rates)
    ref = mt.make_workload(ms.workload_args(v, sizing_rate, args.seed))
    sizing = ms.tier_sizes(ref, sizing_rate, v.tpot, 32, v.window / 2, v.window + v.drain,
                           token_factor=args.token_factor)
    print(f"tiers: {sizing.num_gpu_blocks} GPU blocks, {sizing.num_cpu_blocks} CPU blocks (sized at "
          f"{sizing_rate}/s)", flush=True)
    results = []
    for rate in args.rates:
        for mode in args.modes.split(","):
            r = replay(mode, rate, v, sizing, ms.point_seed(args.seed, rate), args.token_factor)
            results.append(r)
            c = r["counts"]
            print(f"{mode:9s} {rate:5.1f}/s: {r['turns_done']} turns, {c['steps']} steps; in-step swap-outs "
                  f"{c['in_step_swap_out_blocks']} blocks in {c['steps_with_in_step_swap_out']} steps, ahead "
                  f"{c['ahead_swap_out_blocks']} in {c['ahead_batches']} batches, swap-ins "
                  f"{c['swap_in_blocks']} in {c['steps_with_swap_in']} steps, preempted {c['preempted']}; "
                  f"schedule {r['schedule_host_us_per_step']:.0f} us/step; context "
                  + " ".join(f"{k} {100 * x:.0f}%" for k, x in r["context_fraction"].items()), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"sizing": dataclasses.asdict(sizing), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
