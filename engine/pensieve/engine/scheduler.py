"""Unified-batch scheduler: one flat batch per step mixing prefill chunks,
recompute segments and decodes.

Policy: FCFS. Running requests are served first (a decode needs one token, a
prefill continues with what the budget allows); then waiting requests are
admitted in arrival order while the token budget, the sequence limit and the
cache's admission rule allow (no skipping ahead). A request whose session lost
leading chunks recomputes them in the same step as its new prompt: two query
segments sharing one block table. When a running request cannot get a block,
the newest running request is preempted: suspended into the cache tiers
(``pensieve`` mode) or freed and recomputed later (other modes). The step's
decisions reach the runner as a SchedulerOutput.

The scheduler owns the cache manager: the engine reaches the cache tiers and
the sessions only through the scheduler's methods below (sessions, the step's
copy bookkeeping, finishing a request), so that every change to what the tiers
hold goes through one place. ``cache`` stays readable for inspection (tests,
benchmarks, the metrics snapshot).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


from .cache_manager import CacheManager, SwapPlan
from .errors import SessionBusyError
from .request import Request, RequestStatus, Session, SessionKey


@dataclass
class ScheduledChunk:
    """``num_tokens`` tokens of ``request`` computed this step, from context position ``start``.
    ``recompute``: a dropped leading range being rebuilt (never samples)."""

    request: Request
    start: int
    num_tokens: int
    recompute: bool = False

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the last known token, so the step samples a new one."""
        return not self.recompute and self.start + self.num_tokens == len(self.request.token_ids)


@dataclass
class SchedulerOutput:
    """The scheduler -> runner hand-off for one step."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    swaps: SwapPlan = field(default_factory=SwapPlan)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks and not (self.swaps.swap_in or self.swaps.swap_out or self.swaps.swap_out_ahead)


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

    @property
    def num_suspended(self) -> int:
        return sum(1 for r in self.waiting if r.suspended)

    def remove(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def finish(self, req: Request) -> None:
        """Take a request out of the queues and release its blocks (its context stays in its session)."""
        self.remove(req)
        self.cache.release(req)

    # ------------------------------------------------------------ sessions
    def open_turn(self, session_id: str, owner: str | None, request_id: str) -> Session:
        """The session ``(owner, session_id)``, created if new, marked as running ``request_id``;
        SessionBusyError while another of its turns runs."""
        session = self.cache.sessions.get(SessionKey(owner, session_id))
        if session is not None and session.active_request is not None:
            raise SessionBusyError(session_id)
        session = session or self.cache.get_or_create_session(session_id, owner)
        session.active_request = request_id
        session.last_active = self.cache.clock()
        session.num_turns += 1
        return session

    def get_session(self, session_id: str | SessionKey, owner: str | None = None) -> Session:
        return self.cache.get_session(session_id, owner)

    def delete_session(self, key: SessionKey) -> None:
        self.cache.delete_session(key)

    def truncate_session(self, key: SessionKey, num_tokens: int) -> None:
        """Cut an idle session's context back to its first ``num_tokens`` tokens (no-op while a turn runs)."""
        s = self.cache.sessions.get(key)
        if s is not None:
            self.cache.truncate_session(s, num_tokens)

    def expire_idle(self, ttl: float) -> list[SessionKey]:
        """Forget the cache of sessions with no running turn idle longer than ``ttl`` seconds."""
        now = self.cache.clock()
        expired = [key for key, s in self.cache.sessions.items()
                   if s.active_request is None and not s.internal and now - s.last_active > ttl]
        for key in expired:
            self.cache.delete_session(key)
        return expired

    def offload(self, session_id: str | SessionKey, owner: str | None = None) -> tuple[int, SwapPlan]:
        """Plan the copy of an idle session's GPU blocks to the CPU tier: (blocks moved, the plan to run)."""
        moved = self.cache.offload(session_id, owner)
        return moved, self.cache.take_plan()

    # ------------------------------------------------------------ step bookkeeping
    def copies_done(self, batch: int) -> None:
        """The ahead-of-time copy batches up to ``batch`` have completed (the runner polled their events)."""
        self.cache.copies_done(batch)

    def step_done(self) -> None:
        """The runner has issued the step's copies: swap-in sources may be reused."""
        self.cache.finish_step()

    @property
    def num_gpu_blocks(self) -> int:
        return self.cache.gpu.num_blocks

    @property
    def num_cpu_blocks(self) -> int:
        return self.cache.cpu.num_blocks

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_pending and len(req.token_ids) - req.num_prompt_tokens >= req.max_tokens:
                i += 1  # its last token is being sampled by the step in flight: it ends when collected
                continue
            recompute, new = self._split(req, req.recompute_end - req.recompute_pos,
                                         len(req.token_ids) - req.num_computed_tokens, budget)
            if self.cache.grow(req, req.num_computed_tokens + new):
                budget -= self._emit(out, req, recompute, new)
                i += 1
                continue
            victim = self.running.pop()  # the newest running request gives way (never one scheduled already)
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                break

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            req = self.waiting[0]
            match, recompute_tokens, missing = self.cache.plan_attach(req)
            recompute, new = self._split(req, recompute_tokens, len(req.token_ids) - match, budget)
            bs = self.cache.block_size
            need = missing + max(0, -(-(match + new) // bs) - (-(-match // bs)))
            if not self.cache.admissible(need, req, others_running=bool(self.running)):
                break
            self.cache.attach(req, match, recompute_tokens, count_context=not req.admitted)
            if not self.cache.grow(req, match + new):
                raise AssertionError("admitted request could not grow")
            req.admitted, req.suspended = True, False
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            budget -= self._emit(out, req, recompute, new)

        self.cache.plan_swap_ahead()
        out.swaps = self.cache.take_plan()
        return out

    @staticmethod
    def _split(req: Request, recompute_left: int, new_left: int, budget: int) -> tuple[int, int]:
        """Tokens of the recompute segment and of the new segment this step; the
        new segment starts only once the dropped range is complete."""
        recompute = min(recompute_left, budget)
        new = min(new_left, budget - recompute) if recompute == recompute_left else 0
        return recompute, new

    @staticmethod
    def _emit(out: SchedulerOutput, req: Request, recompute: int, new: int) -> int:
        if recompute:
            out.chunks.append(ScheduledChunk(req, req.recompute_pos, recompute, recompute=True))
        if new:
            out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, new))
        return recompute + new

    def _preempt(self, req: Request) -> None:
        if self.cache.tiered:
            self.cache.suspend(req)
            req.suspended = True
        else:  # recompute-style: free everything, start over later
            self.cache.free_request(req)
            req.num_computed_tokens = req.recompute_pos = req.recompute_end = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
