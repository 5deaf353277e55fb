from __future__ import annotations

import pytest
import torch


@pytest.fixture
def make_engine(tiny_checkpoint):
    """Build engines on tiny checkpoints; on teardown, assert no block leaked."""
    from pensieve.engine import EngineConfig, LLMEngine

    engines = []

    def make(family="llama", **overrides):
        overrides.setdefault("num_gpu_blocks", 128)
        overrides.setdefault("block_size", 16)
        overrides.setdefault("num_cpu_blocks", 64)
        overrides.setdefault("device", "cpu")
        overrides.setdefault("dtype", "float32")
        engine = LLMEngine(EngineConfig(model=tiny_checkpoint(family), **overrides))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        assert not engine.has_unfinished(), "a test left requests in the engine"
        for sid in list(engine.cache.sessions):
            engine.delete_session(sid)
        assert engine.cache.gpu.num_free == engine.cache.gpu.num_blocks, "KV blocks leaked"
        cpu = getattr(engine.cache, "cpu", None)
        if cpu is not None:
            assert cpu.num_free == cpu.num_blocks, "CPU-tier blocks leaked"


