"""The session store: where conversations live (the KV cache is only a cache of them).

``open_store(url, ...)`` picks the implementation from ``--session-store``:

    sqlite:///PATH          one file (the default, under the cache directory): one server
                            keeps its conversations across restarts
    redis://HOST:PORT/DB    shared by every engine of a deployment (Valkey works too;
                            rediss:// for TLS, redis://:PASSWORD@HOST:PORT/DB)
"""
from .base import SessionLimitError, SessionRecord, SessionStore, StoreUnavailableError
from .factory import default_store_url, open_store

__all__ = ["SessionRecord", "SessionStore", "SessionLimitError", "StoreUnavailableError", "open_store",
           "default_store_url"]
