"""Loading Hugging Face checkpoint folders: config.json, (sharded) safetensors, tokenizer.

Every failure names the file and what is wrong with it.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import CheckpointError
from .gguf_checkpoint import GGUFFile, converted_dir, find_gguf, iter_gguf_tensors
from .models import MODEL_REGISTRY
from .parallel import SINGLE, TensorParallel

log = logging.getLogger("pensieve.engine")

_REQUIRED_KEYS = {
    "default": ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"),
    "LlamaForCausalLM": ("intermediate_size",),
    "MistralForCausalLM": ("intermediate_size",),
    "Qwen2ForCausalLM": ("intermediate_size",),
    "OPTForCausalLM": ("ffn_dim", "max_position_embeddings"),
}


def read_config(model_dir: str | os.PathLike) -> dict:
    """Read and check config.json; returns the raw dict with ``architecture`` added.
    For a GGUF checkpoint, the config converted from its metadata (cached)."""
    folder = metadata_dir(model_dir)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a checkpoint folder needs config.json)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in MODEL_REGISTRY), None)
    if arch is None:
        raise CheckpointError(f"{path}: architectures {archs!r} not supported; supported: {sorted(MODEL_REGISTRY)}")
    missing = [k for k in _REQUIRED_KEYS["default"] + _REQUIRED_KEYS.get(arch, ()) if k not in cfg]
    if missing:
        raise CheckpointError(f"{path}: missing required keys {missing}")
    cfg["architecture"] = arch
    return cfg


def metadata_dir(model: str | os.PathLike) -> Path:
    """The folder holding config.json and the tokenizer files: ``model`` itself, or for a
    GGUF file (or a folder holding one) the folder converted from its metadata."""
    gguf = find_gguf(model)
    return converted_dir(gguf) if gguf is not None else Path(model)


def checkpoint_dtype(cfg: dict) -> torch.dtype | None:
    name = cfg.get("torch_dtype") or cfg.get("dtype")
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(name)


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(cfg: dict, device: torch.device, dtype: torch.dtype,
                tp: TensorParallel = SINGLE) -> torch.nn.Module:
    cls = MODEL_REGISTRY[cfg["architecture"]]
    with torch.device(device), _default_dtype(dtype):
        return cls(cfg, tp).eval()


def load_model(model_dir: str, cfg: dict, device: torch.device, dtype: torch.dtype,
               load_format: str = "auto", seed: int = 0, tp: TensorParallel = SINGLE) -> torch.nn.Module:
    """Build the model on ``device`` and fill its weights (from the folder, or random for 'dummy').
    With tensor parallelism each rank reads the full tensors and keeps its shard."""
    start = time.perf_counter()
    model = build_model(cfg, device, dtype, tp)
    if load_format == "dummy":
        _fill_dummy(model, seed)
        log.info("dummy weights for %s (%.1fM parameters) in %.1fs", cfg["architecture"],
                 sum(p.numel() for p in model.parameters()) / 1e6, time.perf_counter() - start)
        return model
    expected = model.checkpoint_names()
    gguf = find_gguf(model_dir)
    if gguf is not None:
        loaded, files = _load_gguf(model, gguf, cfg, device, dtype), [gguf]
    else:
        files = safetensors_files(model_dir)
        loaded = _load_safetensors(model, files, len(expected), device, dtype)
    missing = sorted(expected - loaded)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{model_dir}: checkpoint lacks tensors {missing[:5]}{more}")
    log.info("loaded %d tensors from %d file(s) in %.1fs", len(loaded), len(files), time.perf_counter() - start)
    return model


def _load_safetensors(model, files: list[Path], num_expected: int, device, dtype) -> set[str]:
    from safetensors import safe_open

    loaded: set[str] = set()
    for i, file in enumerate(files, 1):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                names = list(f.keys())
                for name in names:
                    tensor = f.get_tensor(name)
                    if model.load_weight(name, tensor.to(device=device, dtype=dtype)):
                        loaded.add(_canonical(name))
        except CheckpointError as e:
            raise CheckpointError(f"{file}: {e}") from None
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise CheckpointError(f"{file}: cannot read safetensors ({type(e).__name__}: {e})") from None
        _progress(f"loading weights: {i}/{len(files)} files, {len(loaded)}/{num_expected} tensors", i == len(files))
    return loaded


def _load_gguf(model, path: Path, cfg: dict, device, dtype) -> set[str]:
    """Dequantize each GGUF tensor to ``dtype`` on ``device`` and copy it into place."""
    f = GGUFFile.open(path)
    loaded: set[str] = set()
    total = len(f.reader.tensors)
    for i, (name, tensor) in enumerate(iter_gguf_tensors(f, cfg), 1):
        try:
            if model.load_weight(name, tensor.to(device=device, dtype=dtype)):
                loaded.add(name)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        if i % 16 == 0 or i == total:
            _progress(f"dequantizing weights: {i}/{total} tensors", i == total)
    return loaded


def _canonical(name: str) -> str:
    if name.startswith("decoder."):
        return "model." + name
    return name


def safetensors_files(model_dir: str) -> list[Path]:
    folder = Path(model_dir)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        files = [folder / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in {index.name} but missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        hint = " (found PyTorch .bin weights: convert them to safetensors)" if list(folder.glob("*.bin")) else ""
        raise CheckpointError(f"{folder}: no *.safetensors weight files{hint}; use --load-format dummy for random weights")
    return files


def _fill_dummy(model: torch.nn.Module, seed: int) -> None:
    """Random weights, one parameter at a time. A sharded parameter is drawn at its full
    (size-1) shape and cut to this rank's shard, so every tensor-parallel size sees the
    same model (the generator's sequence does not depend on the size)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and ("norm" in name):
            p.data.fill_(1.0)
        elif getattr(p, "tp_take", None) is None:
            p.data.normal_(0.0, 0.02, generator=gen)
        else:
            full = torch.empty(p.tp_full_shape, dtype=p.dtype, device=p.device).normal_(0.0, 0.02, generator=gen)
            p.data.copy_(p.tp_take(full))
            del full


def _progress(text: str, done: bool) -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r" + text + ("\n" if done else ""))
        sys.stderr.flush()
    elif done:
        log.info(text)


def load_tokenizer(model_dir: str):
    """The checkpoint's tokenizer (transformers' fast tokenizer), with a clear error if absent."""
    folder = metadata_dir(model_dir)
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise CheckpointError(f"{folder}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise CheckpointError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
