"""``--session-store`` URL -> SessionStore."""
from __future__ import annotations

import os
import re
from pathlib import Path

from ...errors import InvalidRequestError
from .base import SessionStore

SCHEMES = ("sqlite", "redis", "rediss", "unix")


def cache_dir() -> Path:
    """The project's cache directory (PENSIEVE_CACHE, else ~/.cache/pensieve)."""
    return Path(os.environ.get("PENSIEVE_CACHE") or Path.home() / ".cache" / "pensieve")


def default_store_url(served_model_name: str) -> str:
    """One SQLite file per served model under the cache directory (token histories are model-specific)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", served_model_name) or "model"
    return f"sqlite:///{cache_dir() / f'sessions-{safe}.sqlite3'}"


def check_store_url(url: str) -> tuple[str, str]:
    """(scheme, rest) of a valid store URL; InvalidRequestError otherwise."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise InvalidRequestError(f"--session-store {url!r}: expected sqlite:///PATH or redis://HOST:PORT/DB",
                                  "session_store")
    if scheme == "sqlite" and (not rest.startswith("/") or rest == "/"):
        raise InvalidRequestError(f"--session-store {url!r}: give an absolute path, sqlite:///PATH", "session_store")
    return scheme, rest


def open_store(url: str, ttl: float, max_per_owner: int) -> SessionStore:
    scheme, rest = check_store_url(url)
    if scheme == "sqlite":
        from .sqlite_store import SqliteStore
        return SqliteStore(rest, ttl, max_per_owner)
    from .redis_store import RedisStore  # redis-py only where a Redis store is used
    return RedisStore(url, ttl, max_per_owner)
