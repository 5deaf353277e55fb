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
    finally:
        two.close()
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(common["model"], dtype=torch.bfloat16).float().cuda().eval()
    assert_greedy_until_near_tie(hf, PROMPT, tokens, NEAR_TIE)
    assert_greedy_until_near_tie(hf, PROMPT, one_tokens, NEAR_TIE)
