"""Conversations: the server's side of sessions, one owner for each.

The SessionStore holds the durable record of every conversation (owner, id,
token history, transcript). The engine's KV cache is only a cache of it: a
turn for a session whose KV this engine does not hold renders the stored
transcript and recomputes it. This module owns

- the store (reads, the write at the end of each turn, deletes, the bound
  on sessions per key, the periodic purge of expired records);
- the turns running in this server, one per session at a time (a second
  one gets 409 ``session_busy``), so that DELETE can end a running turn.

Identity is ``SessionKey(owner, id)`` everywhere: another key's id is simply a
different, unused session here, in the engine and in the store.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from ..request import SessionKey
from .protocol import APIError
from .store import SessionLimitError, SessionRecord, SessionStore, StoreUnavailableError

log = logging.getLogger("pensieve.server")

PURGE_INTERVAL = 60.0  # seconds between sweeps of expired records (reads already ignore them)


@dataclass(eq=False)
class Turn:
    """One running turn of a session in this server."""

    key: SessionKey
    record: SessionRecord | None = None  # what the store had when the turn began
    request_id: str | None = None        # set once the request is handed to the engine
    deleted: bool = False                # DELETE arrived while it ran: end it, never save it
    prompt_ids: list[int] = field(default_factory=list)


def store_unavailable(e: Exception) -> APIError:
    return APIError(503, f"the session store is unavailable: {e}", type="service_unavailable",
                    code="session_store_unavailable", headers={"Retry-After": "1"})


def session_deleted(sid: str) -> APIError:
    return APIError(409, f"session {sid!r} was deleted while this turn was running", param="session_id",
                    code="session_deleted")


class Conversations:
    def __init__(self, store: SessionStore):
        self.store = store
        self.running: dict[SessionKey, Turn] = {}
        self._locks: dict[SessionKey, asyncio.Lock] = {}
        self._purger: asyncio.Task | None = None

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        try:
            await self.store.ping()
        except StoreUnavailableError as e:  # not fatal: a Redis that comes up later is used then
            log.warning("%s", e)
        self._purger = asyncio.get_running_loop().create_task(self._purge_loop())

    async def close(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
        await self.store.close()

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(PURGE_INTERVAL)
            try:
                n = await self.store.purge()
                if n:
                    log.info("session store: %d expired session(s) removed", n)
            except StoreUnavailableError as e:
                log.warning("%s", e)

    # ------------------------------------------------------------ turns
    async def begin(self, owner: str | None, sid: str) -> Turn:
        """Register a turn of (owner, sid) and load its record. 409 if one is running here,
        429 if the session is new and the key is at its bound, 503 if the store fails."""
        key = SessionKey(owner, sid)
        if key in self.running:
            raise APIError(409, f"session {sid!r} already has a turn in progress; wait for it to finish",
                           param="session_id", code="session_busy")
        turn = self.running[key] = Turn(key)
        try:
            turn.record = await self.store.get(owner, sid)
            limit = self.store.max_per_owner
            if turn.record is None and limit > 0 and await self.store.count(owner) >= limit:
                raise APIError(429, f"this API key already has {limit} sessions; delete some or let idle ones "
                                    "expire", type="rate_limit_error", param="session_id", code="too_many_sessions")
        except StoreUnavailableError as e:
            self.end(turn)
            raise store_unavailable(e) from None
        except BaseException:
            self.end(turn)
            raise
        return turn

    def end(self, turn: Turn) -> None:
        if self.running.get(turn.key) is turn:
            del self.running[turn.key]

    async def commit(self, turn: Turn, token_ids: list[int], messages: list[dict] | None,
                     reply_is_tail: bool = False) -> None:
        """Save a finished turn: its context tokens and (chat) the transcript with the reply
        (``reply_is_tail``: see SessionRecord)."""
        owner, sid = turn.key
        async with self._lock(turn.key):
            if turn.deleted:
                return
            now = time.time()
            old = turn.record
            rec = SessionRecord(owner or "", sid, token_ids, messages if messages is not None else
                                (old.messages if old else []), (old.num_turns if old else 0) + 1,
                                old.created if old else now, now, reply_is_tail and messages is not None)
            try:
                await self.store.put(rec)
            except SessionLimitError as e:  # another turn took the last slot since begin()
                raise APIError(429, f"{e}; this turn was not saved", type="rate_limit_error", param="session_id",
                               code="too_many_sessions") from None
            except StoreUnavailableError as e:
                raise store_unavailable(e) from None

    def end_running(self, key: SessionKey) -> Turn | None:
        """DELETE arrived: mark the session's running turn (if any) deleted, so that its end is
        reported as ``session_deleted`` and it is never saved. The caller aborts its request."""
        turn = self.running.get(key)
        if turn is not None:
            turn.deleted = True
        return turn

    async def delete(self, owner: str | None, sid: str) -> bool:
        """Remove the record (after end_running); True if there was one."""
        key = SessionKey(owner, sid)
        self.end_running(key)
        async with self._lock(key):
            try:
                return await self.store.delete(owner, sid)
            except StoreUnavailableError as e:
                raise store_unavailable(e) from None

    async def get(self, owner: str | None, sid: str) -> SessionRecord | None:
        try:
            return await self.store.get(owner, sid)
        except StoreUnavailableError as e:
            raise store_unavailable(e) from None

    # A write and a delete of one session never interleave (a delete must not be undone by a
    # turn that was saving as it arrived). The lock is dropped once nobody holds or awaits it.
    def _lock(self, key: SessionKey) -> "_KeyLock":
        return _KeyLock(self._locks, key)


class _KeyLock:
    """``async with`` one session's lock; the entry (lock, users) goes once no one uses it."""

    def __init__(self, locks: dict, key):
        self.locks, self.key = locks, key

    async def __aenter__(self):
        entry = self.locks.setdefault(self.key, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            await entry[0].acquire()
        except BaseException:
            self._leave(entry)
            raise
        self.entry = entry

    async def __aexit__(self, *exc):
        self.entry[0].release()
        self._leave(self.entry)

    def _leave(self, entry) -> None:
        entry[1] -= 1
        if entry[1] == 0 and self.locks.get(self.key) is entry:
            del self.locks[self.key]
