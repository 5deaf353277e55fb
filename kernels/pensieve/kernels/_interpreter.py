"""A fix for Triton's interpreter (CPU tests), applied only when it is active."""
from __future__ import annotations

import os


def _patch_interpreter() -> None:
    """Triton 3.6's interpreter holds scalars as 1-element arrays and converts them
    with ``int(array)``, which NumPy >= 2.4 refuses (loops with run-time bounds
    fail). Convert through ``reshape(-1)[0]`` instead. Only the interpreter is
    touched, and only when it is active."""
    from triton.runtime import interpreter as _it

    orig = getattr(_it, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_pensieve", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._pensieve = True
    _it._patch_lang_tensor = patched


def apply_interpreter_patch() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        _patch_interpreter()
