"""Sessions' cached contexts in the GPU tier, and reclaiming them under pressure.

The CacheManager owns the GPU BlockPool and every session. Blocks move between
holders, never shared: a session's cache is handed to its next request at
admission (``attach``) and handed back when the request ends (``release``).
Idle sessions' caches are reclaimed by the eviction policy when a running
request needs blocks that the pool no longer has.
"""
from __future__ import annotations

import time
from typing import Callable

from .block_pool import BlockPool
from .errors import UnknownSessionError
from .request import Request, Session


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# Eviction policies choose which idle session gives up blocks first.
# A policy maps the idle sessions to the order in which they are reclaimed.
EVICTION_POLICIES: dict[str, Callable[[list[Session]], list[Session]]] = {
    "lru": lambda sessions: sorted(sessions, key=lambda s: s.last_active),
}


class CacheManager:
    def __init__(self, num_gpu_blocks: int, block_size: int, cache_mode: str = "pensieve", eviction: str = "lru"):
        self.block_size = block_size
        self.cache_mode = cache_mode
        self.gpu = BlockPool(num_gpu_blocks)
        self.sessions: dict[str, Session] = {}
        # Until the CPU tier exists, every mode reclaims idle caches LRU from their tail.
        self._order = EVICTION_POLICIES["lru"]
        self.evicted_tokens = 0

    # ------------------------------------------------------------- sessions
    def get_or_create_session(self, session_id: str, owner: str | None = None) -> Session:
        s = self.sessions.get(session_id)
        if s is None:
            s = self.sessions[session_id] = Session(session_id, owner=owner)
        return s

    def get_session(self, session_id: str) -> Session:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise UnknownSessionError(session_id) from None

    def delete_session(self, session_id: str) -> None:
        s = self.get_session(session_id)
        self.gpu.free(s.block_ids)
        s.block_ids, s.token_ids = [], []
        del self.sessions[session_id]

    @property
    def num_cached_session_tokens(self) -> int:
        return sum(s.num_cached for s in self.sessions.values())

    # ------------------------------------------------------------- hand-over
    def attach(self, req: Request) -> int:
        """At admission: take over the session's cached prefix that matches the prompt."""
        s = req.session
        if s is None or not s.block_ids:
            return 0
        match = common_prefix_len(s.token_ids, req.token_ids)
        match = min(match, len(req.token_ids) - 1)  # at least one token is computed, to get logits
        keep = self._blocks_for(match)
        self.gpu.free(s.block_ids[keep:])
        req.block_ids = s.block_ids[:keep]
        req.num_computed_tokens = match
        s.block_ids, s.token_ids = [], []
        return match

    def release(self, req: Request) -> None:
        """A request ended (finished, aborted or preempted for good): its blocks go
        back to its session's cache, or to the pool."""
        s = req.session
        blocks, req.block_ids = req.block_ids, []
        if s is not None and s.active_request == req.request_id:
            s.active_request = None
            s.last_active = time.monotonic()
            if self.cache_mode != "none" and req.num_computed_tokens > 0:
                n = req.num_computed_tokens
                keep = self._blocks_for(n)
                s.token_ids = req.token_ids[:n]
                s.block_ids = blocks[:keep]
                blocks = blocks[keep:]
        self.gpu.free(blocks)

    # ------------------------------------------------------------- allocation
    def grow(self, req: Request, num_tokens: int) -> bool:
        """Give ``req`` enough blocks for its first ``num_tokens`` tokens; False if impossible."""
        need = self._blocks_for(num_tokens) - len(req.block_ids)
        if need <= 0:
            return True
        ids = self.gpu.allocate(need)
        if ids is None and self.reclaim(need - self.gpu.num_free):
            ids = self.gpu.allocate(need)
        if ids is None:
            return False
        req.block_ids.extend(ids)
        return True

    def can_allocate(self, num_blocks: int) -> bool:
        return self.gpu.num_free + self.reclaimable_blocks() >= num_blocks

    def reclaimable_blocks(self) -> int:
        return sum(len(s.block_ids) for s in self.sessions.values() if s.active_request is None)

    def reclaim(self, num_blocks: int) -> bool:
        """Free at least ``num_blocks`` from idle sessions' caches (tail first). True on success."""
        freed = 0
        idle = [s for s in self.sessions.values() if s.active_request is None and s.block_ids]
        for s in self._order(idle):
            while s.block_ids and freed < num_blocks:
                block = s.block_ids.pop()
                keep_tokens = len(s.block_ids) * self.block_size
                self.evicted_tokens += len(s.token_ids) - keep_tokens
                del s.token_ids[keep_tokens:]
                self.gpu.free([block])
                freed += 1
            if freed >= num_blocks:
                return True
        return freed >= num_blocks

    def _blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size
