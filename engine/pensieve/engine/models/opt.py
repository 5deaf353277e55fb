"""OPT (the paper's model family): learned positions, LayerNorm, ReLU MLP, biases."""
from __future__ import annotations

import torch
from torch import nn

from ..parallel import SINGLE, TensorParallel
from .layers import Attention, AttentionMetadata, column_linear, lm_head, row_linear, vocab_embedding
from .llama import _copy_checked, shard_of

POSITION_OFFSET = 2  # OPT's learned position table starts at index 2


class OPTAttention(nn.Module):
    """q, k, v column-parallel (this rank's heads), out_proj row-parallel (bias added once)."""

    def __init__(self, hidden: int, num_heads: int, bias: bool, layer_idx: int, tp: TensorParallel = SINGLE):
        super().__init__()
        head_dim = hidden // num_heads
        local_heads = tp.split(num_heads, "attention heads (num_attention_heads)")
        self.q_proj = column_linear(hidden, [hidden], bias, tp)
        self.k_proj = column_linear(hidden, [hidden], bias, tp)
        self.v_proj = column_linear(hidden, [hidden], bias, tp)
        self.out_proj = row_linear(hidden, hidden, bias, tp)
        self.attn = Attention(local_heads, local_heads, head_dim, head_dim ** -0.5, layer_idx)

    def forward(self, h, positions, meta: AttentionMetadata, kv_cache):
        qkv = torch.cat([self.q_proj(h), self.k_proj(h), self.v_proj(h)], dim=-1)
        return self.out_proj(self.attn(qkv, positions, None, meta, kv_cache))


class OPTLayer(nn.Module):
    def __init__(self, cfg: dict, layer_idx: int, tp: TensorParallel = SINGLE):
        super().__init__()
        hidden = cfg["hidden_size"]
        self.head_dim = hidden // cfg["num_attention_heads"]
        self.num_heads = tp.split(cfg["num_attention_heads"], "attention heads (num_attention_heads)")
        bias = bool(cfg.get("enable_bias", True))
        affine = bool(cfg.get("layer_norm_elementwise_affine", True))
        self.self_attn = OPTAttention(hidden, cfg["num_attention_heads"], bias, layer_idx, tp)
        self.self_attn_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.final_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.fc1 = column_linear(hidden, [cfg["ffn_dim"]], bias, tp)
        self.fc2 = row_linear(cfg["ffn_dim"], hidden, bias, tp)
        self.pre_norm = bool(cfg.get("do_layer_norm_before", True))
        act = cfg.get("activation_function", "relu")
        if act != "relu":
            raise NotImplementedError(f"OPT activation {act!r} is not supported (only relu)")

    def forward(self, x, positions, meta: AttentionMetadata, kv_cache):
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        x = x + self.self_attn(h, positions, meta, kv_cache)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        x = x + self.fc2(torch.relu(self.fc1(h)))
        if not self.pre_norm:
            x = self.final_layer_norm(x)
        return x


class OPTForCausalLM(nn.Module):
    """With tensor parallelism: vocabulary-parallel token embedding and LM head; the
    learned positions, layer norms and projections in/out are replicated (small)."""

    def __init__(self, cfg: dict, tp: TensorParallel = SINGLE):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        hidden = cfg["hidden_size"]
        proj = cfg.get("word_embed_proj_dim") or hidden
        self.embed_tokens = vocab_embedding(cfg["vocab_size"], proj, tp)
        self.embed_positions = nn.Embedding(cfg["max_position_embeddings"] + POSITION_OFFSET, hidden)
        self.project_in = nn.Linear(proj, hidden, bias=False) if proj != hidden else None
        self.project_out = nn.Linear(hidden, proj, bias=False) if proj != hidden else None
        self.layers = nn.ModuleList(OPTLayer(cfg, i, tp) for i in range(cfg["num_hidden_layers"]))
        keep_final = cfg.get("do_layer_norm_before", True) and not cfg.get("_remove_final_layer_norm", False)
        affine = bool(cfg.get("layer_norm_elementwise_affine", True))
        self.final_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine) if keep_final else None
        self.lm_head = lm_head(proj, cfg["vocab_size"], tp)
        self.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", True))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.num_heads = self.num_kv_heads = self.layers[0].num_heads  # this rank's
        self.head_dim = self.layers[0].head_dim

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv_caches) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + POSITION_OFFSET)
        for layer, kv in zip(self.layers, kv_caches):
            x = layer(x, positions, meta, kv)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def checkpoint_names(self) -> set[str]:
        names = {"model.decoder." + n for n, _ in self.named_parameters(remove_duplicate=False) if not n.startswith("lm_head")}
        if not self.tie_word_embeddings:
            names.add("lm_head.weight")
        return names

    def load_weight(self, name: str, tensor: torch.Tensor) -> bool:
        # facebook/opt-* checkpoints spell names with or without the "model." prefix.
        for prefix in ("model.decoder.", "decoder."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        if name == "lm_head.weight" and self.tie_word_embeddings:
            return False
        target = dict(self.named_parameters()).get(name)
        if target is None:
            return False
        _copy_checked(target.data, shard_of(target, tensor, name), name)
        return True
