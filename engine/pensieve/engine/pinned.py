"""Pinned host buffers for the per-step copies between host and device."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("pensieve.engine")


class PinnedPair:
    """Two page-locked host buffers used in turn: a step fills one while the copy
    of the step before may still be reading the other (with asynchronous
    scheduling a copy is at most one step behind). Both are allocated once, at
    the largest size a step can need: pinning memory synchronizes the device, so
    it must not happen while serving (a step that needs more grows the buffer
    once, with a warning). Without ``pin`` (CPU engines) they are plain memory."""

    def __init__(self, numel: int, dtype: torch.dtype, pin: bool):
        self.dtype, self.pin = dtype, pin
        self.buffers = [self._alloc(numel) for _ in range(2)]
        self.turn = 0

    def _alloc(self, numel: int) -> torch.Tensor:
        t = torch.empty(numel, dtype=self.dtype)
        return t.pin_memory() if self.pin else t

    def next(self, numel: int) -> torch.Tensor:
        """The next buffer's first ``numel`` elements."""
        self.turn ^= 1
        if self.buffers[self.turn].numel() < numel:
            log.warning("pinned staging buffer grown to %d elements while serving", numel)
            self.buffers[self.turn] = self._alloc(max(numel, 2 * self.buffers[self.turn].numel()))
        return self.buffers[self.turn][:numel]
