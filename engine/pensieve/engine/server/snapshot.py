"""What the server exports about the engine, read in one place.

``engine_metrics_snapshot(engine)`` is the only code that reads engine state
for /metrics and /debug/state. It runs on the engine thread between steps (so
it sees a consistent state) and returns plain numbers; the HTTP side only ever
reads the latest snapshot.

Hooks for the CPU tier: everything the GPU-only engine does not have yet is
read with ``getattr(..., default)``, so filling these in makes the metrics move
without touching the server:

    engine.cache.stats.context_tokens  dict source -> tokens, sources gpu|cpu|recomputed|new
      (or engine.stats.context_tokens;  default: gpu = cached_prompt_tokens, new = the rest of the prompts)
    engine.swap_bytes("in"|"out")      (or engine.stats.swap_in_bytes / swap_out_bytes)
    engine.cache.stats.evicted_tokens  dict tier -> tokens (or engine.stats.evicted_tokens_gpu/_cpu;
                                       default gpu: engine.cache.evicted_tokens)
    engine.scheduler.num_suspended     requests suspended to the CPU tier (or len(engine.scheduler.swapped))
    engine.cache.cpu                   the CPU BlockPool (num_blocks, num_used)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

CONTEXT_SOURCES = ("gpu", "cpu", "recomputed", "new")


@dataclass
class EngineSnapshot:
    taken_at: float = 0.0
    num_requests_running: int = 0
    num_requests_waiting: int = 0
    num_requests_swapped: int = 0
    gpu_blocks_total: int = 0
    gpu_blocks_used: int = 0
    gpu_usage_ratio: float = 0.0
    cpu_blocks_total: int = 0
    cpu_blocks_used: int = 0
    cpu_usage_ratio: float = 0.0
    sessions_active: int = 0
    session_blocks: int = 0          # GPU blocks held by idle sessions' caches
    request_blocks: int = 0          # GPU blocks held by unfinished requests
    num_unfinished: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    context_tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CONTEXT_SOURCES, 0))
    swap_bytes: dict[str, int] = field(default_factory=lambda: {"in": 0, "out": 0})
    evicted_tokens: dict[str, int] = field(default_factory=lambda: {"gpu": 0, "cpu": 0})
    requests_finished: dict[str, int] = field(default_factory=dict)
    preemptions: int = 0
    steps: int = 0

    def as_dict(self) -> dict:
        from dataclasses import asdict
        return asdict(self)


def _pool(pool) -> tuple[int, int, float]:
    if pool is None:
        return 0, 0, 0.0
    total = int(getattr(pool, "num_blocks", 0))
    used = int(getattr(pool, "num_used", total - int(getattr(pool, "num_free", total))))
    return total, used, (used / total if total else 0.0)


def engine_metrics_snapshot(engine) -> EngineSnapshot:
    """Read the engine's gauges and counters (call on the engine thread)."""
    stats = engine.stats
    cache = engine.cache
    sched = engine.scheduler
    s = EngineSnapshot(taken_at=time.time())
    s.num_requests_running = len(sched.running)
    s.num_requests_waiting = len(sched.waiting)
    suspended = getattr(sched, "num_suspended", None)
    s.num_requests_swapped = int(suspended) if isinstance(suspended, int) else len(getattr(sched, "swapped", ()) or ())
    s.gpu_blocks_total, s.gpu_blocks_used, s.gpu_usage_ratio = _pool(cache.gpu)
    s.cpu_blocks_total, s.cpu_blocks_used, s.cpu_usage_ratio = _pool(getattr(cache, "cpu", None))
    sessions = list(cache.sessions.values())
    # Internal sessions only park a suspended request's context; they are not conversations.
    s.sessions_active = sum(1 for x in sessions if not getattr(x, "internal", False))
    s.session_blocks = sum(len(x.block_ids) for x in sessions)
    s.request_blocks = sum(len(r.block_ids) for r in engine.requests.values())
    s.num_unfinished = len(engine.requests)
    s.prompt_tokens = int(stats.prompt_tokens)
    s.generation_tokens = int(stats.generation_tokens)

    cstats = getattr(cache, "stats", None)
    ctx = getattr(cstats, "context_tokens", None) or getattr(stats, "context_tokens", None)
    if ctx:
        s.context_tokens = {k: int(ctx.get(k, 0)) for k in CONTEXT_SOURCES}
    else:
        cached = int(stats.cached_prompt_tokens)
        s.context_tokens = {"gpu": cached, "cpu": 0, "recomputed": 0, "new": max(0, s.prompt_tokens - cached)}
    if callable(getattr(engine, "swap_bytes", None)):
        s.swap_bytes = {d: int(engine.swap_bytes(d)) for d in ("in", "out")}
    else:
        s.swap_bytes = {"in": int(getattr(stats, "swap_in_bytes", 0)), "out": int(getattr(stats, "swap_out_bytes", 0))}
    evicted = getattr(cstats, "evicted_tokens", None)
    if isinstance(evicted, dict):
        s.evicted_tokens = {"gpu": int(evicted.get("gpu", 0)), "cpu": int(evicted.get("cpu", 0))}
    else:
        gpu_evicted = getattr(stats, "evicted_tokens_gpu", None)
        if gpu_evicted is None:
            gpu_evicted = getattr(cache, "evicted_tokens", 0)
        s.evicted_tokens = {"gpu": int(gpu_evicted), "cpu": int(getattr(stats, "evicted_tokens_cpu", 0))}
    s.requests_finished = dict(stats.requests_finished)
    s.preemptions = int(stats.preemptions)
    s.steps = int(stats.steps)
    return s


def cache_config_labels(engine) -> dict[str, str]:
    """Labels of pensieve_cache_config_info."""
    cpu = getattr(engine.cache, "cpu", None)
    return {
        "model": str(engine.served_model_name),
        "block_size": str(engine.config.block_size),
        "gpu_blocks": str(engine.cache.gpu.num_blocks),
        "cpu_blocks": str(getattr(cpu, "num_blocks", 0) if cpu is not None else 0),
        "cache_mode": str(engine.config.cache_mode),
    }
