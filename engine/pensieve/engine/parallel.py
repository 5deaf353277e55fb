"""Tensor parallelism: the process group of one engine and the collectives its model needs.

One engine spans ``--tensor-parallel-size`` N processes, one per device: rank 0
is the engine (tokenizer, scheduler, cache manager, sampler, HTTP server); ranks
1..N-1 are workers (``tp_worker.py``) that hold their shard of the weights and of
both cache tiers and execute the steps rank 0 broadcasts. The group uses NCCL on
CUDA and gloo on CPU, rendezvousing through a TCP store on loopback that rank 0
opens on a free port.

Ownership: a ``TensorParallel`` is created once per process and passed explicitly
to the model and the runner (never a module global), so that an engine at size 1
and one at size N can live in the same process (tests do). ``SINGLE`` is the size-1
group: models built with it use plain ``nn.Linear``/``nn.Embedding`` and call no
collective. At most one group of size > 1 exists per process (torch.distributed
has one default group).
"""
from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger("pensieve.engine")

# Collectives wait this long for a peer (a rank loading a 70B checkpoint from a slow disk
# is late to the first one).
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass
class TensorParallel:
    """This process's place in its engine's tensor-parallel group."""

    rank: int = 0
    world_size: int = 1
    # the host group (gloo) that carries each step's message; None: the default group
    # (which is gloo on CPU). Under NCCL a separate gloo group lets a worker's host take
    # the next step while its GPU still runs this one.
    host_group: object | None = field(default=None, compare=False, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------ sharding arithmetic
    def split(self, n: int, what: str) -> int:
        """This rank's share of ``n`` (heads, rows, features) that must divide evenly."""
        if n % self.world_size:
            from .errors import InvalidRequestError
            raise InvalidRequestError(f"--tensor-parallel-size {self.world_size} does not divide the model's "
                                      f"{what} ({n})", "tensor_parallel_size")
        return n // self.world_size

    def narrow(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's contiguous 1/N of ``tensor`` along ``dim``."""
        if not self.enabled:
            return tensor
        size = tensor.shape[dim] // self.world_size
        return tensor.narrow(dim, self.rank * size, size)

    def vocab_part(self, vocab: int) -> int:
        """Rows of the vocabulary each rank holds (the last rank's slice is padded)."""
        return -(-vocab // self.world_size)

    def vocab_shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a [vocab, ...] tensor, zero-padded to ``vocab_part``."""
        if not self.enabled:
            return tensor
        part = self.vocab_part(tensor.shape[0])
        start = self.rank * part
        rows = tensor[start:start + part]
        if rows.shape[0] < part:
            pad = torch.zeros((part - rows.shape[0],) + tuple(tensor.shape[1:]), dtype=tensor.dtype,
                              device=tensor.device)
            rows = torch.cat([rows, pad])
        return rows

    # ------------------------------------------------------------ collectives (size > 1 only)
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        torch.distributed.all_reduce(t)
        return t

    def gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``t`` along the last dimension (every rank gets the whole)."""
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=-1)

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``t`` into every rank's ``t``, in place."""
        torch.distributed.broadcast(t, src=0)
        return t

    def broadcast_host(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's host tensor ``t`` into every rank's, in place, over the host group."""
        torch.distributed.broadcast(t, src=0, group=self.host_group)
        return t

    def min_int(self, value: int, device: torch.device) -> int:
        """The smallest of the ranks' ``value`` (every rank gets it)."""
        t = torch.tensor([value], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t.item())

    def share_int(self, value: int, device: torch.device) -> int:
        """Rank 0's ``value`` on every rank."""
        t = torch.tensor([value], dtype=torch.int64, device=device)
        return int(self.broadcast(t).item())


SINGLE = TensorParallel()


def open_store(world_size: int) -> torch.distributed.TCPStore:
    """Rank 0's rendezvous store on a free loopback port (the workers connect to ``store.port``)."""
    return torch.distributed.TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=TIMEOUT,
                                      wait_for_workers=False)


def connect_store(port: int, world_size: int) -> torch.distributed.TCPStore:
    return torch.distributed.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=TIMEOUT)


def init_group(store, rank: int, world_size: int, device: torch.device) -> TensorParallel:
    """Join the engine's group (blocks until every rank has joined)."""
    if torch.distributed.is_initialized():
        raise RuntimeError("a tensor-parallel engine already runs in this process (one per process)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                         timeout=TIMEOUT, **kwargs)
    host_group = torch.distributed.new_group(backend="gloo") if backend == "nccl" else None
    log.info("tensor parallel: rank %d of %d joined (%s)", rank, world_size, backend)
    return TensorParallel(rank, world_size, host_group)


def share_cpu_threads(world_size: int) -> None:
    """Give each rank its share of the cores for its host compute threads. OpenMP teams as large
    as the machine in every rank keep losing members to each other's spinning and stall at every
    barrier. On 2 cores (CPU device) a tiny model's decode step took 75 ms at size 2, 16 ms with
    the share, 4 ms at size 1; on two H200s (32 cores) the attention plan's small host ops took
    9 ms a step at size 2 against 1.7 at size 1. An explicit OMP_NUM_THREADS is respected."""
    import os

    if world_size == 1 or "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))


def destroy_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r uses CUDA device r (the pod's GPUs, in order); on CPU every rank uses the CPU."""
    if device.type != "cuda":
        return device
    if rank >= torch.cuda.device_count():
        from .errors import InvalidRequestError
        raise InvalidRequestError(f"tensor-parallel rank {rank} needs CUDA device {rank}; only "
                                  f"{torch.cuda.device_count()} visible", "tensor_parallel_size")
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)
