"""A tier's pool of fixed-size KV blocks, handed out by id. Pure Python, no torch.

Ownership: an allocated id belongs to exactly one holder (a running request or
a session's cache) until that holder frees it. ``allocate`` returns None when
the pool cannot satisfy the whole request; the scheduler decides what to do.
Ids are handed out in FIFO order of freeing, which keeps tests deterministic.
"""
from __future__ import annotations

from collections import deque


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._in_use = bytearray(num_blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def usage(self) -> float:
        return self.num_used / self.num_blocks if self.num_blocks else 0.0

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        ids = [self._free.popleft() for _ in range(n)]
        for i in ids:
            self._in_use[i] = 1
        return ids

    def free(self, ids: list[int]) -> None:
        for i in ids:
            if not self._in_use[i]:
                raise RuntimeError(f"block {i} freed twice")
            self._in_use[i] = 0
            self._free.append(i)
