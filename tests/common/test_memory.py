"""One CPU-tier formula (pensieve.common.memory): the operator's pod sizing and the
engine's own --cpu-cache-bytes auto give the same tier for the same memory limit."""
from __future__ import annotations

import pytest

from pensieve.common.memory import ENGINE_OVERHEAD_BYTES, cpu_tier_bytes, usable_memory

GiB, MiB = 2**30, 2**20


def test_the_formula():
    assert usable_memory(100 * GiB) == 95 * GiB
    assert usable_memory(100 * GiB, 0.0) == 100 * GiB
    assert cpu_tier_bytes(64 * GiB) == 60 * GiB          # fixed overhead, not a share of the budget
    assert cpu_tier_bytes(1024 * GiB) == 1020 * GiB
    assert cpu_tier_bytes(12 * GiB, resident_bytes=3 * GiB) == 5 * GiB
    assert cpu_tier_bytes(2 * GiB) == 0
    with pytest.raises(ValueError):
        usable_memory(GiB, 1.0)


def test_engine_auto_and_operator_sizing_agree(tiny_checkpoint, monkeypatch):
    import pensieve.engine.engine as engine_module
    from pensieve.engine import EngineConfig, LLMEngine
    from pensieve.operator.settings import Settings
    from pensieve.operator.sizing import compute_sizing
    from pensieve.operator.spec import parse_spec

    base = dict(model=str(tiny_checkpoint("llama")), device="cpu", dtype="float32", num_gpu_blocks=32, block_size=16)
    probe = LLMEngine(EngineConfig(**base, num_cpu_blocks=0))
    per_block = probe.runner.bytes_per_block
    weights = sum(p.numel() * p.element_size() for p in probe.runner.model.parameters())
    resident = weights + 32 * per_block  # a CPU device keeps its weights and device tier in the same memory
    limit = -(-(ENGINE_OVERHEAD_BYTES + resident + 100 * per_block) // MiB) * MiB  # a pod limit, whole MiB

    # The operator sizes a pod with exactly this limit (one GPU, one pod, no node reserve) ...
    settings = Settings(node_memory_reserve_fraction=0.0, min_cpu_cache_bytes=0)
    node = {"metadata": {"name": "n", "labels": {}}, "spec": {},
            "status": {"allocatable": {"memory": str(limit), "nvidia.com/gpu": "1"}}}
    body = {"metadata": {"name": "p", "namespace": "ns"}, "spec": {"model": {"source": {"hostPath": {"path": "/m"}}}}}
    sizing = compute_sizing([node], parse_spec(body, default_engine_image="e", default_router_image="r"), settings)
    assert sizing.fits and sizing.memory_limit_bytes == limit
    assert sizing.cpu_cache_bytes == cpu_tier_bytes(limit)

    # ... and an engine left on auto in a container with that cgroup limit picks the same tier
    # (less what it keeps resident on a CPU device).
    monkeypatch.setattr(engine_module, "host_memory_limit", lambda: (limit, True))
    engine = LLMEngine(EngineConfig(**base))
    assert engine.num_cpu_blocks == (sizing.cpu_cache_bytes - resident) // per_block
    assert engine.num_cpu_blocks >= 100
