"""Escaping what a client sent before it reaches the log.

A decoded URL path, a header or a session id may hold a newline, an escape
sequence or a bidirectional override; logged as is, a client could forge log
lines (``GET /v1/x%0AFORGED ...``) or hide text from whoever reads the log.
``clean`` writes every such character as a visible escape (``\\n``,
``\\x1b``, ``\\u202e``) and the backslash itself as ``\\\\``, so a logged
value is one line and reads back unambiguously. Every request-derived value
the server logs goes through it.
"""
from __future__ import annotations

import re

# C0 controls, DEL, C1 controls (NEL included), the backslash, Unicode line and paragraph
# separators, bidirectional controls and marks, and lone surrogates (not encodable to the log).
_UNSAFE = re.compile("[\\x00-\\x1f\\x7f-\\x9f\\\\\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape(m: re.Match) -> str:
    c = m.group()
    named = _NAMED.get(c)
    if named is not None:
        return named
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(value: object, limit: int = 512) -> str:
    """``value`` as one printable log token: unsafe characters escaped, at most ``limit``
    characters kept (a cut is marked with ``...``)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return _UNSAFE.sub(_escape, text)
