"""The HTTP server's own settings (the engine's are EngineConfig).

Like EngineConfig, every field becomes a ``serve`` flag and is also read from
``PENSIEVE_<FIELD>`` (``--api-key`` may be repeated; its environment form is
comma-separated: ``PENSIEVE_API_KEY=key1,key2``).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import opt
from ..errors import InvalidRequestError
from .store.factory import check_store_url


@dataclass
class ServerConfig:
    host: str = opt("0.0.0.0", "address to listen on")
    port: int = opt(8000, "port to listen on (0: any free port, logged at start)")
    api_key: list[str] = opt([], "accepted bearer token; repeat for several keys. None given: no authentication")
    max_waiting_requests: int = opt(256, "requests allowed to wait for admission; beyond it new ones get 429")
    max_body_bytes: int = opt(4 << 20, "largest request body accepted (413 beyond)")
    drain_timeout: float = opt(30.0, "seconds in-flight requests get to finish after SIGTERM before they are aborted")
    default_max_tokens: int | None = opt(None, "max_tokens of a request that gives none (default: fill the context)")
    max_session_id_len: int = opt(128, "longest accepted session id")
    header_timeout: float = opt(30.0, "seconds a connection gets to deliver a complete request head, counted from "
                                      "its opening or from its previous response (so also how long an idle "
                                      "keep-alive connection stays open); then it is closed")
    body_timeout: float = opt(60.0, "seconds a request gets to deliver its whole body (408 and the connection "
                                    "closed beyond)")
    max_connections: int = opt(1024, "most open client connections; one more is answered 503 and closed")
    session_store: str | None = opt(None, "where conversations are kept: sqlite:///PATH (default: a file under "
                                          "~/.cache/pensieve) or redis://HOST:PORT/DB (shared by all engines)")
    engine_process: str = opt("on", "run the engine core in a process of its own (on), or in a thread of the server "
                                    "process (off: one interpreter lock shared with HTTP and tokenization)",
                              ("on", "off"))
    max_sessions_per_key: int = opt(1000, "sessions one API key may hold in the store (0: no bound); a new "
                                          "session beyond it gets 429 too_many_sessions")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidRequestError(f"port must be in [0, 65535], got {self.port}", "port")
        if self.max_waiting_requests < 0:
            raise InvalidRequestError("max_waiting_requests must be >= 0", "max_waiting_requests")
        if self.max_body_bytes < 1024:
            raise InvalidRequestError("max_body_bytes must be at least 1024", "max_body_bytes")
        if self.drain_timeout < 0:
            raise InvalidRequestError("drain_timeout must be >= 0", "drain_timeout")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise InvalidRequestError("default_max_tokens must be >= 1", "default_max_tokens")
        for name in ("header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:  # also refuses NaN
                raise InvalidRequestError(f"{name} must be > 0 seconds", name)
        if self.max_connections < 1:
            raise InvalidRequestError("max_connections must be >= 1", "max_connections")
        if self.session_store:
            check_store_url(self.session_store)
        if self.max_sessions_per_key < 0:
            raise InvalidRequestError("max_sessions_per_key must be >= 0", "max_sessions_per_key")
        self.api_key = [k for k in (self.api_key or []) if k]
