"""Model runner: owns the model and the paged KV cache; turns a SchedulerOutput
into one forward pass and returns the logits of the rows that sample."""
from __future__ import annotations

import logging

import torch

from .checkpoint import load_model
from .config import EngineConfig
from .models import AttentionMetadata
from .scheduler import SchedulerOutput

log = logging.getLogger("pensieve.engine")

CPU_DEFAULT_CACHE_BYTES = 2 << 30  # the "GPU tier" on a CPU-only machine


class ModelRunner:
    def __init__(self, config: EngineConfig, model_cfg: dict, device: torch.device, dtype: torch.dtype):
        self.config = config
        self.device, self.dtype = device, dtype
        self.block_size = config.block_size
        self.model = load_model(config.model, model_cfg, device, dtype, config.load_format, config.seed)
        self.num_layers = len(self.model.layers)
        self.num_kv_heads, self.head_dim = self.model.num_kv_heads, self.model.head_dim
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.attention_impl = config.attention_impl

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
        cache_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in self.kv_caches)
        self.kv_caches = []
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        other_processes = total - free - torch.cuda.memory_reserved(self.device)
        usable = total * self.config.gpu_memory_utilization - (peak - cache_bytes) - other_processes
        num = int(usable // self.bytes_per_block)
        log.info("GPU sizing: total %.1f GiB, peak without cache %.2f GiB, %d blocks of %.2f MiB",
                 total / 2**30, (peak - cache_bytes) / 2**30, num, self.bytes_per_block / 2**20)
        if num <= 0:
            raise RuntimeError("no GPU memory left for the KV cache; lower --max-num-batched-tokens "
                               "or raise --gpu-memory-utilization")
        return num

    def allocate_cache(self, num_blocks: int) -> None:
        shape = (num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self.kv_caches = [(torch.empty(shape, dtype=self.dtype, device=self.device),
                           torch.empty(shape, dtype=self.dtype, device=self.device)) for _ in range(self.num_layers)]

    # ---------------------------------------------------------------- step
    def prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        q_start = [0]
        pos_start: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        for chunk in out.chunks:
            req, s, n = chunk.request, chunk.start, chunk.num_tokens
            blocks = req.block_ids
            input_ids.extend(req.token_ids[s:s + n])
            rng = range(s, s + n)
            positions.extend(rng)
            slots.extend(blocks[p // bs] * bs + p % bs for p in rng)
            q_start.append(q_start[-1] + n)
            pos_start.append(s)
            tables.append(blocks)
            if chunk.samples:
                sample_rows.append(q_start[-1] - 1)
        width = max(len(t) for t in tables)
        table = [t + [0] * (width - len(t)) for t in tables]
        dev = self.device
        pin = dev.type == "cuda"

        def to_dev(values, dtype):
            t = torch.tensor(values, dtype=dtype)
            return t.pin_memory().to(dev, non_blocking=True) if pin else t

        meta = AttentionMetadata(
            slot_mapping=to_dev(slots, torch.int64),
            block_tables=to_dev(table, torch.int32),
            seg_q_start=to_dev(q_start, torch.int32),
            seg_pos_start=to_dev(pos_start, torch.int32),
            impl=self.attention_impl,
        )
        return to_dev(input_ids, torch.int64), to_dev(positions, torch.int64), meta, sample_rows

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, all_logits: bool = False) -> torch.Tensor:
        """Run one step. Returns float32 logits of the sampling rows, in chunk order
        (of every token when ``all_logits``)."""
        input_ids, positions, meta, sample_rows = self.prepare(out)
        hidden = self.model(input_ids, positions, meta, self.kv_caches)
        if not all_logits:
            hidden = hidden.index_select(0, torch.tensor(sample_rows, dtype=torch.long, device=hidden.device))
        return self.model.compute_logits(hidden).float()
