"""Model runner: owns the model and the paged KV cache; turns a SchedulerOutput
into one forward pass and returns the logits of the rows that sample."""
from __future__ import annotations

import logging
import time

import torch

from pensieve.kernels import paged_attention, prepare_paged_attention, resolve_impl, swap_blocks

from .cache_manager import SwapPlan
from .checkpoint import load_model
from .config import EngineConfig
from .cuda_graphs import DecodeGraphs, staged_copy
from .models import AttentionMetadata
from .scheduler import SchedulerOutput
from .step_inputs import StepInputs, build_step_inputs, resolve_placeholders

log = logging.getLogger("pensieve.engine")

CPU_DEFAULT_CACHE_BYTES = 2 << 30  # the "GPU tier" on a CPU-only machine


class ModelRunner:
    def __init__(self, config: EngineConfig, model_cfg: dict, device: torch.device, dtype: torch.dtype,
                 max_model_len: int):
        self.config = config
        self.device, self.dtype = device, dtype
        self.block_size = config.block_size
        self.model = load_model(config.model, model_cfg, device, dtype, config.load_format, config.seed)
        self.num_layers = len(self.model.layers)
        self.num_kv_heads, self.head_dim = self.model.num_kv_heads, self.model.head_dim
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cpu_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_heads = model_cfg["num_attention_heads"]
        try:  # decided once here ("triton" or "ref") and passed down to every kernel call
            self.attention_impl = resolve_impl(config.attention_impl, device)
        except ValueError as e:
            from .errors import InvalidRequestError
            raise InvalidRequestError(str(e), "attention_impl") from None
        self.uses_triton = self.attention_impl == "triton"
        self.swapper: Swapper | None = None
        self.graphs: DecodeGraphs | None = None
        if device.type == "cuda" and config.cuda_graphs:
            width = -(-max_model_len // self.block_size)
            self.graphs = DecodeGraphs(self, min(config.max_num_seqs, 256), width)
        self.staging = [torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)]
        self.turn = 0

    @property
    def bytes_per_block(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    # ---------------------------------------------------------------- sizing
    def profile_num_blocks(self, max_model_len: int) -> int:
        """Blocks that fit after weights and the activations of the largest step."""
        if self.device.type != "cuda":
            budget = int(CPU_DEFAULT_CACHE_BYTES * self.config.gpu_memory_utilization)
            return max(1, budget // self.bytes_per_block)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        tokens = self.config.max_num_batched_tokens
        seq_len = min(tokens, max_model_len)
        num_seqs = (tokens + seq_len - 1) // seq_len
        blocks_per_seq = (seq_len + self.block_size - 1) // self.block_size
        self.allocate_cache(num_seqs * blocks_per_seq)
        ids = torch.zeros(tokens, dtype=torch.long, device=self.device)
        positions = torch.arange(tokens, device=self.device) % seq_len
        block_tables = torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32, device=self.device).view(num_seqs, -1)
        slots = (torch.arange(tokens, device=self.device) // seq_len) * blocks_per_seq * self.block_size + positions
        q_start = torch.tensor([min(i * seq_len, tokens) for i in range(num_seqs + 1)], dtype=torch.int32, device=self.device)
        meta = AttentionMetadata(slots, block_tables, q_start, torch.zeros(num_seqs, dtype=torch.int32, device=self.device),
                                 impl=self.attention_impl)
        with torch.inference_mode():
            hidden = self.model(ids, positions, meta, self.kv_caches)
            self.model.compute_logits(hidden[-self.config.max_num_seqs:])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        # The decode graphs keep their activations for good: reserve what the largest one takes.
        graphs = self.graphs.measure_peak() if self.graphs is not None else 0
        cache_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in self.kv_caches)
        self.kv_caches = []
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        other_processes = total - free - torch.cuda.memory_reserved(self.device)
        usable = total * self.config.gpu_memory_utilization - (peak - cache_bytes) - graphs - other_processes
        num = int(usable // self.bytes_per_block)
        log.info("GPU sizing: total %.1f GiB, peak without cache %.2f GiB, decode graphs %.2f GiB, "
                 "%d blocks of %.2f MiB", total / 2**30, (peak - cache_bytes) / 2**30, graphs / 2**30, num,
                 self.bytes_per_block / 2**20)
        if num <= 0:
            raise RuntimeError("no GPU memory left for the KV cache; lower --max-num-batched-tokens "
                               "or raise --gpu-memory-utilization")
        return num

    def allocate_cache(self, num_blocks: int) -> None:
        shape = (num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self.kv_caches = [(torch.empty(shape, dtype=self.dtype, device=self.device),
                           torch.empty(shape, dtype=self.dtype, device=self.device)) for _ in range(self.num_layers)]

    def allocate_cpu_cache(self, num_blocks: int) -> None:
        """The CPU tier: same layout as the GPU cache, pinned when a GPU is attached.

        One host allocation for all layers, pinned in place (cudaHostRegister):
        the pinned-memory allocator would round each request up to a power of
        two and so could pin up to twice the configured CPU-tier bytes."""
        shape = (num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        per_tensor = num_blocks * self.block_size * self.num_kv_heads * self.head_dim
        self.cpu_buffer = HostBuffer(2 * self.num_layers * per_tensor, self.dtype, pin=self.device.type == "cuda")
        flat = self.cpu_buffer.tensor
        views = [flat[i * per_tensor:(i + 1) * per_tensor].view(shape) for i in range(2 * self.num_layers)]
        self.cpu_caches = [(views[2 * i], views[2 * i + 1]) for i in range(self.num_layers)]
        self.swapper = Swapper(self.kv_caches, self.cpu_caches, self.device, self.config.swap_impl)

    @torch.inference_mode()
    def time_chunk(self, position: int, repeats: int = 3) -> float:
        """Seconds for one chunk's forward pass at context ``position`` (the cost profile).
        Uses the first blocks of the GPU cache as scratch: call before serving."""
        bs = self.block_size
        n_blocks = (position + bs) // bs + 1
        if n_blocks > self.kv_caches[0][0].shape[0]:
            raise ValueError(f"profiling position {position} needs {n_blocks} blocks")
        dev = self.device
        ids = torch.randint(0, 100, (bs,), device=dev)
        positions = torch.arange(position, position + bs, device=dev)
        meta = AttentionMetadata(positions.clone(), torch.arange(n_blocks, dtype=torch.int32, device=dev)[None],
                                 torch.tensor([0, bs], dtype=torch.int32, device=dev),
                                 torch.tensor([position], dtype=torch.int32, device=dev), impl=self.attention_impl)
        times = []
        for _ in range(repeats + 1):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            start = time.perf_counter()
            self.model.compute_logits(self.model(ids, positions, meta, self.kv_caches)[-1:])
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - start)
        return sorted(times[1:])[len(times[1:]) // 2]

    # ---------------------------------------------------------------- start-up
    @torch.inference_mode()
    def warm_up(self, max_num_batched_tokens: int) -> None:
        """Compile every kernel variant the serving path can take and capture the
        decode graphs, before the first request: prefill-only, mixed and
        decode-only steps (each split count of the decode kernel). Call after the
        caches are allocated; writes nothing into the cache (slots -1)."""
        if self.device.type != "cuda":
            return
        t0 = time.perf_counter()
        prefill = min(max_num_batched_tokens, 256)
        self._dummy_forward([prefill])                     # large tiles only
        self._dummy_forward([max(2, prefill - 4), 1, 1, 1])  # large and small tiles
        if self.attention_impl == "triton":
            self._warm_decode_splits()
        if self.swapper is not None and self.cpu_caches and self.cpu_caches[0][0].shape[0]:
            self._warm_swap()
        compiled = time.perf_counter() - t0
        if self.graphs is not None:
            self.graphs.capture()
        torch.cuda.synchronize(self.device)
        log.info("warm-up: kernels compiled in %.1f s, %.1f s in all", compiled, time.perf_counter() - t0)

    def _dummy_forward(self, q_lens: list[int]) -> None:
        dev = self.device
        t = sum(q_lens)
        starts = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
        pos_start = torch.zeros(len(q_lens), dtype=torch.int32)
        positions = torch.cat([torch.arange(n) for n in q_lens]).to(dev)
        width = -(-max(q_lens) // self.block_size)
        meta = AttentionMetadata(torch.full((t,), -1, dtype=torch.int64, device=dev),
                                 torch.zeros((len(q_lens), width), dtype=torch.int32, device=dev),
                                 starts.to(dev), pos_start.to(dev), impl=self.attention_impl)
        if self.attention_impl == "triton":
            meta.kernel_plan = prepare_paged_attention(starts, pos_start, self.num_heads, self.num_kv_heads, device=dev)
        hidden = self.model(torch.zeros(t, dtype=torch.int64, device=dev), positions, meta, self.kv_caches)
        self.model.compute_logits(hidden[-1:]).float()

    def _warm_decode_splits(self) -> None:
        """The decode kernel with every split count an eager decode step may choose."""
        from pensieve.kernels.triton_attention import SPLIT_CHOICES

        dev = self.device
        k_cache, v_cache = self.kv_caches[0]
        q = torch.zeros((2, self.num_heads, self.head_dim), dtype=self.dtype, device=dev)
        starts, pos = torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([0, 0], dtype=torch.int32)
        table = torch.zeros((2, 1), dtype=torch.int32, device=dev)
        for splits in SPLIT_CHOICES:
            plan = prepare_paged_attention(starts, pos, self.num_heads, self.num_kv_heads, device=dev,
                                           num_splits=splits)
            paged_attention(q, k_cache, v_cache, table, starts.to(dev), pos.to(dev), 1.0, impl="triton",
                            metadata=plan)

    def _warm_swap(self) -> None:
        """One block out to the CPU tier and back (start-up: the cache holds nothing yet)."""
        plan = SwapPlan(swap_out=[(0, 0)], swap_in=[(0, 0)])
        self.swapper.begin(plan)
        self.swapper.finish_without_compute()
        torch.cuda.synchronize(self.device)
        self.swapper.ahead_done = None

    # ---------------------------------------------------------------- step
    def prepare(self, out: SchedulerOutput, prev_tokens: torch.Tensor | None = None
                ) -> tuple[StepInputs, dict, AttentionMetadata]:
        """Pack the step on the host and copy it to the device in one transfer."""
        inputs = build_step_inputs(out, self.block_size)
        if self.device.type == "cuda":
            buf = staged_copy(inputs.packed, self.staging, self.turn, self.device)
            self.turn ^= 1
        else:
            buf = torch.from_numpy(inputs.packed)
        v = inputs.device_views(buf)
        if inputs.has_placeholders:
            resolve_placeholders(v["input_ids"], prev_tokens)
        meta = AttentionMetadata(v["slots"], v["block_tables"], v["seg_q_start"], v["seg_pos_start"],
                                 impl=self.attention_impl)
        if self.uses_triton:
            meta.kernel_plan = prepare_paged_attention(torch.from_numpy(inputs.seg_q_start),
                                                       torch.from_numpy(inputs.seg_pos_start),
                                                       self.num_heads, self.num_kv_heads, device=self.device)
        return inputs, v, meta

    def copies_done(self) -> bool:
        """Have all ahead-of-time swap-outs completed? (Polls an event; never waits.)"""
        return self.swapper is None or self.swapper.ahead_done is None or self.swapper.ahead_done.query()

    def _graph_batch(self, out: SchedulerOutput, blocking_swaps: bool, all_logits: bool) -> int | None:
        """The padded batch size of a decode graph that can run this step, if any."""
        if self.graphs is None or blocking_swaps or all_logits or not out.chunks:
            return None
        if not all(c.num_tokens == 1 and not c.recompute and c.samples for c in out.chunks):
            return None
        return self.graphs.batch_size_for(len(out.chunks))

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, all_logits: bool = False,
                prev_tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run one step: the swaps it plans and its forward pass. Returns float32
        logits of the sampling rows, in chunk order (every token's when ``all_logits``).
        ``prev_tokens``: the previous step's sampled ids, on the device (input ids
        that are placeholders are read from there)."""
        swaps = out.swaps
        has_swaps = bool(swaps.swap_in or swaps.swap_out or swaps.swap_out_ahead)
        blocking = bool(swaps.swap_in or swaps.swap_out)  # layers must wait for these copies
        if has_swaps and self.swapper is None:
            raise RuntimeError("swaps planned but no CPU tier is allocated")
        if swaps.wait_for_copies:
            self.swapper.wait_ahead()  # a block this step rewrites may still be read by an ahead copy
        if has_swaps:
            self.swapper.begin(swaps)
        if not out.chunks:
            if has_swaps:
                self.swapper.finish_without_compute()
            return None
        graph_batch = self._graph_batch(out, blocking, all_logits)
        if graph_batch is not None:
            inputs = build_step_inputs(out, self.block_size, pad_to=graph_batch, width=self.graphs.width)
            logits = self.graphs.run(inputs, prev_tokens)[:len(out.chunks)]
        else:
            inputs, v, meta = self.prepare(out, prev_tokens)
            if blocking:
                meta.wait_for_layer = self.swapper.wait_for_layer
            hidden = self.model(v["input_ids"], v["positions"], meta, self.kv_caches)
            if not all_logits:
                rows = torch.tensor(inputs.sample_rows, dtype=torch.long).to(hidden.device, non_blocking=True)
                hidden = hidden.index_select(0, rows)
            logits = self.model.compute_logits(hidden).float()
        if has_swaps:
            self.swapper.after_forward()
        return logits


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
    rewrites a block one of them may still be reading (``SwapPlan.wait_for_copies``,
    set by the cache manager, which polls ``ahead_done`` through the runner); on
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
        self.ahead_done = None
        self.plan: SwapPlan | None = None
        self.ids: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.programs: int | None = None  # swap kernel's programs (None: the kernel's default)
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

    def wait_ahead(self) -> None:
        """The compute stream waits for every ahead-of-time swap-out issued so far (the
        copy stream runs them in order): a slot one of them reads is rewritten this step."""
        if self.cuda and self.ahead_done is not None:
            torch.cuda.current_stream().wait_event(self.ahead_done)
            self.ahead_done = None

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
            return
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for layer in range(len(self.gpu)):
                self._copy_layer(layer, "swap_out_ahead", to_cpu=True)
            self.ahead_done = torch.cuda.Event()
            self.ahead_done.record(self.stream)
        # A swap-in's source CPU block is freed after this step; its next use is a
        # swap-out on this same stream, which runs after the read: no host wait.

    def finish_without_compute(self) -> None:
        if self.cuda:
            for layer in range(len(self.gpu)):
                torch.cuda.current_stream().wait_event(self.events[layer])
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
        pairs = getattr(self.plan, kind)
        if not pairs:
            return
        src_caches, dst_caches = (self.gpu, self.cpu) if to_cpu else (self.cpu, self.gpu)
        src_ids, dst_ids = self.ids[kind]
        for src, dst in zip(src_caches[layer], dst_caches[layer]):
            if not self.cuda:
                dst.index_copy_(0, dst_ids, src.index_select(0, src_ids))
            elif not (self.impl == "kernel" and self._kernel_copy(src, dst, src_ids, dst_ids)):
                if kind not in self.runs:  # computed once per step, used by every layer
                    self.runs[kind] = _runs(pairs)
                for s, d, n in self.runs[kind]:  # pinned <-> device DMA, one per run of adjacent ids
                    dst[d:d + n].copy_(src[s:s + n], non_blocking=True)

    def _kernel_copy(self, src, dst, src_ids, dst_ids) -> bool:
        """One swap-kernel launch; False (and DMA from then on) if the driver refuses it."""
        try:
            swap_blocks(src, dst, src_ids, dst_ids, impl="triton", max_programs=self.programs)
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
