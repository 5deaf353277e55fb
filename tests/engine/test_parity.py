"""Tier 2: our model implementations against transformers' on tiny random checkpoints."""
from __future__ import annotations

import os

import pytest
import torch

from pensieve.engine import SamplingParams

from engine_helpers import FAMILIES, _hf_model, hf_greedy, prefill_logits

GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_logits_match_transformers(make_engine, tiny_checkpoint, family):
    engine = make_engine(family)
    torch.manual_seed(1)
    prompt = torch.randint(0, engine.model_config["vocab_size"], (45,)).tolist()
    logits = prefill_logits(engine, prompt)  # one chunk over the whole prompt, logits for every position
    with torch.no_grad():
        ref = _hf_model(tiny_checkpoint(family))(torch.tensor([prompt])).logits[0]
    assert logits.shape == ref.shape
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)


def test_gqa_checkpoints_are_really_gqa(make_engine):
    for family in ("llama", "qwen2"):
        cfg = make_engine(family).model_config
        assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]


@pytest.mark.parametrize("family", FAMILIES)
def test_32_greedy_tokens_identical(make_engine, tiny_checkpoint, family):
    engine = make_engine(family)
    prompt = engine.encode_chat([{"role": "user", "content": "What is a stateful cache for chat?"}])
    ours = engine.generate([prompt], GREEDY)[0]
    assert ours == hf_greedy(tiny_checkpoint(family), prompt, 32)


def test_prompt_crossing_many_blocks_with_small_block_size(make_engine, tiny_checkpoint):
    engine = make_engine("llama", block_size=4, num_gpu_blocks=64)
    prompt = list(range(3, 70))
    assert engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0] == \
        hf_greedy(tiny_checkpoint("llama"), prompt, 12)


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton on CPU needs TRITON_INTERPRET=1 (scripts/test.sh sets it)")
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_triton_kernels_in_the_engine_match_reference(make_engine, family):
    """The engine driving the Triton kernels (interpreted on CPU, compiled on GPU) gives the
    reference path's greedy tokens, across chunked prefill, decodes and sessions."""
    prompts = [list(range(5, 45)), list(range(100, 107)), [9]]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    ref = make_engine(family, attention_impl="ref", max_num_batched_tokens=16).generate(prompts, params)
    tri = make_engine(family, attention_impl="triton", max_num_batched_tokens=16)
    assert tri.runner.uses_triton
    assert tri.generate(prompts, params) == ref
