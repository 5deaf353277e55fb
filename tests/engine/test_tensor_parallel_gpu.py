"""Tensor parallelism on 2 CUDA devices (NCCL), bf16: the same model as one device.

Skipped with fewer than 2 CUDA devices. Tolerances as in test_gpu.py: bf16 sums
in a different order (the all-reduce adds the two ranks' partial products) differ
by a few bf16 ulps per layer, so logits must agree within a relative L2 error of
3e-2 and greedy tokens until the first near-tie (top two logits closer than 0.1).
"""
from __future__ import annotations

import pytest
import torch

from engine_helpers import assert_greedy_until_near_tie, prefill_logits

from pensieve.engine import EngineConfig, LLMEngine, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]

NEAR_TIE = 0.1
PROMPT = list(range(5, 80))



@pytest.mark.parametrize("family", ["llama", "opt"])
def test_bf16_tensor_parallel_matches_one_gpu(tiny_checkpoint, family):
    common = dict(model=tiny_checkpoint(family), device="cuda", dtype="bfloat16", num_gpu_blocks=128,
                  num_cpu_blocks=32, block_size=16)
    one = LLMEngine(EngineConfig(**common))
    ref = prefill_logits(one, PROMPT)
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    one_tokens = one.generate([PROMPT], params)[0]
    del one
    torch.cuda.empty_cache()
    two = LLMEngine(EngineConfig(**common, tensor_parallel_size=2))
    try:
        assert two.runner.device == torch.device("cuda", 0)
        ours = prefill_logits(two, PROMPT)
        rel = (ours - ref).norm() / ref.norm()
        assert rel < 3e-2, float(rel)
        tokens = two.generate([PROMPT], params)[0]
        # every rank captured the decode graphs, all-reduces included: decode steps replay them
        assert two.runner.graphs is not None and two.stats.step_paths.get("graph", 0) >= 25, two.stats.step_paths
    finally:
        two.close()
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(common["model"], dtype=torch.bfloat16).float().cuda().eval()
    assert_greedy_until_near_tie(hf, PROMPT, tokens, NEAR_TIE)
    assert_greedy_until_near_tie(hf, PROMPT, one_tokens, NEAR_TIE)


def test_decode_graphs_and_tier_pressure_match_one_gpu(tiny_checkpoint):
    """float32 (no bf16 near-ties): at size 2, decode graphs (collectives captured inside) and a
    multi-turn run under tier pressure (swap-outs before graph replays, swap-ins waited for layer
    by layer on each rank's shard, recompute) give the tokens of one GPU's stateless engine."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_tiers import run_interleaved

    common = dict(model=tiny_checkpoint("llama"), device="cuda", dtype="float32", block_size=16)
    oracle = LLMEngine(EngineConfig(**common, cache_mode="none", num_gpu_blocks=256))
    two = LLMEngine(EngineConfig(**common, tensor_parallel_size=2, num_gpu_blocks=16, num_cpu_blocks=12,
                                 max_num_batched_tokens=48, max_num_seqs=16))
    try:
        assert two.runner.graphs is not None
        assert run_interleaved(two, oracle, seed=7, n_sessions=6, n_turns=4) == 24
        stats = two.cache.stats
        assert stats.swap_out_blocks > 0 and stats.swap_in_blocks > 0, stats
        assert stats.context_tokens["recomputed"] > 0 and stats.context_tokens["cpu"] > 0, stats.context_tokens
        assert two.stats.step_paths.get("graph", 0) > 0, two.stats.step_paths
    finally:
        two.close()
