"""Block copies between the GPU cache and the CPU tier (the swapper), and the CPU
tier's host buffer. The runner owns one Swapper and calls it around each step's
forward pass; the cache manager decides what moves (``SwapPlan``)."""
from __future__ import annotations

import collections
import logging
import time

import torch

from pensieve.kernels import swap_blocks

from .cache_manager import SwapPlan

log = logging.getLogger("pensieve.engine")

#: Programs of an ahead-of-time swap-out launch (the default of
#: ``--swap-ahead-programs``). Those copies are not waited for,
#: but each program holds part of an SM while it waits on the host link, and a
#: GEMM that cannot place its tiles on those SMs runs a slower wave: on the H200
#: sweep (issue 12) the swap kernel's default 32 programs made pensieve mode's
#: decode steps slower than gpu-only's under swap-out pressure. A few programs
#: carry the average swap-out rate (well under 1 GB/s there) many times over.
AHEAD_PROGRAMS = 4


class HostBuffer:
    """A flat host tensor, page-locked in place when ``pin`` (exactly its size).
    Owns the registration: unregistered before the memory is freed."""

    def __init__(self, numel: int, dtype: torch.dtype, pin: bool):
        self.tensor = torch.empty(numel, dtype=dtype)
        self.pinned = False
        if pin and numel:
            nbytes = numel * self.tensor.element_size()
            t0 = time.perf_counter()
            rc = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, 0)
            if int(rc) != 0:
                raise RuntimeError(f"could not pin {nbytes / 2**30:.1f} GiB of host memory for the CPU tier "
                                   f"(cudaHostRegister error {int(rc)}); lower --cpu-cache-bytes")
            self.pinned = True
            log.info("pinned %.1f GiB of host memory for the CPU tier in %.1f s", nbytes / 2**30,
                     time.perf_counter() - t0)

    def __del__(self):
        if getattr(self, "pinned", False):
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self.pinned = False


class Swapper:
    """Performs a step's block copies between the tiers, layer by layer.

    Per layer i: urgent swap-outs (GPU blocks about to be rewritten this step)
    first, then swap-ins; layer i's attention waits only for layer i's copies.
    Ahead-of-time swap-outs run after the forward pass has been issued, so swap-in
    goes first on the link. On CUDA the copies run on their own stream with one
    event per layer. Compute waits for ahead-of-time copies only in a step that
    rewrites a block one of them may still be reading, and then only for the
    batches up to that block's (``SwapPlan.wait_for_batch``, set by the cache
    manager, which learns of completed batches through ``completed_batch``); on
    CPU the same calls run synchronously, in the same order.

    CUDA copy implementations (``swap_impl``): ``kernel`` moves all of a layer's
    blocks in one launch per tensor, the GPU reading or writing the pinned CPU
    tier directly; ``dma`` issues one async copy per run of adjacent block ids.
    """

    def __init__(self, gpu_caches, cpu_caches, device: torch.device, impl: str = "auto"):
        self.gpu, self.cpu = gpu_caches, cpu_caches
        self.cuda = device.type == "cuda"
        self.device = device
        self.impl = "kernel" if impl == "auto" else impl
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.events: list = []
        self.ahead: collections.deque = collections.deque()  # (batch, event) of ahead copies not seen complete
        self.done_watermark = 0  # the newest ahead batch seen complete
        self.plan: SwapPlan | None = None
        self.ids: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.programs: int | None = None  # swap kernel's programs (None: the kernel's default)
        self.ahead_programs: int | None = AHEAD_PROGRAMS  # the same, for ahead-of-time swap-outs
        self.runs: dict[str, list[tuple[int, int, int]]] = {}

    def begin(self, plan: SwapPlan) -> None:
        self.plan = plan
        self.ids = {name: self._id_tensors(getattr(plan, name)) for name in ("swap_out", "swap_in", "swap_out_ahead")}
        self.runs: dict[str, list[tuple[int, int, int]]] = {}
        if not self.cuda:
            self.done_layers = -1
            return
        self.stream.wait_stream(torch.cuda.current_stream())  # copies read what earlier steps wrote
        self.events = []
        with torch.cuda.stream(self.stream):
            for layer in range(len(self.gpu)):
                self._copy_layer(layer, "swap_out", to_cpu=True)
                self._copy_layer(layer, "swap_in", to_cpu=False)
                event = torch.cuda.Event()
                event.record(self.stream)
                self.events.append(event)

    def wait_ahead(self, batch: int) -> None:
        """The compute stream waits for the ahead-of-time swap-outs up to ``batch`` (the copy
        stream runs batches in order): a slot one of them reads is rewritten this step."""
        event = None
        for b, e in self.ahead:
            if b > batch:
                break
            event = e
        if event is not None:
            torch.cuda.current_stream().wait_event(event)

    def completed_batch(self) -> int:
        """The newest ahead-of-time batch known complete since the last call, 0 if none."""
        done = 0
        while self.ahead and (self.ahead[0][1] is None or self.ahead[0][1].query()):
            done = self.ahead.popleft()[0]
        self.done_watermark = max(self.done_watermark, done)
        return done

    def wait_for_layer(self, layer: int) -> None:
        if self.cuda:
            torch.cuda.current_stream().wait_event(self.events[layer])
            return
        while self.done_layers < layer:  # CPU: copy up to this layer now
            self.done_layers += 1
            self._copy_layer(self.done_layers, "swap_out", to_cpu=True)
            self._copy_layer(self.done_layers, "swap_in", to_cpu=False)

    def after_forward(self) -> None:
        if not self.cuda:
            self.wait_for_layer(len(self.gpu) - 1)
            for layer in range(len(self.gpu)):
                self._copy_layer(layer, "swap_out_ahead", to_cpu=True)
            if self.plan.ahead_batch:
                self.ahead.append((self.plan.ahead_batch, None))  # done already
            return
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for layer in range(len(self.gpu)):
                self._copy_layer(layer, "swap_out_ahead", to_cpu=True)
            if self.plan.ahead_batch:
                event = torch.cuda.Event()
                event.record(self.stream)
                self.ahead.append((self.plan.ahead_batch, event))
        # A swap-in's source CPU block is freed after this step; its next use is a
        # swap-out on this same stream, which runs after the read: no host wait.

    def wait_all(self) -> None:
        """Compute waits for every in-step copy of this step before its first layer."""
        self.wait_for_layer(len(self.gpu) - 1)  # the copy stream runs the layers in order

    def finish_without_compute(self) -> None:
        self.wait_all()
        self.after_forward()

    def _id_tensors(self, pairs: list[tuple[int, int]]):
        """(src ids, dst ids) of a list of pairs, on the device the copy kernel runs on."""
        if not pairs:
            return None
        ids = torch.tensor(pairs, dtype=torch.int64).t().contiguous()
        if self.cuda and self.impl == "kernel":
            with torch.cuda.stream(self.stream):  # ordered before this stream's copies
                ids = ids.pin_memory().to(self.device, non_blocking=True)
        return ids[0], ids[1]

    def _copy_layer(self, layer: int, kind: str, to_cpu: bool) -> None:
        """Copy one layer's blocks of a plan's list (``kind``): in-step copies with the kernel's
        full width, ahead-of-time swap-outs with ``ahead_programs``."""
        pairs = getattr(self.plan, kind)
        if not pairs:
            return
        src_caches, dst_caches = (self.gpu, self.cpu) if to_cpu else (self.cpu, self.gpu)
        src_ids, dst_ids = self.ids[kind]
        for src, dst in zip(src_caches[layer], dst_caches[layer]):
            if not self.cuda:
                dst.index_copy_(0, dst_ids, src.index_select(0, src_ids))
            elif not (self.impl == "kernel" and self._kernel_copy(src, dst, src_ids, dst_ids,
                                                                  self.ahead_programs if kind == "swap_out_ahead"
                                                                  else self.programs)):
                if kind not in self.runs:  # computed once per step, used by every layer
                    self.runs[kind] = _runs(pairs)
                for s, d, n in self.runs[kind]:  # pinned <-> device DMA, one per run of adjacent ids
                    dst[d:d + n].copy_(src[s:s + n], non_blocking=True)

    def _kernel_copy(self, src, dst, src_ids, dst_ids, programs: int | None) -> bool:
        """One swap-kernel launch; False (and DMA from then on) if the driver refuses it."""
        try:
            swap_blocks(src, dst, src_ids, dst_ids, impl="triton", max_programs=programs)
            return True
        except ValueError as e:  # e.g. a driver that cannot map the pinned tier into the GPU
            log.warning("swap kernel unavailable (%s); copying with DMA from now on", e)
            self.impl = "dma"
            return False


def _runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Maximal runs (src start, dst start, length) where both ids step by one."""
    runs: list[list[int]] = []
    for s, d in pairs:
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1][2] += 1
        else:
            runs.append([s, d, 1])
    return [tuple(r) for r in runs]
