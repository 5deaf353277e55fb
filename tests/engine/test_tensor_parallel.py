"""Tensor parallelism on CPU: 2 processes under gloo must compute what one process computes.

Each test starts a real worker process (torch.multiprocessing spawn) and a real gloo
group; the single-process engine is the reference: float32 logits within 1e-5,
greedy tokens identical, and a multi-turn run under tier pressure (swap-out,
swap-in, recompute) identical to a stateless engine.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from engine_helpers import prefill_logits, run_to_end
from pensieve.engine import EngineConfig, LLMEngine, SamplingParams
from pensieve.engine.errors import InvalidRequestError

COMMON = dict(device="cpu", dtype="float32", block_size=16)


@pytest.fixture
def tp_engine(tiny_checkpoint):
    """tp_engine(family, **overrides): a tensor-parallel engine of size 2, closed after the test
    (its workers must be gone then)."""
    made = []

    def make(family="llama", **overrides):
        overrides = {"num_gpu_blocks": 64, "num_cpu_blocks": 16, **COMMON, **overrides}
        engine = LLMEngine(EngineConfig(model=tiny_checkpoint(family), tensor_parallel_size=2, **overrides))
        made.append(engine)
        return engine

    yield make
    for engine in made:
        pids = engine._workers.pids if engine._workers else []
        engine.close()
        assert all(not _alive(pid) for pid in pids), "a worker outlived close()"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purpose (reaped by its parent later)
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False



PROMPTS = [list(range(10, 60)), [7, 300, 12, 45, 99, 210, 3, 77, 18, 404, 250, 61]]


@pytest.mark.parametrize("family, async_scheduling", [("llama", "on"), ("opt", "off")])
def test_logits_and_greedy_tokens_match_one_process(tp_engine, tiny_checkpoint, family, async_scheduling):
    """(With asynchronous scheduling, placeholder ids are resolved from rank 0's sampled tokens,
    broadcast on the device.)"""
    one = LLMEngine(EngineConfig(model=tiny_checkpoint(family), num_gpu_blocks=64, num_cpu_blocks=16, **COMMON))
    two = tp_engine(family, async_scheduling=async_scheduling)
    assert two.async_scheduling == (async_scheduling == "on")
    if family == "llama":  # GQA: 4 query heads over 2 KV heads, one KV head per rank
        assert (two.runner.num_heads, two.runner.num_kv_heads) == (2, 1)
    assert two.runner.pod_bytes_per_block == one.runner.bytes_per_block == 2 * two.runner.bytes_per_block
    for ids in PROMPTS:
        a, b = prefill_logits(one, ids), prefill_logits(two, ids)
        assert a.shape == b.shape == (len(ids), one.model_config["vocab_size"])
        assert torch.allclose(a, b, atol=1e-5, rtol=0), float((a - b).abs().max())
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    expected = one.generate(PROMPTS, params)
    assert two.generate(PROMPTS, params) == expected
    assert all(len(t) == 32 for t in expected)


def test_multi_turn_under_tier_pressure_matches_stateless(tp_engine, tiny_checkpoint):
    """Swap-out, swap-in and recompute at size 2, with asynchronous scheduling (placeholders
    resolved from broadcast tokens; the synchronous path is the other tests'): every turn
    equals a stateless recompute."""
    from test_tiers import run_interleaved

    engine = tp_engine("llama", num_gpu_blocks=16, num_cpu_blocks=6, max_num_batched_tokens=48,
                       async_scheduling="on")
    oracle = LLMEngine(EngineConfig(model=tiny_checkpoint("llama"), cache_mode="none", num_gpu_blocks=256, **COMMON))
    assert run_interleaved(engine, oracle, seed=7, n_sessions=6, n_turns=4) == 24
    stats = engine.cache.stats
    assert stats.swap_out_blocks > 0 and stats.swap_in_blocks > 0, stats
    assert stats.context_tokens["recomputed"] > 0 and stats.context_tokens["cpu"] > 0, stats.context_tokens
    # sizing and metrics count the pod: both ranks' shards
    assert engine.swap_bytes("in") == stats.swap_in_blocks * 2 * engine.runner.bytes_per_block
    for s in list(engine.cache.sessions):
        engine.delete_session(s)
    assert engine.cache.gpu.num_free == 16 and engine.cache.cpu.num_free == 6


def test_size_that_does_not_divide_the_heads_is_refused(tiny_checkpoint):
    with pytest.raises(InvalidRequestError, match=r"--tensor-parallel-size 3 does not divide the model's KV heads"):
        LLMEngine(EngineConfig(model=tiny_checkpoint("llama"), tensor_parallel_size=3, **COMMON))
    with pytest.raises(InvalidRequestError, match="tensor_parallel_size must be >= 1"):
        EngineConfig(model=tiny_checkpoint("llama"), tensor_parallel_size=0)
    assert not torch.distributed.is_initialized()


def test_start_up_failure_terminates_the_workers(tiny_checkpoint, monkeypatch):
    from pensieve.engine import runner as runner_mod
    from pensieve.engine import tp_worker

    started = []
    real_start = tp_worker.WorkerSet.start.__func__

    def spy(cls, *a, **kw):
        ws = real_start(cls, *a, **kw)
        started.extend(ws.pids)
        return ws

    def fail(self, *a, **kw):
        raise RuntimeError("warm-up failed on rank 0")

    monkeypatch.setattr(tp_worker.WorkerSet, "start", classmethod(spy))
    monkeypatch.setattr(runner_mod.ModelRunner, "warm_up", fail)  # rank 0 only: workers are other processes
    with pytest.raises(RuntimeError, match="warm-up failed on rank 0"):
        LLMEngine(EngineConfig(model=tiny_checkpoint("llama"), tensor_parallel_size=2, num_gpu_blocks=32, **COMMON))
    assert started and all(not _alive(pid) for pid in started)
    assert not torch.distributed.is_initialized()


def test_workers_exit_when_the_engine_process_is_killed(tiny_checkpoint, tmp_path):
    """SIGKILL of rank 0 (no clean-up code runs) must not leave its workers behind."""
    script = tmp_path / "engine.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from pensieve.engine import EngineConfig, LLMEngine

        if __name__ == "__main__":
            engine = LLMEngine(EngineConfig(model={tiny_checkpoint("llama")!r}, tensor_parallel_size=2,
                                            num_gpu_blocks=32, device="cpu", dtype="float32"))
            print("PIDS", *engine._workers.pids, flush=True)
            time.sleep(600)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while not line.startswith("PIDS") and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "the engine process died before it was ready"
        pids = [int(p) for p in line.split()[1:]]
        assert len(pids) == 1 and _alive(pids[0])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    deadline = time.monotonic() + 15
    while _alive(pids[0]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pids[0]), "the worker outlived its engine process"


def test_offloaded_session_resumes_identically(tp_engine, tiny_checkpoint):
    """Qwen2 (tied embeddings: the vocabulary-parallel table is also the LM head) at size 2:
    a session offloaded to the CPU tier (a swap-only step, executed by the worker too)
    continues exactly as in one process."""
    one = LLMEngine(EngineConfig(model=tiny_checkpoint("qwen2"), num_gpu_blocks=64, num_cpu_blocks=16, **COMMON))
    two = tp_engine("qwen2")
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    first = list(range(20, 60))
    outs = []
    for engine in (one, two):
        rid = engine.add_request(first, params, session_id="s")
        out = run_to_end(engine)[rid]
        assert engine.offload_session("s") > 0
        rid = engine.add_request(first + out + [5, 6, 7], params, session_id="s")
        outs.append((out, run_to_end(engine)[rid]))
        assert engine.cache.stats.context_tokens["cpu"] >= 32 and engine.cache.stats.swap_in_blocks > 0
        engine.delete_session("s")
    assert outs[0] == outs[1]


@pytest.mark.parametrize("family, source", [("llama", "safetensors"), ("llama", "gguf"), ("qwen2", "gguf"),
                                            ("llama", "dummy"), ("opt", "dummy"), ("opt", "safetensors")])
def test_each_rank_loads_a_slice_of_the_full_weights(tiny_checkpoint, tmp_path, monkeypatch, family, source):
    """Loading needs no process group: rank r of 2 keeps exactly its slice of every tensor,
    from safetensors, GGUF (q/k permutation undone first) and dummy weights alike."""
    from gguf_helpers import write_gguf
    from pensieve.engine.checkpoint import load_model, read_config
    from pensieve.engine.parallel import TensorParallel

    monkeypatch.setenv("PENSIEVE_CACHE", str(tmp_path / "cache"))
    model_dir = tiny_checkpoint(family)
    if source == "gguf":
        write_gguf(model_dir, tmp_path / "tiny.gguf")
        model_dir = str(tmp_path / "tiny.gguf")
    cfg = read_config(model_dir)
    fmt = "dummy" if source == "dummy" else "auto"
    cpu = torch.device("cpu")
    full = dict(load_model(model_dir, cfg, cpu, torch.float32, fmt, seed=3).named_parameters())
    shards = [dict(load_model(model_dir, cfg, cpu, torch.float32, fmt, seed=3, tp=TensorParallel(r, 2))
                   .named_parameters()) for r in range(2)]
    sharded = 0
    for name, param in shards[0].items():
        take = getattr(param, "tp_take", None)
        for rank, shard in enumerate(shards):
            p = shard[name]
            expected = full[name] if take is None else p.tp_take(full[name])
            assert torch.equal(p, expected), (name, rank)
        sharded += take is not None
    assert sharded >= 4 * cfg["num_hidden_layers"] + 1


def test_watchdog_reports_a_worker_lost_while_serving(tiny_checkpoint):
    """Under NCCL a lost rank would leave rank 0 blocked in a collective: the watchdog (which
    exits the process on CUDA) must notice a worker that dies, and stay quiet after stop()."""
    from pensieve.engine.tp_worker import WorkerSet

    engine = LLMEngine(EngineConfig(model=tiny_checkpoint("llama"), tensor_parallel_size=2, num_gpu_blocks=32,
                                    **COMMON))
    workers: WorkerSet = engine._workers
    lost = []
    thread = workers.watch(lambda pid, code: lost.append((pid, code)), interval=0.05)
    time.sleep(0.2)
    assert not lost
    os.kill(workers.pids[0], signal.SIGKILL)
    thread.join(10)
    assert lost == [(workers.pids[0], -signal.SIGKILL)]
    engine.close()  # the group is broken: the STOP cannot be delivered, close() still returns
    assert not torch.distributed.is_initialized()
