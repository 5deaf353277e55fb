"""Type checks of client-supplied values: one definition for the HTTP protocol and the sampler.

JSON has no separate integer type and Python's bool is an int, so "an integer"
here means an int that is not a bool, and "a number" a finite int or float
that is not a bool.
"""
from __future__ import annotations

import math


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
