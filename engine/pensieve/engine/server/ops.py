"""Named operations the server asks of the engine between steps.

A command crosses a process boundary, so it names a module-level function
here instead of carrying a closure; each runs on the engine's thread (in the
engine process, or in the server's engine thread with ``--engine-process
off``) with the engine as first argument and returns plain, picklable data.
"""
from __future__ import annotations

import time

from ..errors import UnknownSessionError
from ..request import SessionKey
from .snapshot import EngineSnapshot, engine_metrics_snapshot


def session_info(engine, key: SessionKey) -> dict | None:
    """What the engine caches of a session (None: nothing)."""
    try:
        s = engine.get_session(key)
    except UnknownSessionError:
        return None
    return {"num_turns": s.num_turns, "cached_tokens": s.num_cached, "cached_blocks": len(s.block_ids),
            "active": s.active_request is not None,
            "idle_seconds": round(max(0.0, time.monotonic() - s.last_active), 3)}


def delete_session(engine, key: SessionKey) -> bool:
    """Forget a session's cache (a turn still running is aborted); False if there was none."""
    try:
        engine.delete_session(key)
    except UnknownSessionError:
        return False
    return True


def stop_at(engine, request_id: str, num_tokens: int, key: SessionKey | None) -> None:
    """The server found a stop string: end the request after ``num_tokens`` (prompt + output)."""
    engine.stop_at(request_id, num_tokens, key)


def snapshot(engine) -> EngineSnapshot:
    return engine_metrics_snapshot(engine)


OPS = {f.__name__: f for f in (session_info, delete_session, stop_at, snapshot)}
