"""The worker ranks of a tensor-parallel engine (ranks 1..N-1), and their lifecycle.

Rank 0 (the ``LLMEngine``) opens the rendezvous store, spawns the workers
(``torch.multiprocessing``, spawn start method: CUDA cannot be forked) and joins
the group. Each worker builds its ``ModelRunner`` shard, then takes part in the
same start-up sequence as rank 0, collective for collective:

    profile GPU blocks -> MIN over ranks -> allocate the GPU tier
    -> rank 0's CPU-tier block count (broadcast) -> allocate the CPU tier -> warm-up

and then executes broadcast steps until rank 0 sends STOP (``tp_step.py``).

No orphans: a worker exits when its parent process is gone (a watchdog thread
polls the parent pid), when a collective fails (gloo: the peer's socket closed),
and is terminated by ``WorkerSet.stop`` if it does not leave in time.
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from . import parallel
from .config import EngineConfig

log = logging.getLogger("pensieve.engine")

JOIN_TIMEOUT_S = 30.0


def agree_gpu_blocks(runner, config: EngineConfig, max_model_len: int) -> int:
    """Every rank: the same GPU-tier block count, the smallest any rank can hold."""
    num = config.num_gpu_blocks or runner.profile_num_blocks(max_model_len)
    return runner.tp.min_int(num, runner.device) if runner.tp.enabled else num


def start_group(config: EngineConfig, model_cfg: dict, device: torch.device, dtype: torch.dtype,
                max_model_len: int) -> tuple[parallel.TensorParallel, "WorkerSet | None", torch.device]:
    """Rank 0: at size 1 nothing (SINGLE, no workers); else check that the size divides the
    model's heads, spawn the workers and join the group. Returns (group, workers, rank 0's device)."""
    world = config.tensor_parallel_size
    if world == 1:
        return parallel.SINGLE, None, device
    check_divides(world, model_cfg)
    if torch.distributed.is_initialized():
        raise RuntimeError("a tensor-parallel engine already runs in this process (one per process); close() it first")
    device = parallel.rank_device(device, 0)
    parallel.share_cpu_threads(world)
    store = parallel.open_store(world)
    workers = WorkerSet.start(config, model_cfg, device, dtype, max_model_len, store.port)
    atexit.register(workers.stop)  # an engine never closed: its workers go with the interpreter
    try:
        tp = parallel.init_group(store, 0, world, device)
    except BaseException:
        workers.stop()
        raise
    workers.store = store  # kept open while the group lives
    return tp, workers, device


def check_divides(world: int, model_cfg: dict) -> None:
    """Refuse a size that does not split the heads (and MLP width) evenly, before any process starts."""
    heads = model_cfg["num_attention_heads"]
    kv = model_cfg.get("num_key_value_heads") or heads
    width = model_cfg.get("intermediate_size") or model_cfg.get("ffn_dim") or 0
    probe = parallel.TensorParallel(0, world)
    probe.split(kv, "KV heads (num_key_value_heads)")
    probe.split(heads, "attention heads (num_attention_heads)")
    probe.split(width, "MLP width")


@dataclass
class WorkerSet:
    """Rank 0's handle on its worker processes (owns them: starts, stops, reaps)."""

    processes: list = field(default_factory=list)
    stopped: bool = False
    store: object | None = None

    @classmethod
    def start(cls, config: EngineConfig, model_cfg: dict, device: torch.device, dtype: torch.dtype,
              max_model_len: int, store_port: int) -> "WorkerSet":
        ctx = torch.multiprocessing.get_context("spawn")
        world = config.tensor_parallel_size
        workers = cls()
        for rank in range(1, world):
            p = ctx.Process(target=worker_main, name=f"pensieve-tp-rank{rank}", daemon=True,
                            args=(config, model_cfg, device.type, dtype, max_model_len, rank, world, store_port,
                                  os.getpid()))
            p.start()
            workers.processes.append(p)
        log.info("tensor parallel: started %d worker process(es): pids %s", world - 1,
                 [p.pid for p in workers.processes])
        if device.type == "cuda":
            # A lost rank under NCCL leaves rank 0 blocked in its next collective (gloo fails it
            # at once): the process exits instead, and its pod is restarted.
            workers.watch(_exit_lost_rank)
        return workers

    def watch(self, on_lost, interval: float = 1.0) -> threading.Thread:
        """Call ``on_lost(pid, exitcode)`` (from a daemon thread) if a worker exits before ``stop``."""
        def loop() -> None:
            while not self.stopped:
                for p in self.processes:
                    code = p.exitcode
                    if code is not None and not self.stopped:
                        on_lost(p.pid, code)
                        return
                time.sleep(interval)

        thread = threading.Thread(target=loop, name="tp-worker-watchdog", daemon=True)
        thread.start()
        return thread

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def stop(self, runner=None) -> None:
        """Ask the workers to leave (when ``runner`` is given: rank 0 is between steps, so
        the workers wait for its next message) and reap them; without ``runner`` (start-up
        failed: the workers may be inside another collective) terminate them at once.
        Any that do not exit in time are terminated, then killed. Idempotent."""
        if self.stopped:
            return
        self.stopped = True
        if runner is not None:
            try:
                runner.stop_workers()
                # The workers leave the group as they exit, and under NCCL destroying a
                # communicator waits for every rank to destroy its own: rank 0 leaves now,
                # before it waits for them (else each side waits for the other until terminated).
                runner.release_graphs()
                parallel.destroy_group()
            except Exception as e:  # the group is broken (a worker died): terminate below
                log.warning("tensor parallel: could not tell the workers to stop (%s)", e)
        deadline = time.monotonic() + (JOIN_TIMEOUT_S if runner is not None else 0.0)
        for p in self.processes:
            p.join(max(0.1, deadline - time.monotonic()))
        for p in self.processes:
            if p.is_alive():
                (log.warning if runner is not None else log.info)(
                    "tensor parallel: terminating worker pid %d%s", p.pid, " (it did not exit)" if runner else "")
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        atexit.unregister(self.stop)


def _exit_lost_rank(pid: int, exitcode: int) -> None:
    log.error("tensor parallel: worker pid %d exited (code %s) while serving; the engine cannot continue "
              "without it and exits", pid, exitcode)
    logging.shutdown()
    os._exit(70)


def worker_main(config: EngineConfig, model_cfg: dict, device_type: str, dtype: torch.dtype, max_model_len: int,
                rank: int, world: int, store_port: int, parent_pid: int) -> None:
    """Entry point of rank ``rank`` (a spawned process)."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s [tp rank {rank}] %(message)s")
    _watch_parent(parent_pid)
    from .runner import ModelRunner

    device = parallel.rank_device(torch.device(device_type), rank)
    parallel.share_cpu_threads(world)
    store = parallel.connect_store(store_port, world)
    tp = parallel.init_group(store, rank, world, device)
    runner = None
    try:
        torch.manual_seed(config.seed)
        runner = ModelRunner(config, model_cfg, device, dtype, max_model_len, tp)
        runner.allocate_cache(agree_gpu_blocks(runner, config, max_model_len))
        runner.allocate_cpu_cache(tp.share_int(0, device))
        runner.warm_up(config.max_num_batched_tokens)
        log.info("ready: %d GPU-tier + %d CPU-tier blocks of %d KV heads", runner.kv_caches[0][0].shape[0],
                 runner.cpu_caches[0][0].shape[0] if runner.cpu_caches else 0, runner.num_kv_heads)
        runner.serve_steps()
    finally:
        if runner is not None:
            runner.release_graphs()  # before the group: see ModelRunner.release_graphs
        parallel.destroy_group()


def _watch_parent(parent_pid: int) -> None:
    """Exit at once when the engine process is gone (never outlive it)."""
    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
