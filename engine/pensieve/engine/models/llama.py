"""Llama 2/3, Mistral and Qwen2: one decoder, differing only in config details
(Qwen2 has biases on q/k/v; Mistral may declare a sliding window)."""
from __future__ import annotations

import torch
from torch import nn

from pensieve.kernels import silu_and_mul

from ..parallel import SINGLE, TensorParallel
from .layers import (Attention, AttentionMetadata, RMSNorm, RotaryEmbedding, column_linear, lm_head, row_linear,
                     vocab_embedding)


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
    """One decoder layer; with tensor parallelism it holds this rank's heads (q and KV
    heads split evenly) and 1/N of the MLP's width."""

    def __init__(self, cfg: dict, layer_idx: int, qkv_bias: bool, tp: TensorParallel = SINGLE):
        super().__init__()
        hidden = cfg["hidden_size"]
        total_heads = cfg["num_attention_heads"]
        total_kv = cfg.get("num_key_value_heads") or total_heads
        self.head_dim = cfg.get("head_dim") or hidden // total_heads
        self.num_heads = tp.split(total_heads, "attention heads (num_attention_heads)")
        self.num_kv_heads = tp.split(total_kv, "KV heads (num_key_value_heads)")
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # q, k and v (and gate, up) are fused into one matmul each; see load_weight.
        full_q, full_kv = total_heads * self.head_dim, total_kv * self.head_dim
        self.qkv_proj = column_linear(hidden, [full_q, full_kv, full_kv], qkv_bias, tp)
        self.o_proj = row_linear(full_q, hidden, bool(cfg.get("attention_bias", False)), tp)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5, layer_idx)
        inter = cfg["intermediate_size"]
        mlp_bias = bool(cfg.get("mlp_bias", False))
        self.gate_up_proj = column_linear(hidden, [inter, inter], mlp_bias, tp)
        self.down_proj = row_linear(inter, hidden, mlp_bias, tp)
        self.intermediate = tp.split(inter, "MLP width (intermediate_size)")
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

    def __init__(self, cfg: dict, tp: TensorParallel = SINGLE):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        hidden = cfg["hidden_size"]
        qkv_bias = bool(cfg.get("attention_bias", self.qkv_bias_default))
        self.embed_tokens = vocab_embedding(cfg["vocab_size"], hidden, tp)
        self.layers = nn.ModuleList(LlamaLayer(cfg, i, qkv_bias, tp) for i in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(hidden, cfg.get("rms_norm_eps", 1e-6))
        self.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", False))
        self.lm_head = lm_head(hidden, cfg["vocab_size"], tp)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        layer = self.layers[0]
        theta, scaling = rope_settings(cfg)
        self.rotary = RotaryEmbedding(layer.head_dim, cfg.get("max_position_embeddings", 4096), theta, scaling)
        # this rank's heads (all of them at size 1)
        self.num_heads, self.num_kv_heads, self.head_dim = layer.num_heads, layer.num_kv_heads, layer.head_dim

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
                # this rank's rows of the piece (its heads / its share of the MLP width)
                _copy_checked(target.data.narrow(0, start, sizes[shard]), self.tp.narrow(tensor, 0), name)
                return True
        target = params.get(name)
        if target is None:
            return False
        _copy_checked(target.data, shard_of(target, tensor, name), name)
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


def shard_of(param: torch.Tensor, full: torch.Tensor, name: str) -> torch.Tensor:
    """This rank's part of a full checkpoint tensor for ``param`` (itself when replicated)."""
    take = getattr(param, "tp_take", None)
    if take is None:
        return full
    full_shape = param.tp_full_shape
    if tuple(full.shape) != full_shape:
        from ..errors import CheckpointError
        raise CheckpointError(f"tensor {name!r} has shape {tuple(full.shape)}, the config implies {full_shape}")
    return take(full)


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        from ..errors import CheckpointError
        raise CheckpointError(f"tensor {name!r} has shape {tuple(src.shape)}, the config implies {tuple(dst.shape)}")
    dst.copy_(src)


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias_default = True

    def __init__(self, cfg: dict, tp: TensorParallel = SINGLE):
        cfg = dict(cfg)
        cfg.setdefault("attention_bias", True)
        super().__init__(cfg, tp)
        # Qwen2's o_proj has no bias even though q/k/v do.
        for layer in self.layers:
            if layer.o_proj.bias is not None:
                layer.o_proj = row_linear(layer.q_size * tp.world_size, cfg["hidden_size"], False, tp)


class MistralForCausalLM(LlamaForCausalLM):
    pass
