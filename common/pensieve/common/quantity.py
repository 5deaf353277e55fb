"""Kubernetes quantities, the one parser of the engine and the operator.

Grammar (as in Kubernetes' resource.Quantity): a non-negative decimal number,
then at most one suffix: binary ``Ki Mi Gi Ti Pi Ei``, decimal ``k M G T P E``,
milli ``m``, or an exponent ``e<n>``/``E<n>``. Suffixes are case-sensitive:
``64g`` and ``64gi`` are not quantities, and ``64m`` is 0.064 (milli), not
64 megabytes.

Byte counts must be whole: Kubernetes would round ``64m`` up to one byte, which
is never what a person writing ``--cpu-cache-bytes 64m`` meant, so
``parse_bytes`` refuses a fractional result and names the likely intent
(``64Mi`` or ``64M``). ``1.5Gi`` (1610612736) and ``1.5G`` are whole, so they pass.
"""
from __future__ import annotations

import re
from decimal import Decimal

BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_RE = re.compile(r"^\s*\+?([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m|[eE][+-]?[0-9]+)?\s*$")


class QuantityError(ValueError):
    """Text that is not a (non-negative) Kubernetes quantity, or not a whole byte count."""


def parse_quantity(q: str | int | float | Decimal) -> Decimal:
    """'64Gi', '1.5G', '500m', '1e9', 8 -> the exact value as a Decimal."""
    if isinstance(q, bool):
        raise QuantityError(f"not a quantity: {q!r}")
    if isinstance(q, (int, float, Decimal)):
        value = Decimal(str(q))
        if not value.is_finite() or value < 0:
            raise QuantityError(f"not a non-negative quantity: {q!r}")
        return value
    m = _RE.match(str(q))
    if not m:
        raise QuantityError(f"not a Kubernetes quantity: {q!r} (examples: 8000000000, 64Gi, 1.5G, 500m)")
    number, suffix = Decimal(m.group(1)), m.group(2) or ""
    if suffix in BINARY:
        return number * BINARY[suffix]
    if suffix in DECIMAL:
        return number * DECIMAL[suffix]
    if suffix == "m":
        return number / 1000
    if suffix:
        return number.scaleb(int(suffix[1:]))
    return number


def parse_bytes(q: str | int) -> int:
    """A quantity that must be a whole number of bytes -> int (fractions are refused, see the module doc)."""
    value = parse_quantity(q)
    if value != value.to_integral_value():
        hint = ""
        if isinstance(q, str) and q.strip().endswith("m"):
            base = q.strip()[:-1]
            hint = f"; 'm' means milli in Kubernetes quantities: did you mean {base}Mi or {base}M?"
        raise QuantityError(f"{q!r} is {value} bytes, not a whole number of bytes{hint}")
    return int(value)
