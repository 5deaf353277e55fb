"""Parity and batching on a CUDA device in bfloat16 (skipped without one).

Tolerance: bf16 keeps 8 significant bits, so two implementations that sum in a
different order differ by a few bf16 ulps per layer. We compare our bf16
logits with transformers' float32 logits on the same bf16 weights: the
relative L2 error must stay under 3e-2 (a few ulps of 2^-8 accumulated over two
layers). Greedy tokens must agree until the first step whose top-two logits
(in float32) are closer than 0.1: a near-tie, where bf16 rounding may legitimately pick either."""
from __future__ import annotations

import pytest
import torch

from engine_helpers import assert_greedy_until_near_tie, prefill_logits

from pensieve.engine import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NEAR_TIE = 0.1


def _gpu_engine(make_engine, family, **kw):
    return make_engine(family, device="cuda", dtype="bfloat16", **kw)


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).float().cuda().eval()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "opt"])
def test_bf16_logits_and_greedy_tokens(make_engine, tiny_checkpoint, family):
    engine = _gpu_engine(make_engine, family)
    prompt = list(range(5, 80))
    ours = prefill_logits(engine, prompt)
    hf = _hf(tiny_checkpoint(family))
    with torch.no_grad():
        ref = hf(torch.tensor([prompt], device="cuda")).logits[0].float()
    rel = (ours - ref).norm() / ref.norm()
    assert rel < 3e-2, float(rel)
    tokens = engine.generate([prompt], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
    assert_greedy_until_near_tie(hf, prompt, tokens, NEAR_TIE)


def test_bf16_ragged_batch_equals_solo(make_engine):
    engine = _gpu_engine(make_engine, "llama", max_num_batched_tokens=40)
    prompts = [list(range(7, 7 + n)) for n in (1, 5, 33, 64, 90)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    solo = [engine.generate([p], params)[0] for p in prompts]
    assert engine.generate(prompts, params) == solo


def test_sampler_never_makes_the_host_wait():
    """Temperature, top-k, top-p and seeded rows go to the device through pinned staging, without
    a synchronizing call, and draw the tokens of the plain sampler."""
    from pensieve.engine.pinned import PinnedPair
    from pensieve.engine.sampling import Sampler

    logits = torch.randn(6, 1000, device="cuda")
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_k=5, seed=1),
              SamplingParams(temperature=1.2, top_p=0.5), SamplingParams(temperature=0.7, top_k=50, top_p=0.9),
              SamplingParams(temperature=0), SamplingParams(temperature=1.0)]
    seeds, positions = [0, 1, 2, 3, 4, 5], [3, 1, 4, 1, 5, 9]
    staged = Sampler(staging=(PinnedPair(24, torch.int64, pin=True), PinnedPair(12, torch.float32, pin=True)))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = staged.sample(logits, params, seeds, positions)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert tokens.tolist() == Sampler()(logits, params, seeds, positions)


@pytest.mark.parametrize("swap_impl", ["kernel", "dma"])
def test_bf16_tiers_equal_stateless(make_engine, swap_impl):
    """Swap-out, swap-in (copy stream, per-layer events) and recompute on the GPU keep tokens."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_tiers import run_interleaved

    engine = _gpu_engine(make_engine, "llama", num_gpu_blocks=16, num_cpu_blocks=12, max_num_batched_tokens=48,
                         swap_impl=swap_impl)
    assert engine.runner.cpu_buffer.pinned
    oracle = _gpu_engine(make_engine, "llama", cache_mode="none", num_gpu_blocks=256)
    assert run_interleaved(engine, oracle, seed=7, n_sessions=6, n_turns=4) == 24
    assert engine.cache.stats.context_tokens["cpu"] > 0 and engine.cache.stats.context_tokens["recomputed"] > 0
    assert engine.cache.stats.swap_out_in_step_blocks <= engine.cache.stats.swap_out_blocks


def test_decode_graphs_equal_eager(make_engine):
    """Decode steps replayed from CUDA graphs (padded batches, a fixed split count) give the
    tokens of eager steps. float32, so that the two summation orders cannot flip a token."""
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = [list(range(3 + i, 40 + 7 * i)) for i in range(5)]  # 5 sequences: padded to a graph of 8
    graphs = make_engine("llama", device="cuda", dtype="float32", max_num_seqs=16)
    eager = make_engine("llama", device="cuda", dtype="float32", max_num_seqs=16, cuda_graphs=False)
    assert graphs.runner.graphs is not None and 8 in graphs.runner.graphs.graphs
    assert graphs.generate(prompts, params) == eager.generate(prompts, params)
    # pensieve_engine_steps_total: the graph engine's decode steps replayed graphs, the other's ran eagerly
    assert graphs.stats.step_paths.get("graph", 0) >= 20 and not graphs.stats.step_paths.get("eager_for_copies")
    assert eager.stats.step_paths.get("graph", 0) == 0 and eager.stats.step_paths["eager"] >= 20


@pytest.mark.parametrize("swap_impl", ["kernel", "dma"])
def test_swap_round_trip_is_bit_exact_under_concurrent_compute(make_engine, swap_impl):
    """Blocks swapped out to the CPU tier and back, while the compute stream is busy,
    equal the originals bit for bit (a race between copies and compute would show here)."""
    from pensieve.engine.cache_manager import SwapPlan
    from pensieve.engine.scheduler import SchedulerOutput

    engine = _gpu_engine(make_engine, "llama", num_gpu_blocks=64, num_cpu_blocks=32, swap_impl=swap_impl)
    runner = engine.runner
    gen = torch.Generator(device="cuda").manual_seed(5)
    for k, v in runner.kv_caches:
        k.copy_(torch.randn(k.shape, generator=gen, device="cuda").to(k.dtype))
        v.copy_(torch.randn(v.shape, generator=gen, device="cuda").to(v.dtype))
    src = list(range(2, 26))  # 24 blocks out to the CPU tier ...
    before = [(k[src].clone(), v[src].clone()) for k, v in runner.kv_caches]
    busy = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        busy @ busy  # compute in flight while the copies run
    runner.execute(SchedulerOutput(swaps=SwapPlan(swap_out=[(g, i) for i, g in enumerate(src)])))
    for _ in range(3):
        busy @ busy
    dst = list(range(30, 30 + len(src)))  # ... and back into 24 other blocks of the 64
    runner.execute(SchedulerOutput(swaps=SwapPlan(swap_in=[(i, g) for i, g in enumerate(dst)])))
    torch.cuda.synchronize()
    for (k, v), (k0, v0) in zip(runner.kv_caches, before):
        assert torch.equal(k[dst].view(torch.int16), k0.view(torch.int16))
        assert torch.equal(v[dst].view(torch.int16), v0.view(torch.int16))


def test_bf16_smollm2_shape(tmp_path):
    """SmolLM2-135M's shape (30 layers, hidden 576, 9 query / 3 KV heads: a GQA group of 3, head
    dim 64, tied embeddings) with random weights: bf16 logits against transformers' float32 on the
    same weights, and greedy decoding (decode graphs) equal to transformers' until a near-tie."""
    from pensieve.engine import EngineConfig, LLMEngine
    from pensieve.engine.tiny import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "smollm2-shape", "llama", hidden_size=576, num_attention_heads=9,
                                num_key_value_heads=3, head_dim=64, intermediate_size=1536, num_hidden_layers=30,
                                tie_word_embeddings=True, dtype="bfloat16")
    engine = LLMEngine(EngineConfig(model=str(ckpt), device="cuda", dtype="bfloat16", num_gpu_blocks=256,
                                    num_cpu_blocks=16, block_size=16, max_num_seqs=16))
    prompt = list(range(5, 90))
    ours = prefill_logits(engine, prompt)
    ref = _hf(str(ckpt))
    with torch.no_grad():
        want = ref(torch.tensor([prompt], device="cuda")).logits[0].float()
    assert float((ours - want).norm() / want.norm()) < 3e-2
    tokens = engine.generate([prompt, prompt[:40]], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    assert_greedy_until_near_tie(ref, prompt, tokens, NEAR_TIE)
