"""Model runner: owns the model and the paged KV cache; turns a SchedulerOutput
into one forward pass and returns the logits of the rows that sample."""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from pensieve.kernels import paged_attention, prepare_paged_attention, resolve_impl

from .cache_manager import SwapPlan
from .checkpoint import load_model
from .config import EngineConfig
from .cuda_graphs import DecodeGraphs
from .pinned import PinnedPair
from .models import AttentionMetadata
from .parallel import SINGLE, TensorParallel
from .scheduler import SchedulerOutput
from .step_inputs import StepInputs, build_step_inputs, packed_size, resolve_placeholders, split_views
from .swapper import HostBuffer, Swapper, layer_views

log = logging.getLogger("pensieve.engine")

CPU_DEFAULT_CACHE_BYTES = 2 << 30  # the "GPU tier" on a CPU-only machine


class ModelRunner:
    """Owns this rank's model shard and its shard of both cache tiers. With tensor
    parallelism (``tp.enabled``) every rank has one: rank 0's ``execute`` broadcasts
    each step (``tp_step.py``) and runs it; the other ranks run ``serve_steps``."""

    def __init__(self, config: EngineConfig, model_cfg: dict, device: torch.device, dtype: torch.dtype,
                 max_model_len: int, tp: TensorParallel = SINGLE):
        self.config = config
        self.tp = tp
        self.device, self.dtype = device, dtype
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.model = load_model(config.model, model_cfg, device, dtype, config.load_format, config.seed, tp)
        self.num_layers = len(self.model.layers)
        # this rank's heads: the KV cache and both tiers hold num_kv_heads / N heads per block
        self.num_kv_heads, self.head_dim = self.model.num_kv_heads, self.model.head_dim
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []  # views of gpu_stack
        self.gpu_stack: torch.Tensor | None = None
        self.cpu_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_heads = self.model.num_heads
        try:  # decided once here ("triton" or "ref") and passed down to every kernel call
            self.attention_impl = resolve_impl(config.attention_impl, device)
        except ValueError as e:
            from .errors import InvalidRequestError
            raise InvalidRequestError(str(e), "attention_impl") from None
        self.uses_triton = self.attention_impl == "triton"
        self.swapper: Swapper | None = None
        width = -(-max_model_len // self.block_size)
        # Step inputs go through pinned memory sized for the largest step (a request may
        # contribute two segments: a recompute and its new tokens).
        largest = packed_size(config.max_num_batched_tokens, 2 * config.max_num_seqs, width)
        self.staging = PinnedPair(largest, torch.int32, pin=device.type == "cuda")
        # the eager steps' attention launch plans, staged in turn like the inputs (a pinned buffer
        # allocated per step can make the host wait for the device); sized for the largest plan
        segs = 2 * config.max_num_seqs
        self.plan_staging = PinnedPair(3 * config.max_num_batched_tokens + 6 * segs + 128, torch.int32,
                                       pin=device.type == "cuda")
        self.graphs: DecodeGraphs | None = None
        self.last_path = "eager"  # how the last step ran: graph, eager or eager_for_copies
        if device.type == "cuda" and config.cuda_graphs:  # every rank captures the same graphs
            self.graphs = DecodeGraphs(self, min(config.max_num_seqs, 256), width, self.staging)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block on this rank (its KV heads)."""
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    @property
    def pod_bytes_per_block(self) -> int:
        """Bytes of one block over all ranks (every rank holds the same block ids)."""
        return self.bytes_per_block * self.tp.world_size

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
        self.kv_caches, self.gpu_stack = [], None
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
        """The GPU cache: one stack [2 * num_layers, num_blocks, block_size, kv_heads, head_dim]
        (layer i's K and V at 2i and 2i + 1), so that a swap copies a run of layers in one launch;
        ``kv_caches`` holds the per-layer views the model reads."""
        self.gpu_stack = torch.empty((2 * self.num_layers, num_blocks, self.block_size, self.num_kv_heads,
                                      self.head_dim), dtype=self.dtype, device=self.device)
        self.kv_caches = layer_views(self.gpu_stack)

    def allocate_cpu_cache(self, num_blocks: int) -> None:
        """The CPU tier: the GPU cache's stacked layout, pinned when a GPU is attached.

        One host allocation for all layers, pinned in place (cudaHostRegister):
        the pinned-memory allocator would round each request up to a power of
        two and so could pin up to twice the configured CPU-tier bytes."""
        shape = (2 * self.num_layers, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self.cpu_buffer = HostBuffer(math.prod(shape), self.dtype, pin=self.device.type == "cuda")
        stack = self.cpu_buffer.tensor.view(shape)
        self.swapper = Swapper(self.gpu_stack, stack, self.device, self.config.swap_impl)
        self.cpu_caches = self.swapper.cpu
        self.swapper.ahead_programs = self.config.swap_ahead_programs

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
        # The largest step's activations and logits: the caching allocator keeps their blocks, so
        # serving never calls cudaMalloc (on the H200 a step that did stalled the host for about
        # two steps' time, in the middle of the next step's launch).
        rows = max(1, min(self.config.max_num_seqs, max_num_batched_tokens // 2))
        self._dummy_forward([max_num_batched_tokens - rows + 1] + [1] * (rows - 1), sampled_rows=rows)
        self._warm_gemm_shapes(max_num_batched_tokens, rows)
        compiled = time.perf_counter() - t0
        if self.graphs is not None:
            self.graphs.capture()
        torch.cuda.synchronize(self.device)
        log.info("warm-up: kernels compiled in %.1f s, %.1f s in all", compiled, time.perf_counter() - t0)

    def _dummy_forward(self, q_lens: list[int], sampled_rows: int = 1) -> None:
        dev = self.device
        t = sum(q_lens)
        starts = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
        pos_start = torch.zeros(len(q_lens), dtype=torch.int32)
        # (positions stay inside the model's tables: OPT's learned positions are only max_model_len long)
        positions = (torch.cat([torch.arange(n) for n in q_lens]) % self.max_model_len).to(dev)
        width = -(-max(q_lens) // self.block_size)
        meta = AttentionMetadata(torch.full((t,), -1, dtype=torch.int64, device=dev),
                                 torch.zeros((len(q_lens), width), dtype=torch.int32, device=dev),
                                 starts.to(dev), pos_start.to(dev), impl=self.attention_impl)
        if self.attention_impl == "triton":
            meta.kernel_plan = prepare_paged_attention(starts, pos_start, self.num_heads, self.num_kv_heads, device=dev)
        hidden = self.model(torch.zeros(t, dtype=torch.int64, device=dev), positions, meta, self.kv_caches)
        self.model.compute_logits(hidden[-sampled_rows:]).float()

    def _warm_gemm_shapes(self, max_tokens: int, max_rows: int) -> None:
        """Every matmul shape an eager step can launch: one layer's projections for each token
        count, the LM head for each count of sampled rows (the engine warms the sampler). cuBLAS picks a
        kernel per shape, and the driver loads a kernel at its first launch (lazy module loading)
        after waiting for the device: on the H200 a step whose LM head met a new row count
        blocked the host for two steps' time, and the device then idled while it launched."""
        linears = {}
        for mod in self.model.layers[0].modules():
            if isinstance(mod, torch.nn.Linear):
                linears[tuple(mod.weight.shape)] = mod
        xs = {k: torch.zeros(max_tokens, mod.weight.shape[1], dtype=self.dtype, device=self.device)
              for k, mod in linears.items()}
        # every count up to 1024, then every 4th: cuBLAS's choice changes with M in steps of tiles
        for m in sorted({*range(1, min(max_tokens, 1024) + 1), *range(1028, max_tokens + 1, 4), max_tokens}):
            for k, mod in linears.items():
                mod(xs[k][:m])  # the module's own forward: bias epilogue (and all-reduce) as when serving
        hidden = torch.zeros(max_rows, self.model.lm_head.weight.shape[1], dtype=self.dtype, device=self.device)
        for m in range(1, max_rows + 1):
            self.model.compute_logits(hidden[:m]).float()

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
        self.swapper.ahead.clear()

    # ---------------------------------------------------------------- step
    def pack(self, out: SchedulerOutput, all_logits: bool) -> tuple[StepInputs, bool]:
        """The step's inputs packed on the host, and whether they replay a decode graph (then
        padded to its batch and width); sets ``last_path``."""
        graph_batch = self.choose_path(out, all_logits)
        if graph_batch is None:
            return build_step_inputs(out, self.block_size), False
        return build_step_inputs(out, self.block_size, pad_to=graph_batch, width=self.graphs.width), True

    def to_device(self, packed: np.ndarray) -> torch.Tensor:
        """Packed inputs on the device: one copy from pinned memory (no host wait on CUDA)."""
        if self.device.type != "cuda":
            return torch.from_numpy(packed)
        host = self.staging.next(packed.size)
        host.numpy()[:] = packed
        return host.to(self.device, non_blocking=True)

    def copies_done(self) -> int:
        """The newest ahead-of-time copy batch now known complete, 0 if none since the last call
        (polls events; never waits)."""
        return 0 if self.swapper is None else self.swapper.completed_batch()

    def _graph_batch(self, out: SchedulerOutput, all_logits: bool) -> int | None:
        """The padded batch size of a decode graph that could run this step (copies aside), if any."""
        if self.graphs is None or all_logits or not out.chunks:
            return None
        if not all(c.num_tokens == 1 and not c.recompute and c.samples for c in out.chunks):
            return None
        return self.graphs.batch_size_for(len(out.chunks))

    def choose_path(self, out: SchedulerOutput, all_logits: bool) -> int | None:
        """The padded batch of the decode graph this step replays, or None (eager); sets
        ``last_path``. A step that admits swap-ins runs eagerly (its layers wait one by one)."""
        decode_graph = self._graph_batch(out, all_logits)
        graph_batch = None if out.swaps.swap_in else decode_graph
        # for pensieve_engine_steps_total: a decode step that runs eagerly only because its layers
        # wait for swap-ins is counted apart
        self.last_path = "graph" if graph_batch is not None else (
            "eager_for_copies" if decode_graph is not None else "eager")
        return graph_batch

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, all_logits: bool = False,
                prev_tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run one step: the swaps it plans and its forward pass. Returns float32
        logits of the sampling rows, in chunk order (every token's when ``all_logits``).
        ``prev_tokens``: the previous step's sampled ids, on the device (input ids
        that are placeholders are read from there)."""
        if self.tp.enabled:
            from .tp_step import broadcast_step, run_step
            return run_step(self, *broadcast_step(self, out, all_logits, prev_tokens))
        if out.swaps.wait_for_batch:  # a block rewritten here may still be read by an ahead-of-time copy
            self.swapper.wait_ahead(out.swaps.wait_for_batch)
        if not out.chunks:
            return self.run_packed(out.swaps, None, all_logits=all_logits)
        inputs, graph = self.pack(out, all_logits)
        return self.run_packed(out.swaps, inputs.packed, (inputs.num_tokens, inputs.num_segments, inputs.width),
                               len(inputs.sample_rows), graph, all_logits,
                               prev_tokens if inputs.has_placeholders else None)

    def run_packed(self, swaps: SwapPlan, packed: np.ndarray | None, shape: tuple[int, int, int] = (0, 0, 0),
                   rows: int = 0, graph: bool = False, all_logits: bool = False,
                   prev_tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        """A step on this rank from its packed inputs (``step_inputs.py`` layout of ``shape`` =
        T, S, W; None: a step of copies alone): the swaps on this rank's shard of the tiers, then
        the decode graph's replay (``graph``) or the eager forward pass. Returns the float32 logits
        of the first ``rows`` sampled rows (every row's when ``all_logits``). ``prev_tokens``: the
        previous step's tokens, given when some input ids are placeholders for them."""
        has_swaps = bool(swaps.swap_in or swaps.swap_out or swaps.swap_out_ahead)
        if has_swaps and self.swapper is None:
            raise RuntimeError("swaps planned but no CPU tier is allocated")
        if has_swaps:
            self.swapper.begin(swaps)
        if packed is None:
            if has_swaps:
                self.swapper.finish_without_compute()
            return None
        t, s, w = shape
        if graph:
            # A decode step whose only in-step copies are swap-outs (a decode needed a block and an
            # idle chunk without a CPU copy gave it up) waits for all of them up front and replays
            # its graph: a few blocks' copy costs less than an eager step. Swap-ins never ride a
            # graph (choose_path): such a step admits a request, mostly with a prefill.
            if swaps.swap_out:
                self.swapper.wait_all()
            logits = self.graphs.replay(packed, t, prev_tokens)[:rows]
        else:
            v = split_views(self.to_device(packed), t, s, w)
            host = split_views(packed, t, s, w)
            if prev_tokens is not None:
                resolve_placeholders(v["input_ids"], prev_tokens)
            meta = AttentionMetadata(v["slots"], v["block_tables"], v["seg_q_start"], v["seg_pos_start"],
                                     impl=self.attention_impl)
            if swaps.swap_in or swaps.swap_out:  # the layers wait for these copies one by one
                meta.wait_for_layer = self.swapper.wait_for_layer
            if self.uses_triton:
                meta.kernel_plan = prepare_paged_attention(torch.from_numpy(host["seg_q_start"]),
                                                           torch.from_numpy(host["seg_pos_start"]),
                                                           self.num_heads, self.num_kv_heads, device=self.device,
                                                           staging=self.plan_staging.next)
            hidden = self.model(v["input_ids"], v["positions"], meta, self.kv_caches)
            if not all_logits:
                hidden = hidden.index_select(0, v["sample_rows"][:rows])
            logits = self.model.compute_logits(hidden).float()
        if has_swaps:
            self.swapper.after_forward()
        return logits

    # ---------------------------------------------------------------- tensor parallelism
    def serve_steps(self) -> None:
        """Ranks 1..N-1: execute the steps rank 0 broadcasts, until it says stop."""
        from .tp_step import receive_step, run_step

        while True:
            step = receive_step(self)
            if step is None:
                return
            run_step(self, *step)

    def stop_workers(self) -> None:
        """Rank 0: tell the other ranks to leave ``serve_steps``."""
        from .tp_step import send_stop

        send_stop(self)

    def release_graphs(self) -> None:
        """Free the decode graphs (the runner serves no step after this). Under tensor parallelism
        every rank calls it before leaving the group: NCCL does not destroy a communicator while
        graphs that captured its collectives still exist (it waits for them, forever)."""
        if self.graphs is None:
            return
        torch.cuda.synchronize(self.device)
        for graph, _, _ in self.graphs.graphs.values():
            graph.reset()
        self.graphs = None
