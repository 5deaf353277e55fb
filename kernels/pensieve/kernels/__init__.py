"""Pensieve kernels: paged attention over a non-contiguous KV cache, KV write, block copy.

Each op has a torch reference (``*_ref``) that is the test oracle and the CPU
implementation. The dispatching entry points pick the Triton kernel on CUDA
tensors and the reference elsewhere; ``impl="ref"`` or ``impl="triton"`` forces
one, and ``resolve_impl`` makes that choice once for a whole process (the
engine's runner calls it at start-up). This package imports nothing from the
engine; Triton is imported only when a Triton path runs.
"""
from .reference import (
    copy_blocks_ref,
    gather_blocks_ref,
    paged_attention_ref,
    scatter_blocks_ref,
    write_kv_ref,
    rms_norm_ref,
    silu_and_mul_ref,
    rotary_write_kv_ref,
)
from .dispatch import (
    copy_blocks,
    decode_graph_plan,
    gather_blocks,
    paged_attention,
    prepare_paged_attention,
    resolve_impl,
    scatter_blocks,
    swap_blocks,
    write_kv,
    rms_norm,
    silu_and_mul,
    rotary_write_kv,
)

__all__ = [
    "paged_attention",
    "paged_attention_ref",
    "prepare_paged_attention",
    "resolve_impl",
    "write_kv",
    "write_kv_ref",
    "copy_blocks",
    "copy_blocks_ref",
    "gather_blocks",
    "gather_blocks_ref",
    "scatter_blocks",
    "scatter_blocks_ref",
    "swap_blocks",
    "rms_norm",
    "rms_norm_ref",
    "silu_and_mul",
    "silu_and_mul_ref",
    "rotary_write_kv",
    "rotary_write_kv_ref",
    "decode_graph_plan",
]
