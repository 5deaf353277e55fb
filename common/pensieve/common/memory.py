"""The CPU tier's share of a memory budget: one formula for the engine and the operator.

    usable    = budget × (1 − reserve_fraction)   (the fraction only where the
                budget is a whole node: host memory, a node's allocatable)
    CPU tier  = usable − overhead − resident      (never below 0)

``overhead`` is the engine process outside the tier (Python, torch, tokenizer,
CUDA context, staging buffers): a fixed 4 GiB, because it does not grow with
the machine (a fraction of a 1 TiB host would strand hundreds of GiB).
A tensor-parallel engine runs one process per GPU (``--tensor-parallel-size``), each
with that overhead: ``engine_overhead_bytes(processes)``; its CPU tier is one pod-wide
figure, split evenly over the ranks (each holds its KV heads of every block).
``resident`` is what else the engine keeps in the same memory: on a CPU device,
the weights and the device tier. Inside a container the cgroup limit is already
the pod's share, so no node reserve applies there.
"""
from __future__ import annotations

NODE_RESERVE_FRACTION = 0.05
ENGINE_OVERHEAD_BYTES = 4 * 2**30


def engine_overhead_bytes(processes: int = 1, per_process: int = ENGINE_OVERHEAD_BYTES) -> int:
    """Memory outside the CPU tier of an engine of ``processes`` processes (its tensor-parallel size)."""
    return int(per_process) * max(1, int(processes))


def usable_memory(budget_bytes: int, reserve_fraction: float = NODE_RESERVE_FRACTION) -> int:
    """What a whole node (or host) leaves to engine pods after its reserve."""
    if not 0 <= reserve_fraction < 1:
        raise ValueError(f"reserve_fraction must be in [0, 1), got {reserve_fraction}")
    return int(budget_bytes * (1 - reserve_fraction))


def cpu_tier_bytes(budget_bytes: int, overhead_bytes: int = ENGINE_OVERHEAD_BYTES, resident_bytes: int = 0) -> int:
    """Bytes of the CPU tier in a memory budget that holds one engine process."""
    return max(0, int(budget_bytes) - int(overhead_bytes) - int(resident_bytes))
