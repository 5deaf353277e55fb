"""Typed errors of the engine API. The server maps them to OpenAI-shaped HTTP errors."""
from __future__ import annotations


class PensieveError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(PensieveError, ValueError):
    """Bad input from a client (HTTP 400). ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ContextLengthExceededError(InvalidRequestError):
    """The prompt does not fit in the model's context (HTTP 400)."""

    def __init__(self, message: str, param: str | None = "messages"):
        super().__init__(message, param=param, code="context_length_exceeded")


class SessionBusyError(InvalidRequestError):
    """A session already has a request in flight; turns of one session are sequential (HTTP 409)."""

    def __init__(self, session_id: str):
        super().__init__(f"session {session_id!r} already has a request in flight", param="session_id", code="session_busy")


class UnknownSessionError(PensieveError, KeyError):
    """No such session (HTTP 404)."""

    def __init__(self, session_id: str):
        super().__init__(session_id)
        self.message = f"session {session_id!r} not found"
        self.session_id = session_id

    def __str__(self) -> str:
        return self.message


class CheckpointError(PensieveError):
    """A checkpoint folder is missing, incomplete or malformed. The message names the file."""


class QueueFullError(PensieveError):
    """The waiting queue is full (HTTP 429)."""


class EngineDeadError(RuntimeError):
    """The engine (its process or thread) is gone; the server answers 503 and exits."""
