"""Write GGUF files from the tiny HF checkpoints, the way llama.cpp's converter lays them out
(names, metadata keys, q/k rows permuted for its rotary layout), and an independent numpy
reference of the Q4_0 / Q4_1 / Q8_0 block formats to check the loader's dequantization."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

_LAYER = {  # HF piece -> GGUF piece
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, idx, rest = hf.split(".", 3)
    piece, kind = rest.rsplit(".", 1)
    return f"blk.{idx}.{_LAYER[piece]}.{kind}"


def permute_rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's rows from (2, d/2) halves to interleaved (d/2, 2) pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_state(model_dir: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    state = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def write_gguf(model_dir: str, out: Path, qtype: str = "F32", arch: str | None = None,
               extra_tensors: dict[str, np.ndarray] | None = None, raw_tensors: dict | None = None,
               skip_keys: tuple[str, ...] = ()) -> Path:
    """A GGUF file holding the tiny checkpoint ``model_dir``; 2-D weights in ``qtype``, norms in F32."""
    import gguf

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    arch = arch or {"llama": "llama", "qwen2": "qwen2"}[cfg["model_type"]]
    w = gguf.GGUFWriter(str(out), arch)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    meta = {
        "block_count": cfg["num_hidden_layers"], "context_length": cfg["max_position_embeddings"],
        "embedding_length": cfg["hidden_size"], "feed_forward_length": cfg["intermediate_size"],
        "head_count": heads, "head_count_kv": kv, "rope_freq_base": cfg.get("rope_theta") or
        cfg.get("rope_parameters", {}).get("rope_theta", 10000.0),
        "layer_norm_rms_eps": cfg["rms_norm_eps"], "rope_dimension_count": cfg["hidden_size"] // heads,
    }
    for key, value in meta.items():
        if key not in skip_keys:
            getattr(w, f"add_{key}")(value)
    _write_tokenizer(w, model_dir)
    permuted = arch == "llama"
    for name, array in hf_state(model_dir).items():
        array = array.astype(np.float32)
        if permuted and ".q_proj." in name:
            array = permute_rotary_rows(array, heads)
        elif permuted and ".k_proj." in name:
            array = permute_rotary_rows(array, kv)
        _add(w, gguf_name(name), array, qtype if array.ndim == 2 else "F32")
    for name, array in (extra_tensors or {}).items():
        _add(w, name, array, "F32")
    for name, (raw, kind) in (raw_tensors or {}).items():
        w.add_tensor(name, raw, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _add(w, name: str, array: np.ndarray, qtype: str) -> None:
    import gguf

    t = getattr(gguf.GGMLQuantizationType, qtype)
    if qtype == "F32":
        w.add_tensor(name, array)
    elif qtype == "F16":
        w.add_tensor(name, array.astype(np.float16))
    else:
        w.add_tensor(name, gguf.quants.quantize(array, t), raw_dtype=t)


def _write_tokenizer(w, model_dir: str) -> None:
    import gguf

    tj = json.loads((Path(model_dir) / "tokenizer.json").read_text())
    vocab = dict(tj["model"]["vocab"])
    special = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    vocab.update(special)
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    gen = json.loads((Path(model_dir) / "generation_config.json").read_text())
    w.add_bos_token_id(gen["bos_token_id"])
    w.add_eos_token_id(gen["eos_token_id"])
    w.add_pad_token_id(gen["pad_token_id"])
    tc = json.loads((Path(model_dir) / "tokenizer_config.json").read_text())
    template = tc.get("chat_template")
    if template is None and (Path(model_dir) / "chat_template.jinja").is_file():
        template = (Path(model_dir) / "chat_template.jinja").read_text()
    w.add_chat_template(template)


# ------------------------------------------------ independent reference of three block formats


def reference_dequantize(raw: np.ndarray, qtype: str, cols: int) -> torch.Tensor:
    """ggml's block layouts, written from their definitions: 32 weights a block; Q8_0 = f16 scale
    + 32 int8; Q4_0 = f16 scale + 16 bytes (low nibbles are weights 0-15, high 16-31), w = d(q-8);
    Q4_1 = f16 scale, f16 min + 16 bytes, w = d q + m."""
    raw = np.ascontiguousarray(raw).view(np.uint8)
    rows = raw.shape[0]
    nb = cols // 32
    b = raw.reshape(rows, nb, -1)
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)
    if qtype == "Q8_0":
        q = b[..., 2:34].copy().view(np.int8).astype(np.float32)
        w = d * q
    elif qtype in ("Q4_0", "Q4_1"):
        start = 2 if qtype == "Q4_0" else 4
        packed = b[..., start:start + 16]
        q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.float32)
        if qtype == "Q4_0":
            w = d * (q - 8)
        else:
            m = b[..., 2:4].copy().view(np.float16).astype(np.float32)
            w = d * q + m
    else:
        raise ValueError(qtype)
    return torch.from_numpy(w.reshape(rows, cols))
