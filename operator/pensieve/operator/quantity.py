"""Kubernetes quantities <-> numbers (a small, dependency-free subset)."""
from __future__ import annotations

import re
from decimal import Decimal

_SUFFIX = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "m": Decimal("0.001"),
}
_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?\s*$")


def parse_quantity(q: str | int | float) -> Decimal:
    if isinstance(q, (int, float)):
        return Decimal(str(q))
    m = _RE.match(str(q))
    if not m:
        raise ValueError(f"not a quantity: {q!r}")
    return Decimal(m.group(1)) * Decimal(_SUFFIX[m.group(2) or ""])


def parse_bytes(q: str | int) -> int:
    return int(parse_quantity(q))


def format_bytes(n: int) -> str:
    """Exact, canonical binary form the API server keeps unchanged (e.g. 80Gi, 1536Mi)."""
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        unit = _SUFFIX[suffix]
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
