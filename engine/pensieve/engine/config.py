"""The engine's configuration: one dataclass, which also generates the CLI flags.

Every field becomes a ``--flag-name`` option and is also read from the
environment as ``PENSIEVE_FLAG_NAME`` (the operator configures pods that way).
Precedence: command line, then environment, then the default here (the one
loader, ``pensieve.common.flags``). Byte sizes are Kubernetes quantities
(``pensieve.common.quantity``).
"""
from __future__ import annotations

import argparse
import typing
from dataclasses import dataclass, field

from pensieve.common import flags
from pensieve.common.quantity import QuantityError, parse_bytes

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
    model: str = opt("", "Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer files), or a GGUF file "
                         "(or a folder holding one)")
    served_model_name: str | None = opt(None, "name clients use in the 'model' field (default: the folder's name)")
    load_format: str = opt("auto", "'dummy' builds random weights of the checkpoint's shape without reading them", ("auto", "dummy"))
    dtype: str = opt("auto", "weights and activations dtype; auto: float32 on CPU, the checkpoint's half type on CUDA",
                     ("auto", "float32", "float16", "bfloat16"))
    device: str = opt("auto", "auto: cuda when available, else cpu", ("auto", "cuda", "cpu"))
    seed: int = opt(0, "seed for dummy weights and for requests that give no seed")
    block_size: int = opt(32, "tokens per KV-cache block (a 'chunk' in the paper)")
    gpu_memory_utilization: float = opt(0.90, "fraction of GPU memory the engine may use (weights, activations, KV cache)")
    cpu_cache_bytes: str = opt("auto", "CPU-tier size in bytes, a Kubernetes quantity (64Gi, 8G), "
                                          "or 'auto': the cgroup limit (or host memory less 5%) minus 4 GiB of engine "
                                          "overhead and, on a CPU device, the weights and the device tier")
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
    swap_ahead_programs: int = opt(4, "programs of the swap kernel for ahead-of-time swap-outs (each holds part of "
                                      "an SM while it waits on the host link; compute needs the SMs)")
    async_scheduling: str = opt("auto", "schedule and prepare the next step while the device runs this one "
                                        "(sampled tokens stay on the device); auto: on with CUDA",
                                ("auto", "on", "off"))
    tensor_parallel_size: int = opt(1, "shard the model and both cache tiers across this many processes, one per "
                                       "GPU (NCCL; gloo on CPU), by attention and KV head; must divide the model's "
                                       "attention heads, KV heads and MLP width. Above 1, CUDA graphs are off")
    cuda_graphs: bool = opt(True, "replay decode steps from CUDA graphs captured at start-up (CUDA only)")
    session_idle_timeout: float = opt(3600.0, "seconds after which an idle session is forgotten: its KV cache "
                                              "here and its record in the session store; 0 keeps sessions "
                                              "until they are deleted")

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise InvalidRequestError(f"block_size must be a positive power of two, got {self.block_size}", "block_size")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise InvalidRequestError("gpu_memory_utilization must be in (0, 1]", "gpu_memory_utilization")
        if self.swap_ahead_programs < 1:
            raise InvalidRequestError("swap_ahead_programs must be >= 1", "swap_ahead_programs")
        if self.tensor_parallel_size < 1:
            raise InvalidRequestError("tensor_parallel_size must be >= 1", "tensor_parallel_size")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise InvalidRequestError("max_num_batched_tokens and max_num_seqs must be >= 1", "max_num_batched_tokens")
        for name in ("num_gpu_blocks", "num_cpu_blocks", "max_model_len"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidRequestError(f"{name} must be >= 0", name)
        self.cpu_cache_bytes_value()  # validates

    def cpu_cache_bytes_value(self) -> int | None:
        """``--cpu-cache-bytes`` in bytes (the shared Kubernetes-quantity parser), None for auto."""
        if self.cpu_cache_bytes == "auto":
            return None
        try:
            return parse_bytes(self.cpu_cache_bytes)
        except QuantityError as e:
            raise InvalidRequestError(f"--cpu-cache-bytes: {e}", "cpu_cache_bytes") from None


# ---------------------------------------------------------------- CLI and env (pensieve.common.flags)


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--flag`` per field of ``cls``, also read from ``PENSIEVE_<FLAG>``."""
    flags.add_flags(parser, cls, ENV_PREFIX)


def dataclass_from_args(cls, args: argparse.Namespace, environ: typing.Mapping[str, str] | None = None):
    """Build ``cls``: command line, then ``PENSIEVE_*`` environment, then defaults."""
    try:
        return flags.load(cls, ENV_PREFIX, args, environ)
    except flags.ConfigError as e:
        raise InvalidRequestError(str(e), e.field) from None
