"""Llama 2/3, Mistral and Qwen2: one decoder, differing only in config details
(Qwen2 has biases on q/k/v; Mistral may declare a sliding window)."""
from __future__ import annotations

import torch
from torch import nn

from pensieve.kernels import silu_and_mul

from .layers import Attention, AttentionMetadata, RMSNorm, RotaryEmbedding


def rope_settings(cfg: dict) -> tuple[float, dict | None]:
    """Transformers 5 writes ``rope_parameters``; older checkpoints ``rope_theta``/``rope_scaling``."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params:
        scaling = dict(params)
        theta = float(scaling.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        if scaling.get("rope_type", "default") == "default":
            scaling = None
        return theta, scaling
    return float(cfg.get("rope_theta", 10000.0)), cfg.get("rope_scaling")


class LlamaLayer(nn.Module):
    def __init__(self, cfg: dict, layer_idx: int, qkv_bias: bool):
        super().__init__()
        hidden = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.num_kv_heads = cfg.get("num_key_value_heads") or self.num_heads
        self.head_dim = cfg.get("head_dim") or hidden // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # q, k and v (and gate, up) are fused into one matmul each; see load_weight.
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=bool(cfg.get("attention_bias", False)))
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5, layer_idx)
        inter = cfg["intermediate_size"]
        mlp_bias = bool(cfg.get("mlp_bias", False))
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=mlp_bias)
        self.down_proj = nn.Linear(inter, hidden, bias=mlp_bias)
        self.intermediate = inter
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise NotImplementedError(f"hidden_act {act!r} is not supported for this family (only silu)")

    def forward(self, x, residual, positions, cos_sin, meta: AttentionMetadata, kv_cache):
        """Returns (this layer's output, the residual stream before it): the next
        norm adds them in one fused kernel."""
        if residual is None:
            residual = x
            h, _ = self.input_layernorm(x, meta.impl)
        else:
            h, residual = self.input_layernorm(x, meta.impl, residual)
        x = self.o_proj(self.attn(self.qkv_proj(h), positions, cos_sin, meta, kv_cache))
        h, residual = self.post_attention_layernorm(x, meta.impl, residual)
        return self.down_proj(silu_and_mul(self.gate_up_proj(h), impl=meta.impl)), residual


class LlamaForCausalLM(nn.Module):
    """Decoder-only transformer over a paged KV cache; forward takes a flat token batch."""

    qkv_bias_default = False

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        hidden = cfg["hidden_size"]
        qkv_bias = bool(cfg.get("attention_bias", self.qkv_bias_default))
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], hidden)
        self.layers = nn.ModuleList(LlamaLayer(cfg, i, qkv_bias) for i in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(hidden, cfg.get("rms_norm_eps", 1e-6))
        self.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", False))
        self.lm_head = nn.Linear(hidden, cfg["vocab_size"], bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        layer = self.layers[0]
        theta, scaling = rope_settings(cfg)
        self.rotary = RotaryEmbedding(layer.head_dim, cfg.get("max_position_embeddings", 4096), theta, scaling)
        self.num_kv_heads, self.head_dim = layer.num_kv_heads, layer.head_dim

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv_caches) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        residual = None
        cos_sin = self.rotary.cos_sin
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, cos_sin, meta, kv)
        return self.norm(x, meta.impl, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    # ------------------------------------------------------------ weights
    _stacked = (  # checkpoint name piece -> (our parameter piece, shard index)
        ("q_proj", "qkv_proj", 0), ("k_proj", "qkv_proj", 1), ("v_proj", "qkv_proj", 2),
        ("gate_proj", "gate_up_proj", 0), ("up_proj", "gate_up_proj", 1),
    )

    def checkpoint_names(self) -> set[str]:
        """Names a complete checkpoint must provide (lm_head optional when tied)."""
        names = set()
        for name, _ in self.named_parameters(remove_duplicate=False):
            names.update(_to_checkpoint_names(name, self._stacked))
        if self.tie_word_embeddings:
            names.discard("lm_head.weight")
        return names

    def load_weight(self, name: str, tensor: torch.Tensor) -> bool:
        """Copy one checkpoint tensor into place. Returns False for names this model ignores."""
        name = name[len("model."):] if name.startswith("model.") else name
        if "rotary_emb.inv_freq" in name:
            return False
        if name == "lm_head.weight" and self.tie_word_embeddings:
            return False
        name = name.replace("self_attn.", "").replace("mlp.", "")
        params = dict(self.named_parameters())
        for ckpt_piece, our_piece, shard in self._stacked:
            if f".{ckpt_piece}." in name:
                target = params.get(name.replace(f".{ckpt_piece}.", f".{our_piece}."))
                if target is None:
                    return False
                layer = self.layers[int(name.split(".")[1])]
                sizes = ([layer.q_size, layer.kv_size, layer.kv_size] if our_piece == "qkv_proj"
                         else [layer.intermediate, layer.intermediate])
                start = sum(sizes[:shard])
                _copy_checked(target.data.narrow(0, start, sizes[shard]), tensor, name)
                return True
        target = params.get(name)
        if target is None:
            return False
        _copy_checked(target.data, tensor, name)
        return True


def _to_checkpoint_names(name: str, stacked) -> list[str]:
    for ckpt_piece, our_piece, _ in stacked:
        if f".{our_piece}." in name:
            return [_checkpoint_name(name.replace(f".{our_piece}.", f".{p}."))
                    for p, o, _ in stacked if o == our_piece]
    return [_checkpoint_name(name)]


def _checkpoint_name(name: str) -> str:
    for piece in ("q_proj", "k_proj", "v_proj", "o_proj"):
        name = name.replace(f".{piece}.", f".self_attn.{piece}.")
    for piece in ("gate_proj", "up_proj", "down_proj"):
        name = name.replace(f".{piece}.", f".mlp.{piece}.")
    return name if name.startswith("lm_head") else "model." + name


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        from ..errors import CheckpointError
        raise CheckpointError(f"tensor {name!r} has shape {tuple(src.shape)}, the config implies {tuple(dst.shape)}")
    dst.copy_(src)


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias_default = True

    def __init__(self, cfg: dict):
        cfg = dict(cfg)
        cfg.setdefault("attention_bias", True)
        super().__init__(cfg)
        # Qwen2's o_proj has no bias even though q/k/v do.
        for layer in self.layers:
            if layer.o_proj.bias is not None:
                layer.o_proj = nn.Linear(layer.q_size, cfg["hidden_size"], bias=False)


class MistralForCausalLM(LlamaForCausalLM):
    pass
