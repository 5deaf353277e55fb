"""Polling helper shared by the tiers that wait on real processes and API servers
(importable as ``waiting``: pytest puts tests/ on sys.path through tests/conftest.py)."""
from __future__ import annotations

import time


def wait_for(fn, timeout: float, what: str, interval: float = 0.25):
    """Call ``fn`` until it returns something truthy (exceptions count as not yet); return that."""
    end = time.time() + timeout
    last = None
    while time.time() < end:
        try:
            last = fn()
            if last:
                return last
        except Exception as e:  # noqa: BLE001
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
