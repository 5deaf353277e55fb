"""SessionStore in one SQLite file: a single server keeps its conversations across restarts.

All access goes through one connection on one dedicated thread (SQLite
connections are not shared across threads, and the event loop must never wait
on disk). WAL journaling: a committed turn survives the process being killed
(SIGKILL); ``synchronous=NORMAL`` may lose the last turns on a power loss or
kernel crash, which a cache-backed chat service accepts. The TTL is enforced
on every read (expired rows are invisible) and rows are purged periodically.
"""
from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .base import SessionLimitError, SessionRecord, SessionStore, StoreUnavailableError, owner_id

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    owner   TEXT NOT NULL,
    id      TEXT NOT NULL,
    updated REAL NOT NULL,
    record  TEXT NOT NULL,
    PRIMARY KEY (owner, id)
);
CREATE INDEX IF NOT EXISTS sessions_updated ON sessions (updated);
"""


class SqliteStore(SessionStore):
    kind = "sqlite"

    def __init__(self, path: str | os.PathLike, ttl: float, max_per_owner: int):
        super().__init__(ttl, max_per_owner)
        self.path = Path(path)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pensieve-session-store")
        self._db: sqlite3.Connection | None = None  # created and used on the pool's thread only

    def describe(self) -> str:
        return f"sqlite:///{self.path}"

    # ------------------------------------------------------------ on the store thread
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            self._db = db
        return self._db

    def _cutoff(self) -> float:
        return time.time() - self.ttl if self.ttl > 0 else float("-inf")

    def _get(self, owner: str, sid: str) -> SessionRecord | None:
        row = self._conn().execute("SELECT record FROM sessions WHERE owner = ? AND id = ? AND updated >= ?",
                                   (owner, sid, self._cutoff())).fetchone()
        return SessionRecord.from_json(owner, sid, row[0]) if row else None

    def _put(self, rec: SessionRecord) -> None:
        db = self._conn()
        owner = owner_id(rec.owner)
        db.execute("BEGIN IMMEDIATE")  # the count and the insert see the same state
        try:
            db.execute("DELETE FROM sessions WHERE owner = ? AND updated < ?", (owner, self._cutoff()))
            exists = db.execute("SELECT 1 FROM sessions WHERE owner = ? AND id = ?", (owner, rec.session_id)).fetchone()
            if not exists and self.max_per_owner > 0:
                (n,) = db.execute("SELECT count(*) FROM sessions WHERE owner = ?", (owner,)).fetchone()
                if n >= self.max_per_owner:
                    raise SessionLimitError(f"this API key already has {n} sessions (the limit)")
            db.execute("INSERT OR REPLACE INTO sessions (owner, id, updated, record) VALUES (?, ?, ?, ?)",
                       (owner, rec.session_id, rec.updated, rec.to_json()))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _delete(self, owner: str, sid: str) -> bool:
        cur = self._conn().execute("DELETE FROM sessions WHERE owner = ? AND id = ? AND updated >= ?",
                                   (owner, sid, self._cutoff()))
        return cur.rowcount > 0

    def _count(self, owner: str) -> int:
        (n,) = self._conn().execute("SELECT count(*) FROM sessions WHERE owner = ? AND updated >= ?",
                                    (owner, self._cutoff())).fetchone()
        return n

    def _purge(self) -> int:
        return self._conn().execute("DELETE FROM sessions WHERE updated < ?", (self._cutoff(),)).rowcount

    # ------------------------------------------------------------ async API
    async def _run(self, fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except sqlite3.Error as e:
            raise StoreUnavailableError(f"session store {self.describe()}: {e}") from e

    async def get(self, owner, session_id):
        return await self._run(self._get, owner_id(owner), session_id)

    async def put(self, record):
        await self._run(self._put, record)

    async def delete(self, owner, session_id):
        return await self._run(self._delete, owner_id(owner), session_id)

    async def count(self, owner):
        return await self._run(self._count, owner_id(owner))

    async def purge(self):
        return await self._run(self._purge)

    async def ping(self):
        await self._run(lambda: self._conn().execute("SELECT 1").fetchone())

    async def close(self):
        def _close():
            if self._db is not None:
                self._db.close()
                self._db = None
        await self._run(_close)
        self._pool.shutdown(wait=True)
