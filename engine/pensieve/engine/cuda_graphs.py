"""Decode steps replayed from CUDA graphs.

A decode step launches a few hundred small kernels whose inputs change only in
value, never in shape, once the batch is padded: the graph of each padded batch
size is captured at start-up and replayed with one host-to-device copy of the
step's packed inputs into the graph's static buffer (:mod:`.step_inputs`).

Ownership: the runner owns one DecodeGraphs. It reads the runner's model and
KV cache tensors at capture time; the cache must not be reallocated afterwards.
All graphs share one memory pool (captured largest first); its size is measured
before the KV cache is sized (``measure_peak``) and reserved there.
"""
from __future__ import annotations

import logging
import time

import torch

from pensieve.kernels import decode_graph_plan

from .models import AttentionMetadata
from .pinned import PinnedPair
from .step_inputs import packed_size, resolve_placeholders, split_views

log = logging.getLogger("pensieve.engine")

#: Padded batch sizes with a captured graph (those up to --max-num-seqs).
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)


class DecodeGraphs:
    def __init__(self, runner, max_batch: int, width: int, staging: PinnedPair):
        self.runner = runner
        sizes = [b for b in GRAPH_BATCH_SIZES if b < max_batch] + [min(max_batch, GRAPH_BATCH_SIZES[-1])]
        self.sizes = sorted(set(sizes))
        self.max_batch = self.sizes[-1]
        self.width = width
        n = packed_size(self.max_batch, self.max_batch, width)
        dev = runner.device
        self.buf = torch.zeros(n, dtype=torch.int32, device=dev)
        self.staging = staging  # the runner's pinned host buffers for step inputs
        # batch -> (graph, its logits output, its attention metadata). The metadata holds
        # the launch plan's device tensors, which the graph reads at every replay:
        # they must live as long as the graph.
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, AttentionMetadata]] = {}
        self.pool = None
        self.pool_bytes = 0

    def batch_size_for(self, num_seqs: int) -> int | None:
        for b in self.sizes:
            if b >= num_seqs:
                return b
        return None

    def _views_and_meta(self, batch: int):
        v = split_views(self.buf, batch, batch, self.width)
        r = self.runner
        plan = None
        if r.attention_impl == "triton":
            plan = decode_graph_plan(v["seg_q_start"], v["seg_pos_start"], batch, r.num_heads, r.num_kv_heads)
        meta = AttentionMetadata(v["slots"], v["block_tables"], v["seg_q_start"], v["seg_pos_start"],
                                 impl=r.attention_impl, kernel_plan=plan)
        return v, meta

    def _fill_dummy(self, batch: int) -> None:
        """A valid decode of ``batch`` sequences at position 0 that writes nothing (slots -1)."""
        v = split_views(self.buf, batch, batch, self.width)
        v["input_ids"].zero_()
        v["positions"].zero_()
        v["slots"].fill_(-1)
        v["seg_q_start"].copy_(torch.arange(batch + 1, dtype=torch.int32))
        v["seg_pos_start"].zero_()
        v["block_tables"].zero_()

    def _forward(self, v, meta) -> torch.Tensor:
        r = self.runner
        hidden = r.model(v["input_ids"], v["positions"], meta, r.kv_caches)
        return r.model.compute_logits(hidden).float()

    @torch.inference_mode()
    def measure_peak(self) -> int:
        """Bytes the largest graph's activations take (run eagerly over the current cache)."""
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        self._fill_dummy(self.max_batch)
        v, meta = self._views_and_meta(self.max_batch)
        self._forward(v, meta)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        before = torch.cuda.memory_reserved()
        for batch in reversed(self.sizes):
            self._fill_dummy(batch)
            v, meta = self._views_and_meta(batch)
            self._forward(v, meta)  # compiles this batch's kernel variants outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            # Under tensor parallelism the collectives are captured too (NCCL supports it); the
            # process group's watchdog thread queries events meanwhile, which a capture in the
            # default (global) mode would refuse: only this thread's calls are checked then.
            mode = "thread_local" if self.runner.tp.enabled else "global"
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode=mode):
                logits = self._forward(v, meta)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[batch] = (graph, logits, meta)
        torch.cuda.synchronize()
        self.pool_bytes = torch.cuda.memory_reserved() - before
        log.info("captured %d decode graphs (batch sizes %s) in %.1f s, %.0f MiB",
                 len(self.graphs), ",".join(map(str, self.sizes)), time.perf_counter() - t0, self.pool_bytes / 2**20)

    def replay(self, packed, batch: int, prev_tokens: torch.Tensor | None) -> torch.Tensor:
        """Replay the graph of ``batch`` rows from packed inputs padded to that captured size
        (``prev_tokens`` when some input ids are placeholders for them). Returns float32 logits
        of every row (padding rows included)."""
        graph, logits, _ = self.graphs[batch]
        n = packed.size
        host = self.staging.next(n)
        host.numpy()[:] = packed
        self.buf[:n].copy_(host, non_blocking=True)
        if prev_tokens is not None:
            resolve_placeholders(self.buf[:batch], prev_tokens)
        graph.replay()
        return logits

