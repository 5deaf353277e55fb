"""Unified-batch scheduler: one flat batch per step mixing prefill chunks and decodes.

Policy: FCFS. Running requests are served first (each decode needs one token,
a prefill continues with as many as the budget allows); then waiting requests
are admitted in arrival order while the token budget, the sequence limit and
the block pool allow. When a running request cannot get a block, the newest
running request is preempted (its blocks freed, its tokens recomputed later).
The step's decisions go to the runner as a SchedulerOutput.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .cache_manager import CacheManager
from .request import Request, RequestStatus


@dataclass
class ScheduledChunk:
    """``num_tokens`` tokens of ``request`` computed this step, starting at context position ``start``."""

    request: Request
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the last known token, so the step samples a new one."""
        return self.start + self.num_tokens == len(self.request.token_ids)


@dataclass
class SchedulerOutput:
    """The scheduler -> runner hand-off for one step."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # Block copies the runner performs before (swap_in) or after (swap_out) the
    # forward pass, as (source block, destination block) pairs. Filled by the
    # CPU tier; empty while the engine has only the GPU tier.
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, cache: CacheManager, max_num_batched_tokens: int, max_num_seqs: int):
        self.cache = cache
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: oldest first

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_pending_tokens, budget)
            if self.cache.grow(req, req.num_computed_tokens + n):
                out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
                scheduled.add(id(req))
                budget -= n
                i += 1
                continue
            victim = self.running.pop()  # the newest running request gives way
            if id(victim) in scheduled:  # cannot happen: victims come from the unscheduled tail
                raise AssertionError("preempted a request already scheduled this step")
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                break

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            req = self.waiting[0]
            if not req.admitted:
                req.num_cached_tokens = self.cache.attach(req)
                req.admitted = True
            n = min(req.num_pending_tokens, budget)
            if not self.cache.grow(req, req.num_computed_tokens + n):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
            budget -= n
        return out

    def _preempt(self, req: Request) -> None:
        """Recompute-style preemption: free its blocks; it re-enters at the head of the queue."""
        self.cache.gpu.free(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
