"""One tensor-parallel step on the wire: rank 0 broadcasts, every rank runs it.

The scheduler and cache manager run once, on rank 0. For each step rank 0
broadcasts two int32 host tensors over the host group (gloo; a separate group
when the model's collectives use NCCL, so a worker's host receives the next
step while its GPU still runs this one):

    header[HEADER]: kind | T | S | W | sampled rows | all_logits | #swap_in | #swap_out
                    | #swap_out_ahead | wait_for_batch | #previous tokens | ahead_batch
                    | the newest ahead-of-time batch rank 0 has seen complete
                    | graph (1: replay the decode graph of T rows)
    payload:        the packed step inputs (``step_inputs.py`` layout, absent when the
                    step has no chunks; a graph step's are padded to T rows and the
                    graphs' width W) | the swap plan's (src, dst) block-id pairs

``kind`` is STEP or STOP (the workers leave their loop). Every rank then calls
``run_step`` with the same message: the same swaps on its own shard of the tiers
(block ids are the same on every rank), the same forward pass (its collectives
pair up), the same logits (gathered on every rank; only rank 0 samples).

Rank 0 picks a step's path (``ModelRunner.choose_path``): every rank captured the
same decode graphs at start-up, collectives included, so a graph step is one
replay on every rank, and its all-reduces pair up inside the graphs.

Asynchronous scheduling: a step's input ids may be placeholders for the tokens
the previous step sampled, which only rank 0's device holds. Rank 0 then
broadcasts those tokens over the model's group, on the device (in stream order:
no host waits), and every rank resolves the placeholders from them.
"""
from __future__ import annotations

import numpy as np
import torch

from .cache_manager import SwapPlan
from .scheduler import SchedulerOutput
from .step_inputs import packed_size

HEADER = 14
STEP, STOP = 1, 2
_SWAP_KINDS = ("swap_in", "swap_out", "swap_out_ahead")


def broadcast_step(runner, out: SchedulerOutput, all_logits: bool, prev_tokens: torch.Tensor | None):
    """Rank 0: pack ``out``, broadcast it; returns ``run_step``'s arguments."""
    header = np.zeros(HEADER, dtype=np.int32)
    parts = []
    if out.chunks:
        inputs, graph = runner.pack(out, all_logits)
        header[1:5] = inputs.num_tokens, inputs.num_segments, inputs.width, len(inputs.sample_rows)
        header[13] = graph
        if inputs.has_placeholders:
            if prev_tokens is None:
                raise RuntimeError("step inputs hold placeholders but no previous step's tokens were given")
            header[10] = prev_tokens.numel()
        parts.append(inputs.packed)
    header[0], header[5] = STEP, int(all_logits)
    for i, kind in enumerate(_SWAP_KINDS):
        pairs = getattr(out.swaps, kind)
        header[6 + i] = len(pairs)
        if pairs:
            parts.append(np.asarray(pairs, dtype=np.int32).reshape(-1))
    header[9], header[11] = out.swaps.wait_for_batch, out.swaps.ahead_batch
    header[12] = runner.swapper.done_watermark if runner.swapper is not None else 0
    payload = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    runner.tp.broadcast_host(torch.from_numpy(header))
    if payload.size:
        runner.tp.broadcast_host(torch.from_numpy(payload))
    return header, payload, prev_tokens if header[10] else None


def receive_step(runner):
    """Ranks 1..N-1: the next message, or None for STOP."""
    header = runner.tp.broadcast_host(torch.zeros(HEADER, dtype=torch.int32)).numpy()
    if header[0] == STOP:
        return None
    payload = torch.zeros(_payload_len(header), dtype=torch.int32)
    if payload.numel():
        runner.tp.broadcast_host(payload)
    return header, payload.numpy(), None


def send_stop(runner) -> None:
    header = np.zeros(HEADER, dtype=np.int32)
    header[0] = STOP
    runner.tp.broadcast_host(torch.from_numpy(header))


@torch.inference_mode()
def run_step(runner, header: np.ndarray, payload: np.ndarray, prev_tokens: torch.Tensor | None
             ) -> torch.Tensor | None:
    """Every rank: this step's swaps on its shard of the tiers, then the forward pass
    (``ModelRunner.run_packed``). Returns float32 logits of the sampled rows (every row's
    when all_logits)."""
    t, s, w, n_sample, all_logits = (int(x) for x in header[1:6])
    inputs_len = packed_size(t, s, w) if t else 0
    swaps = _swap_plan(header, payload[inputs_len:])
    swapper = runner.swapper
    # Rank 0's cache manager releases a block read by an ahead-of-time batch once rank 0
    # has seen that batch complete (its watermark, header[12]), or makes the step wait for
    # it (wait_for_batch). Another rank's copies of those batches may lag: its compute waits
    # (on the device) for its own copies up to both, which are almost always done already.
    if swapper is not None:
        need = swaps.wait_for_batch if runner.tp.rank == 0 else max(swaps.wait_for_batch, int(header[12]))
        if need:
            swapper.wait_ahead(need)
        if runner.tp.rank > 0:
            swapper.completed_batch()  # forget the events of finished batches
    if not t:
        return runner.run_packed(swaps, None)
    if header[10]:  # placeholders: the previous step's tokens, from rank 0's device
        if prev_tokens is None:
            prev_tokens = torch.empty(int(header[10]), dtype=torch.int64, device=runner.device)
        runner.tp.broadcast(prev_tokens)
    return runner.run_packed(swaps, payload[:inputs_len], (t, s, w), n_sample, bool(header[13]), bool(all_logits),
                             prev_tokens if header[10] else None)


def _payload_len(header: np.ndarray) -> int:
    t, s, w = (int(x) for x in header[1:4])
    return (packed_size(t, s, w) if t else 0) + 2 * int(header[6:9].sum())


def _swap_plan(header: np.ndarray, flat: np.ndarray) -> SwapPlan:
    plan = SwapPlan(ahead_batch=int(header[11]), wait_for_batch=int(header[9]))
    at = 0
    for i, kind in enumerate(_SWAP_KINDS):
        n = int(header[6 + i])
        setattr(plan, kind, [tuple(p) for p in flat[at:at + 2 * n].reshape(n, 2).tolist()])
        at += 2 * n
    return plan
