"""Host-side packing of one step's inputs: every integer the forward pass needs,
built with a few vectorized numpy operations and moved to the device in one copy.

Layout of the packed int32 buffer for T tokens, S segments and block-table width W
(each part padded to a multiple of 16 entries):

    input_ids[T] | positions[T] | slots[T] | seg_q_start[S+1] | seg_pos_start[S] | block_tables[S*W]
    | sample_rows[S]

(sample_rows: the rows whose logits are sampled, padded with 0; eager steps read
their first ``len(StepInputs.sample_rows)`` entries on the device. Everything
crosses in one copy from pinned memory: a copy from pageable memory would make
the host wait for the stream, and the next step could not be prepared while
this one runs.)

Decode graphs reuse this layout with T = S = the graph's padded batch size and
W = the most blocks a sequence can have, so a replay needs one host-to-device
copy into the graph's static buffer.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from .scheduler import SchedulerOutput


@dataclass
class StepInputs:
    """One step's inputs on the host (``packed``) and where each part lies in it."""

    packed: np.ndarray          # int32, the layout above
    num_tokens: int             # T (real tokens; a decode graph may pad beyond it)
    num_segments: int           # S
    width: int                  # W
    sample_rows: list[int]      # rows whose last-position logits are sampled, in chunk order
    seg_q_start: np.ndarray     # views into packed (the attention plan is built from these on the host)
    seg_pos_start: np.ndarray
    has_placeholders: bool      # some input ids are -1 - row of the previous step's samples


def _offsets(t: int, s: int, w: int) -> list[int]:
    # Each part starts on a 64-byte boundary: Triton specializes kernels on pointer
    # alignment, and a part whose alignment changed with the batch size would
    # compile a new variant while serving.
    o = [0]
    for n in (t, t, t, s + 1, s, s * w, s):
        o.append(o[-1] + -(-n // 16) * 16)
    return o


def split_views(buf, t: int, s: int, w: int) -> dict:
    """The parts of a packed buffer (numpy array or tensor; views, no copies)."""
    o = _offsets(t, s, w)
    return dict(input_ids=buf[o[0]:o[0] + t], positions=buf[o[1]:o[1] + t], slots=buf[o[2]:o[2] + t],
                seg_q_start=buf[o[3]:o[3] + s + 1], seg_pos_start=buf[o[4]:o[4] + s],
                block_tables=buf[o[5]:o[5] + s * w].reshape(s, w), sample_rows=buf[o[6]:o[6] + s])


def packed_size(t: int, s: int, w: int) -> int:
    return _offsets(t, s, w)[-1]


def build_step_inputs(out: SchedulerOutput, block_size: int, pad_to: int | None = None,
                      width: int | None = None) -> StepInputs:
    """Pack a step. ``pad_to``: pad a decode step to this many rows (q_len-0
    segments, slot -1: nothing is written or attended for them); ``width``: the
    block-table width (default: the step's longest table)."""
    chunks = out.chunks
    tables = [c.request.block_ids for c in chunks]
    lens = np.fromiter((len(t) for t in tables), dtype=np.int64, count=len(tables))
    w = width if width is not None else int(lens.max())
    is_decode = all(c.num_tokens == 1 and not c.recompute and c.samples for c in chunks)
    n_seg = len(chunks)
    if is_decode:
        t = pad_to or n_seg
        s = t
        starts = [c.start for c in chunks]
        ids = [c.request.token_ids[p] for c, p in zip(chunks, starts)]
        pos = np.asarray(starts, dtype=np.int64)
        q_lens = np.ones(n_seg, dtype=np.int64)
        tok_ids = np.asarray(ids, dtype=np.int64)
    else:
        s = n_seg
        q_lens = np.fromiter((c.num_tokens for c in chunks), dtype=np.int64, count=n_seg)
        t = int(q_lens.sum())
        starts_np = np.fromiter((c.start for c in chunks), dtype=np.int64, count=n_seg)
        tok_ids = np.fromiter(chain.from_iterable(c.request.token_ids[c.start:c.start + c.num_tokens]
                                                  for c in chunks), dtype=np.int64, count=t)
        seg_of_tok = np.repeat(np.arange(n_seg), q_lens)
        first_row = np.cumsum(q_lens) - q_lens
        pos = starts_np[seg_of_tok] + (np.arange(t) - first_row[seg_of_tok])
        starts = starts_np
    packed = np.zeros(packed_size(t, s, w), dtype=np.int32)
    v = split_views(packed, t, s, w)
    n_tok = int(q_lens.sum())
    v["input_ids"][:n_tok] = tok_ids
    v["positions"][:n_tok] = pos
    # block table rows, scattered in one vectorized step
    flat = np.fromiter(chain.from_iterable(tables), dtype=np.int64, count=int(lens.sum()))
    rows = np.repeat(np.arange(n_seg), lens)
    cols = np.arange(flat.size) - np.repeat(np.cumsum(lens) - lens, lens)
    v["block_tables"][rows, cols] = flat
    seg_of_tok = np.repeat(np.arange(n_seg), q_lens)
    blk = v["block_tables"][seg_of_tok, pos // block_size].astype(np.int64)
    v["slots"][:] = -1
    v["slots"][:n_tok] = blk * block_size + pos % block_size
    q_start = np.zeros(s + 1, dtype=np.int64)
    q_start[1:n_seg + 1] = np.cumsum(q_lens)
    q_start[n_seg + 1:] = n_tok  # padding segments are empty
    v["seg_q_start"][:] = q_start
    v["seg_pos_start"][:n_seg] = starts
    sample_rows = [int(q_start[i + 1]) - 1 for i, c in enumerate(chunks) if c.samples]
    v["sample_rows"][:len(sample_rows)] = sample_rows
    has_placeholders = bool((v["input_ids"][:n_tok] < 0).any())
    return StepInputs(packed, t, s, w, sample_rows, v["seg_q_start"], v["seg_pos_start"], has_placeholders)


def resolve_placeholders(input_ids: torch.Tensor, prev_tokens: torch.Tensor | None) -> None:
    """In place, on the device: an input id ``-1 - j`` becomes ``prev_tokens[j]``, the token
    the previous step sampled in row j (asynchronous scheduling: the host has not read it)."""
    if prev_tokens is None:
        raise RuntimeError("step inputs hold placeholders but no previous step's tokens were given")
    rows = (-1 - input_ids).clamp_(0, prev_tokens.numel() - 1)
    input_ids.copy_(torch.where(input_ids < 0, prev_tokens.to(input_ids.dtype).index_select(0, rows), input_ids))

