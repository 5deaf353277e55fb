"""Unified batching: any mix of prefills and decodes gives each request its solo tokens."""
from __future__ import annotations

import random

import pytest

from pensieve.engine import SamplingParams

from engine_helpers import run_to_end

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _solo(make_engine, prompts, **kw):
    engine = make_engine("llama", **kw)
    return [engine.generate([p], GREEDY)[0] for p in prompts]


def _prompts(seed, lengths):
    rng = random.Random(seed)
    return [[rng.randrange(8, 500) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("budget", [2048, 40, 7])
def test_ragged_batch_equals_solo(make_engine, budget):
    # Lengths: single token, below/above the budget, one longer than the whole budget (chunked prefill).
    prompts = _prompts(0, [1, 5, 33, 64, 90])
    solo = _solo(make_engine, prompts)
    engine = make_engine("llama", max_num_batched_tokens=budget)
    outs = engine.generate(prompts, GREEDY)
    assert outs == solo


def test_requests_join_while_others_decode(make_engine):
    prompts = _prompts(1, [20, 3, 50, 11])
    solo = _solo(make_engine, prompts)
    engine = make_engine("llama", max_num_batched_tokens=24)
    ids = [engine.add_request(prompts[0], GREEDY)]
    results: dict[str, list[int]] = {}
    step = 0
    mixed_steps = 0
    while engine.has_unfinished() or len(ids) < len(prompts):
        if step in (2, 3, 5) and len(ids) < len(prompts):
            ids.append(engine.add_request(prompts[len(ids)], GREEDY))
        sched_before = len(engine.scheduler.running)
        for o in engine.step():
            results.setdefault(o.request_id, []).extend(o.new_token_ids)
        prefilling = [r for r in engine.scheduler.running if r.num_output_tokens == 0]
        if sched_before and prefilling:
            mixed_steps += 1
        step += 1
    assert [results[i] for i in ids] == solo
    assert mixed_steps > 0, "no step mixed decodes with a prefill"


def test_chunked_prefill_splits_long_prompt(make_engine):
    engine = make_engine("llama", max_num_batched_tokens=16)
    rid = engine.add_request(_prompts(2, [50])[0], GREEDY)
    sizes = []
    while engine.has_unfinished():
        engine.step()
        sizes.append(engine.last_step.tokens)
    assert sizes[:4] == [16, 16, 16, 2] and all(s == 1 for s in sizes[4:])
    assert rid not in engine.requests


def test_preemption_under_block_pressure_keeps_outputs(make_engine):
    prompts = _prompts(3, [30, 30, 30, 30])
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    solo_engine = make_engine("llama")
    solo = [solo_engine.generate([p], params)[0] for p in prompts]
    # 4 requests x 50 tokens need 16 blocks of 16 tokens; give 9 so decoding must preempt.
    engine = make_engine("llama", num_gpu_blocks=9)
    assert engine.generate(prompts, params) == solo
    assert engine.stats.preemptions > 0


def test_seeded_sampling_independent_of_batch(make_engine):
    prompts = _prompts(4, [12, 25, 7])
    params = [SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, top_k=50, seed=100 + i, ignore_eos=True)
              for i in range(3)]
    engine = make_engine("llama")
    solo = [engine.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    assert engine.generate(prompts, params) == solo
    assert len({tuple(s) for s in solo}) == 3
