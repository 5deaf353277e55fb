"""Checkpoint folders of real model shapes for benchmarks: config.json plus a small
tokenizer, loaded with ``--load-format dummy`` (random weights, no files read).
Throughput does not depend on weight values; outputs use fixed lengths."""
from __future__ import annotations

import json
from pathlib import Path

SHAPES = {
    # Llama-3-8B: 32 layers, 32 query heads, 8 KV heads, head dim 128.
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                      torch_dtype="bfloat16", tie_word_embeddings=False, hidden_act="silu"),
    # The same with a 32k context (Llama-3.1-8B's layers without its RoPE scaling): long conversations.
    "llama3-8b-32k": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                          intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, max_position_embeddings=32768,
                          rms_norm_eps=1e-5, rope_theta=500000.0, torch_dtype="bfloat16",
                          tie_word_embeddings=False, hidden_act="silu"),
    # Llama-2-70B (the paper's tensor-parallel setting): 80 layers, 64 query heads, 8 KV heads, head dim 128.
    "llama2-70b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=8192,
                       intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                       torch_dtype="float16", tie_word_embeddings=False, hidden_act="silu"),
    # A scaled-down shape with the same structure, to check the scripts on a CPU.
    "llama-mini": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=256, intermediate_size=512,
                       num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, vocab_size=512,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                       torch_dtype="bfloat16", tie_word_embeddings=False, hidden_act="silu"),
}


def shape_checkpoint(name: str, root: str | Path, layers: int = 0) -> str:
    """The shape's checkpoint folder under ``root`` (config and a small tokenizer; weights are
    dummy); ``layers``: the same shape cut to that many layers (0: all)."""
    from pensieve.engine.tiny import train_tokenizer

    folder = Path(root) / (f"{name}-{layers}l" if layers else name)
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        train_tokenizer(folder)
        config = {**SHAPES[name], "num_hidden_layers": layers} if layers else SHAPES[name]
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return str(folder)


def sync(engine) -> None:
    """Wait for the engine's device (timings end here)."""
    import torch

    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
