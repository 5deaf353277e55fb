"""Handing memory back to the OS after a big request.

Tokenizing a multi-megabyte prompt makes hundreds of megabytes of small
allocations (one per token) in the tokenizer's thread; once freed, glibc
keeps those pages in the thread's arena, so without a trim the server's RSS
stays up by about 100 MiB per such request (issue 15, item 2).
The request's body and its JSON text (megabytes, allocated from the heap
once glibc's adaptive mmap threshold has grown) stay as well.
``malloc_trim(0)`` returns the free pages of every arena. It costs a walk of
the free lists, so the server calls it only once a request with a body of
``BIG_BODY_BYTES`` or more is done, in the tokenizer pool (never on the event
loop or the engine thread). Elsewhere than glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("pensieve.server")

BIG_BODY_BYTES = 1 << 20


def _load_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_malloc_trim = _load_trim()


def trim() -> None:
    """Return freed heap pages to the OS (glibc only; a no-op elsewhere)."""
    if _malloc_trim is not None:
        _malloc_trim(0)
