"""The engine's configuration: one dataclass, which also generates the CLI flags.

Every field becomes a ``--flag-name`` option and is also read from the
environment as ``PENSIEVE_FLAG_NAME`` (the operator configures pods that way).
Precedence: command line, then environment, then the default here.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field

from .errors import InvalidRequestError

ENV_PREFIX = "PENSIEVE_"


def opt(default, help: str, choices: tuple | None = None, **kw):
    """A dataclass field that carries its CLI help (and choices) in its metadata."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class EngineConfig:
    model: str = opt("", "Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer files)")
    served_model_name: str | None = opt(None, "name clients use in the 'model' field (default: the folder's name)")
    load_format: str = opt("auto", "'dummy' builds random weights of the checkpoint's shape without reading them", ("auto", "dummy"))
    dtype: str = opt("auto", "weights and activations dtype; auto: float32 on CPU, the checkpoint's half type on CUDA",
                     ("auto", "float32", "float16", "bfloat16"))
    device: str = opt("auto", "auto: cuda when available, else cpu", ("auto", "cuda", "cpu"))
    seed: int = opt(0, "seed for dummy weights and for requests that give no seed")
    block_size: int = opt(32, "tokens per KV-cache block (a 'chunk' in the paper)")
    gpu_memory_utilization: float = opt(0.90, "fraction of GPU memory the engine may use (weights, activations, KV cache)")
    cpu_cache_bytes: str = opt("auto", "CPU-tier size in bytes, or 'auto' (cgroup limit or host memory, minus a reserve)")
    eviction: str = opt("retention", "eviction policy of the cache tiers", ("retention", "lru"))
    cache_mode: str = opt("pensieve", "pensieve: GPU+CPU tiers; gpu-only: reuse what stays on GPU (LRU); none: stateless",
                          ("pensieve", "gpu-only", "none"))
    max_num_batched_tokens: int = opt(2048, "token budget of one scheduler step (prefill chunks + decodes)")
    max_num_seqs: int = opt(256, "most requests in one step")
    max_model_len: int | None = opt(None, "longest context (prompt + output); default: the model's")
    num_gpu_blocks: int | None = opt(None, "override the GPU-tier sizing (tests and benchmarks force memory pressure with it)")
    num_cpu_blocks: int | None = opt(None, "override the CPU-tier sizing")
    attention_impl: str = opt("auto", "auto: Triton kernels on CUDA, torch reference elsewhere", ("auto", "triton", "ref"))
    swap_impl: str = opt("auto", "CPU<->GPU block copies on CUDA: kernel (one launch per layer, the GPU reads and "
                                 "writes pinned host memory directly), dma (one copy per run of adjacent blocks); "
                                 "auto: kernel", ("auto", "kernel", "dma"))
    session_idle_timeout: float = opt(3600.0, "seconds after which an idle session is forgotten: its KV cache "
                                              "here and its record in the session store; 0 keeps sessions "
                                              "until they are deleted")

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise InvalidRequestError(f"block_size must be a positive power of two, got {self.block_size}", "block_size")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise InvalidRequestError("gpu_memory_utilization must be in (0, 1]", "gpu_memory_utilization")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise InvalidRequestError("max_num_batched_tokens and max_num_seqs must be >= 1", "max_num_batched_tokens")
        for name in ("num_gpu_blocks", "num_cpu_blocks", "max_model_len"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidRequestError(f"{name} must be >= 0", name)
        if self.cpu_cache_bytes != "auto":
            parse_bytes(self.cpu_cache_bytes)  # validates


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(text: str | int) -> int:
    """'123', '64Gi', '1.5G' (Kubernetes quantity suffixes) -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip()
    num = s.rstrip("KkMmGgTtIi")
    unit = s[len(num):].lower()
    try:
        value = float(num)
    except ValueError:
        value = None
    if value is None or unit not in _UNITS or value < 0:
        raise InvalidRequestError(f"cannot read {text!r} as a byte count (examples: 8000000000, 64Gi, 1.5G)", "cpu_cache_bytes")
    return int(value * _UNITS[unit])


# ---------------------------------------------------------------- CLI and env


def _base_type(tp):
    """int | None -> (int, True); list[str] -> (list, str)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--flag`` per field of ``cls``, defaulting to the environment or the field default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, optional = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        env = ENV_PREFIX + f.name.upper()
        kwargs: dict = {"dest": f.name, "help": f.metadata.get("help", "") + f" [env {env}]"}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if typing.get_origin(tp) is list:
            kwargs.update(action="append", type=typing.get_args(tp)[0], default=None)
        elif tp is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, default=None)
        else:
            kwargs.update(type=tp, default=None)
        parser.add_argument(flag, **kwargs)


def dataclass_from_args(cls, args: argparse.Namespace, environ: typing.Mapping[str, str] | None = None):
    """Build ``cls`` from parsed args; unset flags fall back to ``PENSIEVE_*`` env, then defaults."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is None:
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                value = _from_env(hints[f.name], raw, f.name)
        if value is not None:
            values[f.name] = value
    return cls(**values)


def _from_env(hint, raw: str, name: str):
    tp, _ = _base_type(hint)
    try:
        if typing.get_origin(tp) is list:
            return [x.strip() for x in raw.split(",") if x.strip()]
        if tp is bool:
            return raw.strip().lower() in ("1", "true", "yes", "on")
        return tp(raw)
    except ValueError:
        raise InvalidRequestError(f"environment variable {ENV_PREFIX}{name.upper()}={raw!r} is not a valid {tp.__name__}", name) from None
