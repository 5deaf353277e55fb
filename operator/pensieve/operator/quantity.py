"""Kubernetes quantities <-> numbers. Parsing is ``pensieve.common.quantity`` (shared
with the engine, so both read "64Gi" or refuse "64m" alike); formatting is here."""
from __future__ import annotations

from pensieve.common.quantity import BINARY, QuantityError, parse_bytes, parse_quantity

__all__ = ["QuantityError", "parse_bytes", "parse_quantity", "format_bytes", "human_bytes"]


def format_bytes(n: int) -> str:
    """Exact, canonical binary form the API server keeps unchanged (e.g. 80Gi, 1536Mi)."""
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        unit = BINARY[suffix]
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
