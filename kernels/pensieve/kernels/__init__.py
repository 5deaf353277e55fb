"""Pensieve kernels: paged attention over a non-contiguous KV cache, KV write, block copy.

Each op has a torch reference (``*_ref``) that is the test oracle and the CPU
implementation. The dispatching entry points pick the Triton kernel on CUDA
tensors and the reference elsewhere; ``impl="ref"`` or ``impl="triton"`` forces
one. This package imports nothing from the engine.
"""
from .reference import copy_blocks_ref, paged_attention_ref, write_kv_ref
from .dispatch import copy_blocks, paged_attention, write_kv

__all__ = [
    "paged_attention",
    "paged_attention_ref",
    "write_kv",
    "write_kv_ref",
    "copy_blocks",
    "copy_blocks_ref",
]
