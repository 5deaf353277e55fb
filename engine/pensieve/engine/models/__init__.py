"""Model registry: Hugging Face ``architectures`` name -> our implementation."""
from __future__ import annotations

from .layers import AttentionMetadata
from .llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from .opt import OPTForCausalLM

MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
}

__all__ = ["MODEL_REGISTRY", "AttentionMetadata"]
