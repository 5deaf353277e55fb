"""What the server exports about the engine, read in one place.

``engine_metrics_snapshot(engine)`` is the only code that reads engine state
for /metrics and /debug/state. It runs on the engine thread between steps (so
it sees a consistent state) and returns plain numbers; the HTTP side only ever
reads the latest snapshot. Sources: the scheduler's queues, the block pools
(``cache.gpu``, ``cache.cpu``), the cache's counters (``cache.stats``: context
token sources, evicted tokens), ``engine.swap_bytes`` and ``engine.stats``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

CONTEXT_SOURCES = ("gpu", "cpu", "recomputed", "new")
STEP_PATHS = ("graph", "eager", "eager_for_copies")  # the values of ModelRunner.last_path


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
    step_paths: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STEP_PATHS, 0))
    swap_out_in_step_bytes: int = 0  # of swap_bytes["out"], the copies a step's layers waited for

    def as_dict(self) -> dict:
        from dataclasses import asdict
        return asdict(self)


def _pool(pool) -> tuple[int, int, float]:
    return pool.num_blocks, pool.num_used, pool.usage()


def engine_metrics_snapshot(engine) -> EngineSnapshot:
    """Read the engine's gauges and counters (call on the engine thread)."""
    stats = engine.stats
    cache = engine.cache
    sched = engine.scheduler
    s = EngineSnapshot(taken_at=time.time())
    s.num_requests_running = len(sched.running)
    s.num_requests_waiting = len(sched.waiting)
    s.num_requests_swapped = sched.num_suspended
    s.gpu_blocks_total, s.gpu_blocks_used, s.gpu_usage_ratio = _pool(cache.gpu)
    s.cpu_blocks_total, s.cpu_blocks_used, s.cpu_usage_ratio = _pool(cache.cpu)
    sessions = list(cache.sessions.values())
    # Internal sessions only park a suspended request's context; they are not conversations.
    s.sessions_active = sum(1 for x in sessions if not x.internal)
    s.session_blocks = sum(len(x.block_ids) for x in sessions)
    s.request_blocks = sum(len(r.block_ids) for r in engine.requests.values())
    s.num_unfinished = len(engine.requests)
    s.prompt_tokens = int(stats.prompt_tokens)
    s.generation_tokens = int(stats.generation_tokens)
    s.context_tokens = {k: int(cache.stats.context_tokens.get(k, 0)) for k in CONTEXT_SOURCES}
    s.swap_bytes = {d: int(engine.swap_bytes(d)) for d in ("in", "out")}
    s.evicted_tokens = {t: int(cache.stats.evicted_tokens.get(t, 0)) for t in ("gpu", "cpu")}
    s.requests_finished = dict(stats.requests_finished)
    s.preemptions = int(stats.preemptions)
    s.steps = int(stats.steps)
    s.step_paths = {**dict.fromkeys(STEP_PATHS, 0), **stats.step_paths}
    s.swap_out_in_step_bytes = int(engine.swap_bytes("out_in_step"))
    return s


def cache_config_labels(engine) -> dict[str, str]:
    """Labels of pensieve_cache_config_info."""
    return {
        "model": str(engine.served_model_name),
        "block_size": str(engine.config.block_size),
        "gpu_blocks": str(engine.cache.gpu.num_blocks),
        "cpu_blocks": str(engine.cache.cpu.num_blocks),
        "cache_mode": str(engine.config.cache_mode),
    }
