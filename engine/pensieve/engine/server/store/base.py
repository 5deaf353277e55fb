"""The session record and the store interface.

A SessionRecord is the one durable copy of a conversation. Its identity is
``(owner, session_id)``: ``owner`` is the identity of the API key that made it
(a digest, never the key), so the same id under two keys names two unrelated
records. Every implementation enforces, itself, the two bounds of the
interface: records idle longer than ``ttl`` seconds are gone (reads never
return them), and an owner holds at most ``max_per_owner`` records (creating
one more raises SessionLimitError; updating an existing one always works).
"""
from __future__ import annotations

import abc
import json
import time
from dataclasses import dataclass, field

ANONYMOUS = "-"  # the owner of every record when the server has no API keys


class SessionLimitError(Exception):
    """Creating this record would exceed the owner's ``max_per_owner``."""


class StoreUnavailableError(Exception):
    """The store could not be reached or failed (the caller answers 503)."""


@dataclass
class SessionRecord:
    owner: str
    session_id: str
    token_ids: list[int] = field(default_factory=list)  # the context the last turn ended with: prompt + output
    messages: list[dict] = field(default_factory=list)  # the transcript: every chat message, replies included
    num_turns: int = 0
    created: float = field(default_factory=time.time)   # unix seconds
    updated: float = field(default_factory=time.time)   # last finished turn; the idle TTL counts from here
    # token_ids end with the last reply as generated, whose text is the transcript's last message
    # (append mode may then extend token_ids: PromptEncoder.encode_continuation); False when a stop
    # string cut the reply's text short of its tokens, or the last turn was no chat reply
    reply_is_tail: bool = False

    def to_json(self) -> str:
        return json.dumps({"token_ids": self.token_ids, "messages": self.messages, "num_turns": self.num_turns,
                           "created": self.created, "updated": self.updated, "reply_is_tail": self.reply_is_tail},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, owner: str, session_id: str, raw: str | bytes) -> "SessionRecord":
        d = json.loads(raw)
        return cls(owner, session_id, list(d.get("token_ids", [])), list(d.get("messages", [])),
                   int(d.get("num_turns", 0)), float(d.get("created", 0.0)), float(d.get("updated", 0.0)),
                   bool(d.get("reply_is_tail", False)))


def owner_id(owner: str | None) -> str:
    return owner or ANONYMOUS


class SessionStore(abc.ABC):
    """Async interface; implementations are safe to call from one event loop."""

    def __init__(self, ttl: float, max_per_owner: int):
        self.ttl = ttl                      # seconds; 0: records never expire
        self.max_per_owner = max_per_owner  # 0: unbounded

    @property
    @abc.abstractmethod
    def kind(self) -> str:
        """'sqlite' or 'redis'."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the records are, for logs (never a password)."""

    @abc.abstractmethod
    async def get(self, owner: str | None, session_id: str) -> SessionRecord | None:
        """The record, or None if there is none (never made, deleted, or idle past the TTL)."""

    @abc.abstractmethod
    async def put(self, record: SessionRecord) -> None:
        """Create or replace the record, refreshing its TTL. SessionLimitError if it is new and its
        owner already holds ``max_per_owner`` records."""

    @abc.abstractmethod
    async def delete(self, owner: str | None, session_id: str) -> bool:
        """Remove the record; True if there was one."""

    @abc.abstractmethod
    async def count(self, owner: str | None) -> int:
        """Live records of this owner."""

    async def purge(self) -> int:
        """Remove expired records now (where the backend does not expire them itself)."""
        return 0

    async def ping(self) -> None:
        """Raise StoreUnavailableError if the store cannot be used."""

    async def close(self) -> None:
        pass
