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

glibc also gives each thread that allocates its own arena (up to 8 per core):
the tokenizer pool's threads, the event loop and the engine thread each keep
freed pages apart, and fragments of a multi-megabyte request end up spread over
several of them. ``limit_arenas`` (called once at start-up) caps them at
``ARENAS``, which keeps the server's RSS flat across big requests.
"""
from __future__ import annotations

import ctypes
import gc
import ctypes.util
import logging

log = logging.getLogger("pensieve.server")

BIG_BODY_BYTES = 1 << 20
ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter


def _libc_fn(name: str, argtypes: list):
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


_malloc_trim = _libc_fn("malloc_trim", [ctypes.c_size_t])
_mallopt = _libc_fn("mallopt", [ctypes.c_int, ctypes.c_int])


def limit_arenas(n: int = ARENAS) -> None:
    """Cap glibc's malloc arenas (call before the server's threads start; a no-op elsewhere)."""
    if _mallopt is not None and _mallopt(_M_ARENA_MAX, n) != 1:
        log.warning("mallopt(M_ARENA_MAX) refused")


def trim() -> None:
    """Collect garbage cycles, then return freed heap pages to the OS (glibc only).

    The collection first: an exception raised while handling a big request sits in a
    reference cycle with its traceback's frames, which hold the request's text and
    tokens until the cyclic collector runs; big objects barely advance its counters,
    so without this it may not run for a long time."""
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)
