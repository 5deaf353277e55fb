"""The cache tiers: sessions' contexts in GPU and CPU block pools, eviction, swap plans.

The CacheManager owns both BlockPools and every session. A block has exactly
one holder: a running request or a session's chunk. At admission a session's
matching context moves to its request (``attach``): GPU chunks are used in
place, CPU chunks are swapped in, dropped leading chunks are recomputed as a
second query segment. A chunk's CPU copy stays with the request
(``Request.cpu_copies``) when the block is full: a conversation's past never
changes, so the copy is still valid when the turn ends, and the next eviction
of that chunk frees its GPU block without copying it again. When the request
ends its blocks go back to the session (``release``).

Pressure, in the ``pensieve`` mode (the paper's design):
- ahead of time, when free GPU blocks fall under ``swap_out_below``, the
  lowest-value GPU chunks of idle sessions are copied to the CPU and stay valid
  on the GPU until their slot is reclaimed;
- ``reclaim`` takes GPU chunks in ascending retention value (leading chunks of
  idle sessions first): first those that already have a CPU copy (free to
  take), then the others, copying each to the CPU first (urgent swap-out, which
  the step's layers must wait for); a full CPU tier drops its own lowest-value
  chunk (leading first);
- new requests are admitted only while more than ``admit_above`` of the GPU
  blocks stay free (5%: room for running decodes; at 10% the H200 sweep's
  requests waited for admission at 16 sessions/s longer than gpu-only's, which
  keeps no reserve, and bench/cache_replay.py counts 43% fewer steps with
  requests waiting at 5%, with 15 blocks copied within steps).
``gpu-only`` keeps what stays in GPU memory (LRU, from the tail: a prefix
cache). ``none`` keeps nothing between turns.

Copies are only planned here (SwapPlan); the runner performs them.
"""
from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

from .block_pool import BlockPool
from .cost_model import CostModel
from .errors import UnknownSessionError
from .request import Chunk, Request, Session, SessionKey


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def stored_context_len(history: list[int], prompt: list[int]) -> int:
    """Leading prompt tokens that a session store's ``history`` says the conversation already
    had, as context: their common prefix, less the history's last token. That token is the
    last one sampled for the previous reply, which no forward pass has computed yet, so
    computing it now is new work, not recomputation (else every turn would report one
    recomputed token while nothing was lost)."""
    return max(0, min(common_prefix_len(history, prompt), len(history) - 1))


# What a scan of a session's chunks looks for. The scans run every step under pressure, over
# every session: plain loops on the two fields, no predicate calls.
ON_GPU, WITH_CPU, UNCOPIED = "gpu", "cpu", "uncopied"


def _next_chunk(chunks: list[Chunk], kind: str, start: int) -> int | None:
    """Index of the first chunk of ``kind`` at or after ``start``, None if there is none."""
    if kind == ON_GPU:
        for k in range(start, len(chunks)):
            if chunks[k].gpu is not None:
                return k
    elif kind == WITH_CPU:
        for k in range(start, len(chunks)):
            if chunks[k].cpu is not None:
                return k
    else:
        for k in range(start, len(chunks)):
            c = chunks[k]
            if c.gpu is not None and c.cpu is None:
                return k
    return None


# ----------------------------------------------------------------- policies

class EvictionPolicy:
    """Ranks chunks for eviction: lower value goes first. Within a session the
    leading chunk is always the candidate, so only (position, idle) matter."""

    name = ""

    def __init__(self, cost: CostModel):
        self.cost = cost

    def value(self, position: int, idle_seconds: float) -> float:
        raise NotImplementedError


class RetentionValuePolicy(EvictionPolicy):
    """The paper's V = Cost(context position) / time since the session was last active."""

    name = "retention"

    def value(self, position: int, idle_seconds: float) -> float:
        return self.cost.chunk_cost(position) / max(idle_seconds, 1e-6)


class LRUPolicy(EvictionPolicy):
    """Least recently active session first, whatever the chunk's position."""

    name = "lru"

    def value(self, position: int, idle_seconds: float) -> float:
        return -idle_seconds


EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {p.name: p for p in (RetentionValuePolicy, LRUPolicy)}


# ----------------------------------------------------------------- plans and counters

@dataclass
class SwapPlan:
    """Block copies for one step, as (source, destination) pairs of block ids."""

    swap_in: list[tuple[int, int]] = field(default_factory=list)         # CPU -> GPU, before the layer reads
    swap_out: list[tuple[int, int]] = field(default_factory=list)        # GPU -> CPU, before the slot is rewritten
    swap_out_ahead: list[tuple[int, int]] = field(default_factory=list)  # GPU -> CPU, no deadline this step
    # Ahead-of-time copies are numbered by step (1, 2, ...): ``ahead_batch`` is this
    # plan's number (0: it has none). ``wait_for_batch``: this step reuses a GPU block
    # that ahead copies up to that number may still be reading, so its compute waits
    # for them (the copy stream runs batches in order); 0: compute waits for none.
    ahead_batch: int = 0
    wait_for_batch: int = 0

    @property
    def wait_for_copies(self) -> bool:
        return self.wait_for_batch > 0


@dataclass
class CacheStats:
    swap_in_blocks: int = 0
    swap_out_blocks: int = 0
    swap_out_in_step_blocks: int = 0  # of those, copies the step's layers wait for (SwapPlan.swap_out)
    evicted_tokens: dict[str, int] = field(default_factory=lambda: {"gpu": 0, "cpu": 0})
    context_tokens: dict[str, int] = field(default_factory=lambda: {"gpu": 0, "cpu": 0, "recomputed": 0, "new": 0})


class CacheManager:
    def __init__(self, num_gpu_blocks: int, block_size: int, cache_mode: str = "pensieve",
                 eviction: str = "retention", num_cpu_blocks: int = 0, cost_model: CostModel | None = None,
                 swap_out_below: float = 0.25, admit_above: float = 0.05, swap_ahead_margin: float = 1 / 32,
                 clock: Callable[[], float] = time.monotonic):
        self.block_size = block_size
        self.cache_mode = cache_mode
        self.tiered = cache_mode == "pensieve"
        self.gpu = BlockPool(num_gpu_blocks)
        self.cpu = BlockPool(num_cpu_blocks if self.tiered else 0)
        self.policy = EVICTION_POLICIES[eviction](cost_model or CostModel([0, 1], [1.0, 1.0]))
        self.swap_out_below = swap_out_below if self.tiered else 0.0
        self.swap_ahead_margin = swap_ahead_margin
        self.admit_above = admit_above if self.tiered else 0.0
        self.clock = clock
        self.sessions: dict[SessionKey, Session] = {}
        self.stats = CacheStats()
        self._plan = SwapPlan()
        # GPU block -> the ahead-of-time batch reading it, while not known to be complete (copies_done)
        self.copying: dict[int, int] = {}
        self._ahead_batches = itertools.count(1)
        self._cpu_free_after_step: list[int] = []
        self.request_copies = 0  # CPU blocks held by running requests (Request.cpu_copies)
        self._order = None  # this step's eviction order (_reclaim_order)

    # ------------------------------------------------------------- sessions
    # Sessions are keyed by SessionKey(owner, id): the same id under two API keys names two sessions.
    def get_or_create_session(self, session_id: str, owner: str | None = None) -> Session:
        key = SessionKey(owner, session_id)
        s = self.sessions.get(key)
        if s is None:
            s = self.sessions[key] = Session(session_id, owner=owner, last_active=self.clock())
        return s

    def get_session(self, session_id: str | SessionKey, owner: str | None = None) -> Session:
        key = session_id if isinstance(session_id, SessionKey) else SessionKey(owner, session_id)
        try:
            return self.sessions[key]
        except KeyError:
            raise UnknownSessionError(key.session_id) from None

    def delete_session(self, session_id: str | SessionKey, owner: str | None = None) -> None:
        s = self.get_session(session_id, owner)
        self._free_chunks(s.chunks)
        s.chunks, s.token_ids = [], []
        del self.sessions[s.key]

    def truncate_session(self, s: Session, num_tokens: int) -> None:
        """Cut an idle session's context back to its first ``num_tokens`` tokens; the blocks past
        them go back to their pools (a reply that ended at a stop string found after the fact)."""
        if s.active_request is not None or num_tokens >= len(s.token_ids):
            return
        keep = self._blocks_for(num_tokens)
        self._free_chunks(s.chunks[keep:])
        s.chunks, s.token_ids = s.chunks[:keep], s.token_ids[:num_tokens]

    # ------------------------------------------------------------- admission and hand-over
    def plan_attach(self, req: Request) -> tuple[int, int, int]:
        """What admitting ``req`` would reuse: (matched tokens, leading tokens to
        recompute, chunks that need a fresh GPU block). No side effects."""
        s = req.session
        if s is None or not s.chunks:
            return 0, 0, 0
        match = min(common_prefix_len(s.token_ids, req.token_ids), len(req.token_ids) - 1)
        dropped = 0
        while dropped < len(s.chunks) and s.chunks[dropped].dropped:
            dropped += 1
        recompute = dropped * self.block_size
        if match <= recompute:  # nothing cached survives past the dropped prefix
            return 0, 0, 0
        keep = self._blocks_for(match)
        missing = sum(1 for c in s.chunks[:keep] if c.gpu is None)
        return match, recompute, missing

    def admissible(self, num_blocks: int, req: Request | None = None, others_running: bool = True) -> bool:
        """Would ``num_blocks`` more GPU blocks leave more than the admission watermark free?
        The watermark keeps room for running requests' decodes; with none running, fitting is enough
        (else a request larger than 90% of the tier would wait forever).
        ``req``'s own session's blocks are not counted as reclaimable: it is about to use them."""
        own = sum(1 for c in req.session.chunks if c.gpu is not None) if req is not None and req.session else 0
        available = self.gpu.num_free + self.reclaimable_blocks() - own
        reserve = self.admit_above * self.gpu.num_blocks if others_running else 0
        return available - num_blocks >= reserve

    def attach(self, req: Request, match: int, recompute: int, count_context: bool = True) -> None:
        """Move the session's first ``match`` tokens of context to ``req`` (see plan_attach)."""
        s = req.session
        bs = self.block_size
        keep = self._blocks_for(match)
        chunks = s.chunks if s is not None else []
        if s is not None:
            # Detach first: allocating below may reclaim, and must never touch these chunks.
            s.chunks, s.token_ids = [], []
        self._free_chunks(chunks[keep:])
        chunks = chunks[:keep]
        missing = sum(1 for c in chunks if c.gpu is None)
        fresh = self._allocate_gpu(missing) if missing else []
        if fresh is None:
            raise AssertionError("attach() after admissible() could not get GPU blocks")
        blocks: list[int] = []
        copies: list[int | None] = []
        source = {"gpu": 0, "cpu": 0, "recomputed": 0}
        for i, c in enumerate(chunks):
            tokens = min(bs, match - i * bs)
            # a full block's copy stays valid (the request never rewrites it); keep it while
            # requests hold at most half the CPU tier, so that idle sessions keep room there
            keep_copy = c.cpu is not None and tokens == bs and 2 * (self.request_copies + 1) <= self.cpu.num_blocks
            if c.gpu is not None:
                blocks.append(c.gpu)
                source["gpu"] += tokens
            else:
                gpu = fresh.pop(0)
                if c.cpu is not None:
                    self._plan.swap_in.append((c.cpu, gpu))
                    self.stats.swap_in_blocks += 1
                    source["cpu"] += tokens
                else:
                    source["recomputed"] += tokens
                blocks.append(gpu)
            if keep_copy:
                self.request_copies += 1
            elif c.cpu is not None:
                if c.gpu is None:
                    self._cpu_free_after_step.append(c.cpu)  # the swap-in reads it during this step
                else:
                    self.cpu.free([c.cpu])
            copies.append(c.cpu if keep_copy else None)
        req.block_ids = blocks
        req.cpu_copies = copies
        req.num_computed_tokens = match
        req.recompute_pos, req.recompute_end = 0, recompute
        if count_context:
            # Prompt tokens past the match that the session store says the conversation already had:
            # this engine lost (or never held) their KV, so they are recomputed context, not new input.
            restored = max(0, min(req.stored_context, len(req.token_ids)) - match)
            source["recomputed"] += restored
            req.num_cached_tokens = source["gpu"] + source["cpu"]
            req.context_sources = {**source, "new": len(req.token_ids) - match - restored}
            for k, v in source.items():
                self.stats.context_tokens[k] += v
            self.stats.context_tokens["new"] += len(req.token_ids) - match - restored

    def release(self, req: Request) -> None:
        """The request ended: its valid context goes back to its session, the rest to the pool."""
        s = req.session
        if s is not None and s.active_request == req.request_id:
            s.active_request = None
            s.last_active = self.clock()
            valid = req.num_valid_tokens
            if self.cache_mode != "none" and valid > 0 and not s.internal:
                s.token_ids = req.token_ids[:valid]
                s.chunks = self._take_chunks(req, self._blocks_for(valid))
            if s.internal:  # it only held a suspended request's context
                self._free_chunks(s.chunks)
                s.chunks, s.token_ids = [], []
                self.sessions.pop(s.key, None)
        self.free_request(req)
        self._order = None

    def free_request(self, req: Request) -> None:
        """Give every block ``req`` still holds back to its pool."""
        self._take_chunks(req, 0)

    def _take_chunks(self, req: Request, keep: int) -> list[Chunk]:
        """The request's first ``keep`` blocks (with their CPU copies) as chunks; the rest are freed."""
        copies = req.cpu_copies + [None] * (len(req.block_ids) - len(req.cpu_copies))
        chunks = [Chunk(gpu=b, cpu=c) for b, c in zip(req.block_ids[:keep], copies[:keep])]
        self.gpu.free(req.block_ids[keep:])
        dropped = [c for c in copies[keep:] if c is not None]
        self.cpu.free(dropped)
        self.request_copies -= sum(1 for c in copies if c is not None)
        req.block_ids, req.cpu_copies = [], []
        return chunks

    def suspend(self, req: Request) -> None:
        """Take a running request off the GPU for now. Its context becomes its
        session's evictable cache (an internal session if it has none), so it is
        swapped out or dropped only as far as memory demands."""
        if req.session is None:
            s = Session(f"\x00suspended/{req.request_id}", internal=True, active_request=req.request_id)
            req.session = self.sessions[s.key] = s
        s = req.session
        valid = req.num_valid_tokens
        s.token_ids = req.token_ids[:valid]
        s.chunks = self._take_chunks(req, self._blocks_for(valid))
        s.last_active = self.clock()
        self._order = None  # they are candidates from now on
        req.num_computed_tokens = req.recompute_pos = req.recompute_end = 0

    # ------------------------------------------------------------- allocation
    def grow(self, req: Request, num_tokens: int) -> bool:
        """Give ``req`` blocks for its first ``num_tokens`` tokens; False if impossible."""
        need = self._blocks_for(num_tokens) - len(req.block_ids)
        if need <= 0:
            return True
        ids = self._allocate_gpu(need)
        if ids is None:
            return False
        req.block_ids.extend(ids)
        return True

    def _allocate_gpu(self, n: int) -> list[int] | None:
        ids = self.gpu.allocate(n)
        if ids is None and self.reclaim(n - self.gpu.num_free):
            ids = self.gpu.allocate(n)
        return ids

    def _reclaim_order(self):
        """This step's eviction order (GPU chunks that have a CPU copy first: nothing to copy;
        then the others, each copied within the step) and the CPU tier's drop order, both
        in ascending value. Made once per step and shared by its reclaims: one scan of the
        sessions, not one per block a decode needs. ``take_plan`` (the step's end) and any
        change that adds chunks to sessions start a new one."""
        if self._order is None:
            copied = self._candidates(ON_GPU, stop_uncopied=True)
            self._order = (itertools.chain(copied, self._candidates(ON_GPU)), self._cpu_drops())
        return self._order

    def reclaimable_blocks(self) -> int:
        return sum(1 for s in self.sessions.values() for c in s.chunks if c.gpu is not None)

    def reclaim(self, num_blocks: int) -> bool:
        """Free at least ``num_blocks`` GPU blocks from sessions' caches. True on success."""
        if not self.tiered:
            return self._reclaim_tail(num_blocks)
        freed = 0
        order, drops = self._reclaim_order()
        while freed < num_blocks:
            s, i = next(order, (None, 0))
            if s is None:
                break
            c = s.chunks[i]
            if c.cpu is None:
                cpu = self._allocate_cpu(drops=drops)
                if cpu is not None:
                    self._plan.swap_out.append((c.gpu, cpu))
                    self.stats.swap_out_blocks += 1
                    c.cpu = cpu
                else:  # no CPU tier to hold it: drop it, and the CPU chunks before it, keeping the order
                    for earlier in s.chunks[:i]:
                        if earlier.cpu is not None:
                            self._drop_cpu_copy(s, earlier)
            self.stats.evicted_tokens["gpu"] += self._chunk_tokens(s, i)
            batch = self.copying.pop(c.gpu, 0)
            if batch:  # its copy to c.cpu may still be reading it
                self._plan.wait_for_batch = max(self._plan.wait_for_batch, batch)
            self.gpu.free([c.gpu])
            c.gpu = None
            freed += 1
        return freed >= num_blocks

    def _reclaim_tail(self, num_blocks: int) -> bool:
        freed = 0
        for s in sorted((s for s in self.sessions.values() if s.chunks), key=lambda s: s.last_active):
            while s.chunks and freed < num_blocks:
                c = s.chunks.pop()
                keep_tokens = len(s.chunks) * self.block_size
                self.stats.evicted_tokens["gpu"] += len(s.token_ids) - keep_tokens
                del s.token_ids[keep_tokens:]
                self.gpu.free([c.gpu])
                freed += 1
            if freed >= num_blocks:
                break
        return freed >= num_blocks

    def _allocate_cpu(self, below: float | None = None, drops=None) -> int | None:
        """One CPU block; when the tier is full, drop its lowest-value chunk first (only one
        worth less than ``below``, when given; None if there is none). ``drops``: a
        ``_cpu_drops()`` iterator shared by the calls of one plan (one scan of the sessions)."""
        if self.cpu.num_blocks == 0:
            return None
        ids = self.cpu.allocate(1)
        if ids is not None:
            return ids[0]
        now = self.clock()
        for s, i in drops if drops is not None else self._cpu_drops():
            if below is not None and self.policy.value(i * self.block_size, now - s.last_active) >= below:
                return None
            self._drop_cpu_copy(s, s.chunks[i])
            ids = self.cpu.allocate(1)
            if ids is not None:
                return ids[0]
        return None

    def _cpu_drops(self):
        """Chunks with a CPU copy, lowest value first: what a full CPU tier gives up."""
        return self._candidates(WITH_CPU)

    def _drop_cpu_copy(self, s: Session, c: Chunk) -> None:
        self.cpu.free([c.cpu])
        c.cpu = None
        if c.gpu is None:
            self.stats.evicted_tokens["cpu"] += self.block_size

    def _candidates(self, kind: str, stop_uncopied: bool = False):
        """Yield (session, chunk index) of the chunks of ``kind`` (ON_GPU, WITH_CPU, UNCOPIED)
        in ascending eviction value, each session's leading one first. Values are taken at
        one instant. ``stop_uncopied``: a session's chunks are not yielded from its first
        one without a CPU copy on."""
        now = self.clock()
        bs = self.block_size
        heap = []
        for n, s in enumerate(self.sessions.values()):
            i = _next_chunk(s.chunks, kind, 0)
            if i is not None:
                idle = now - s.last_active
                heap.append((self.policy.value(i * bs, idle), n, i, s, idle))
        heapq.heapify(heap)
        while heap:
            _, n, i, s, idle = heapq.heappop(heap)
            if i < len(s.chunks) and _next_chunk(s.chunks, kind, i) == i:
                if stop_uncopied and s.chunks[i].cpu is None:
                    continue
                yield s, i
            j = _next_chunk(s.chunks, kind, i + 1)
            if j is not None:
                heapq.heappush(heap, (self.policy.value(j * bs, idle), n, j, s, idle))

    def offload(self, session_id: str | SessionKey, owner: str | None = None) -> int:
        """Move an idle session's GPU chunks to the CPU tier now (benchmarks and tests).
        Returns how many chunks moved; those the CPU tier cannot take stay on the GPU."""
        s = self.get_session(session_id, owner)
        moved = 0
        for c in s.chunks:
            if c.gpu is None:
                continue
            if c.cpu is None:
                ids = self.cpu.allocate(1)
                if ids is None:
                    break
                c.cpu = ids[0]
                self._plan.swap_out.append((c.gpu, c.cpu))
                self.stats.swap_out_blocks += 1
            self.gpu.free([c.gpu])
            c.gpu = None
            moved += 1
        return moved

    # ------------------------------------------------------------- per step
    def plan_swap_ahead(self) -> None:
        """Copy idle GPU chunks to the CPU ahead of need while free GPU blocks are scarce.

        Hysteresis: when free plus already-copied GPU blocks fall below ``swap_out_below`` of
        the tier, copy up to ``swap_ahead_margin`` of the tier above that mark. On the H200
        sweep's workload (bench/cache_replay.py, ShareGPT at 12/s) a margin of 1/32 makes the
        batches 5x fewer and larger for the same blocks copied: 197 instead of 963."""
        if not self.tiered or self.cpu.num_blocks == 0:
            return
        target = self.swap_out_below * self.gpu.num_blocks
        if self.gpu.num_free >= target:  # the common case: no pressure, no scan of the sessions
            return
        copied = sum(1 for s in self.sessions.values() for c in s.chunks if c.gpu is not None and c.cpu is not None)
        budget = max(1, self.gpu.num_blocks // 16)  # bound one step's extra PCIe traffic
        if self.gpu.num_free + copied >= target:
            return
        want = min(budget, int(target + self.swap_ahead_margin * self.gpu.num_blocks - self.gpu.num_free - copied) + 1)
        now = self.clock()
        drops = self._cpu_drops()
        for s, i in self._candidates(UNCOPIED):
            if want <= 0:
                break
            # a full CPU tier makes room by dropping a chunk worth less than this one (as the
            # eviction would a few steps later, in the step's critical path)
            cpu = self._allocate_cpu(self.policy.value(i * self.block_size, now - s.last_active), drops)
            if cpu is None:
                break
            c = s.chunks[i]
            c.cpu = cpu
            if not self._plan.ahead_batch:
                self._plan.ahead_batch = next(self._ahead_batches)
            self._plan.swap_out_ahead.append((c.gpu, c.cpu))
            self.copying[c.gpu] = self._plan.ahead_batch
            self.stats.swap_out_blocks += 1
            want -= 1

    def copies_done(self, batch: int) -> None:
        """The ahead-of-time batches up to ``batch`` have completed (the runner polled their events)."""
        self.copying = {g: b for g, b in self.copying.items() if b > batch}

    def take_plan(self) -> SwapPlan:
        self._order = None
        plan, self._plan = self._plan, SwapPlan()
        self.stats.swap_out_in_step_blocks += len(plan.swap_out)
        return plan

    def finish_step(self) -> None:
        """After the runner performed the step's copies: release swap-in sources."""
        self.cpu.free(self._cpu_free_after_step)
        self._cpu_free_after_step = []

    # ------------------------------------------------------------- helpers
    def _free_chunks(self, chunks: list[Chunk]) -> None:
        self.gpu.free([c.gpu for c in chunks if c.gpu is not None])
        self.cpu.free([c.cpu for c in chunks if c.cpu is not None])

    def _chunk_tokens(self, s: Session, i: int) -> int:
        return min(self.block_size, len(s.token_ids) - i * self.block_size)

    def _blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def check_invariants(self) -> None:
        """Layout per session (dropped | CPU | GPU) and exact block accounting. For tests."""
        gpu_held, cpu_held = [], []
        for s in self.sessions.values():
            assert len(s.chunks) == self._blocks_for(len(s.token_ids)) or not s.chunks, s
            seen_resident = seen_gpu = False
            for c in s.chunks:
                if c.dropped:
                    assert not seen_resident, f"{s.session_id}: dropped chunk after a resident one"
                else:
                    seen_resident = True
                if c.gpu is not None:
                    seen_gpu = True
                elif c.cpu is not None:
                    assert not seen_gpu, f"{s.session_id}: CPU-only chunk after a GPU chunk"
                gpu_held += [c.gpu] if c.gpu is not None else []
                cpu_held += [c.cpu] if c.cpu is not None else []
        assert len(set(gpu_held)) == len(gpu_held) and len(set(cpu_held)) == len(cpu_held)
        assert self.gpu.num_used >= len(gpu_held) and self.cpu.num_used >= len(cpu_held)
        assert self.gpu.num_used <= self.gpu.num_blocks and self.cpu.num_used <= self.cpu.num_blocks
