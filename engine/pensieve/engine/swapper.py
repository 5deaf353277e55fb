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


def layer_views(stack: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (K, V) views of a cache stack [2 * num_layers, num_blocks, ...]."""
    return [(stack[2 * i], stack[2 * i + 1]) for i in range(stack.shape[0] // 2)]


def layer_groups(num_layers: int) -> list[range]:
    """Layers in groups of 1, 1, 2, 4, 8, ... (the last one takes the rest): 6 groups for 32 layers.

    In-step copies are launched once per group, with one event each. A layer waits only for
    its group's copies; group g + 1 is as large as every group before it together, so while
    the copy stream moves it, compute runs through those earlier layers. The overlap is the
    per-layer one's whenever a layer's copy is faster than its compute; 64 launches a step
    (a layer's K and V each) became 6 on the Llama-3-8B shape (issue 12: pensieve mode's cost
    on the H200 was host time)."""
    groups: list[range] = []
    start, size = 0, 1
    while start < num_layers:
        end = min(num_layers, start + size)
        groups.append(range(start, end))
        if len(groups) > 1:
            size *= 2
        start = end
    return groups


class Swapper:
    """Performs a step's block copies between the GPU cache and the CPU tier.

    Ownership: the runner owns the Swapper and both caches; the cache manager decides what
    moves (``SwapPlan``). Both caches are stacks [2 * num_layers, num_blocks, ...] whose
    entries 2i and 2i + 1 are layer i's K and V (``gpu``/``cpu`` hold their per-layer views),
    so one launch copies the same blocks of any run of layers.

    Per group of layers (``layer_groups``): urgent swap-outs (GPU blocks about to be
    rewritten this step) first, then swap-ins, then one event; a layer's attention waits only
    for its group's event. Ahead-of-time swap-outs run after the forward pass has been
    issued, one launch for every layer, so swap-in goes first on the link. On CUDA the copies
    run on their own stream. Compute waits for ahead-of-time copies only in a step that
    rewrites a block one of them may still be reading, and then only for the batches up to
    that block's (``SwapPlan.wait_for_batch``, set by the cache manager, which learns of
    completed batches through ``completed_batch``); on CPU the same calls run synchronously,
    layer by layer, in the same order.

    CUDA copy implementations (``swap_impl``): ``kernel`` moves a group's blocks in one
    launch, the GPU reading or writing the pinned CPU tier directly; ``dma`` issues one async
    copy per run of adjacent block ids, per layer and tensor.
    """

    def __init__(self, gpu_stack: torch.Tensor, cpu_stack: torch.Tensor, device: torch.device,
                 impl: str = "auto"):
        if gpu_stack.shape[0] != cpu_stack.shape[0] or gpu_stack.shape[0] % 2:
            raise ValueError("the GPU and CPU stacks must hold K and V of the same layers")
        self.gpu_stack, self.cpu_stack = gpu_stack, cpu_stack
        self.gpu, self.cpu = layer_views(gpu_stack), layer_views(cpu_stack)
        self.groups = layer_groups(len(self.gpu))
        self.group_of = [g for g, group in enumerate(self.groups) for _ in group]
        self.cuda = device.type == "cuda"
        self.device = device
        self.impl = "kernel" if impl == "auto" else impl
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.events: list = []  # one per group of layers, this step's in-step copies
        self.waited = -1  # the last group whose event compute waits for in this step
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
        self.runs = {}
        self.waited = -1
        if not self.cuda:
            self.done_layers = -1
            return
        self.stream.wait_stream(torch.cuda.current_stream())  # copies read what earlier steps wrote
        self.events = []
        if not (plan.swap_out or plan.swap_in):
            return
        with torch.cuda.stream(self.stream):
            for group in self.groups:
                self._copy(group, "swap_out", to_cpu=True)
                self._copy(group, "swap_in", to_cpu=False)
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
        """Compute waits for the in-step copies of ``layer`` (on CUDA: its group's event, once)."""
        if self.cuda:
            group = self.group_of[layer]
            if group > self.waited and self.events:
                torch.cuda.current_stream().wait_event(self.events[group])
                self.waited = group
            return
        while self.done_layers < layer:  # CPU: copy up to this layer now
            self.done_layers += 1
            self._copy(range(self.done_layers, self.done_layers + 1), "swap_out", to_cpu=True)
            self._copy(range(self.done_layers, self.done_layers + 1), "swap_in", to_cpu=False)

    def after_forward(self) -> None:
        everything = range(len(self.gpu))
        if not self.cuda:
            self.wait_for_layer(len(self.gpu) - 1)
            self._copy(everything, "swap_out_ahead", to_cpu=True)
            if self.plan.ahead_batch:
                self.ahead.append((self.plan.ahead_batch, None))  # done already
            return
        if not self.plan.swap_out_ahead:
            return
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self._copy(everything, "swap_out_ahead", to_cpu=True)
            if self.plan.ahead_batch:
                event = torch.cuda.Event()
                event.record(self.stream)
                self.ahead.append((self.plan.ahead_batch, event))
        # A swap-in's source CPU block is freed after this step; its next use is a
        # swap-out on this same stream, which runs after the read: no host wait.

    def wait_all(self) -> None:
        """Compute waits for every in-step copy of this step before its first layer."""
        self.wait_for_layer(len(self.gpu) - 1)  # the copy stream runs the groups in order

    def finish_without_compute(self) -> None:
        self.wait_all()
        self.after_forward()

    def _id_tensors(self, pairs: list[tuple[int, int]]):
        """(src ids, dst ids) of a list of pairs, on the device the copy kernel runs on. The rows
        are padded to a multiple of 8 ids, so both start 64-byte aligned whatever the count (the
        kernel's compiled variant depends on its pointers' alignment: no compile while serving)."""
        if not pairs:
            return None
        n = len(pairs)
        ids = torch.zeros((2, -(-n // 8) * 8), dtype=torch.int64)
        ids[:, :n] = torch.tensor(pairs, dtype=torch.int64).t()
        if self.cuda and self.impl == "kernel":
            with torch.cuda.stream(self.stream):  # ordered before this stream's copies
                ids = ids.pin_memory().to(self.device, non_blocking=True)
        return ids[0, :n], ids[1, :n]

    def _copy(self, layers: range, kind: str, to_cpu: bool) -> None:
        """Copy the blocks of a plan's list (``kind``) for a run of layers: in-step copies with
        the kernel's full width, ahead-of-time swap-outs with ``ahead_programs``."""
        pairs = getattr(self.plan, kind)
        if not pairs:
            return
        src_ids, dst_ids = self.ids[kind]
        if self.cuda and self.impl == "kernel":
            tensors = slice(2 * layers.start, 2 * layers.stop)
            src, dst = (self.gpu_stack, self.cpu_stack) if to_cpu else (self.cpu_stack, self.gpu_stack)
            programs = self.ahead_programs if kind == "swap_out_ahead" else self.programs
            if self._kernel_copy(src[tensors], dst[tensors], src_ids, dst_ids, programs):
                return
        src_caches, dst_caches = (self.gpu, self.cpu) if to_cpu else (self.cpu, self.gpu)
        for layer in layers:
            for src, dst in zip(src_caches[layer], dst_caches[layer]):
                if not self.cuda:
                    dst.index_copy_(0, dst_ids, src.index_select(0, src_ids))
                    continue
                if kind not in self.runs:  # computed once per step, used by every layer
                    self.runs[kind] = _runs(pairs)
                for s, d, n in self.runs[kind]:  # pinned <-> device DMA, one per run of adjacent ids
                    dst[d:d + n].copy_(src[s:s + n], non_blocking=True)

    def _kernel_copy(self, src, dst, src_ids, dst_ids, programs: int | None) -> bool:
        """One swap-kernel launch over stacked caches; False (and DMA from then on) if the
        driver refuses it."""
        try:
            swap_blocks(src, dst, src_ids, dst_ids, impl="triton", max_programs=programs, stacked=True)
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
