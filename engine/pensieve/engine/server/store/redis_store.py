"""SessionStore in Redis (or Valkey): shared by every engine of a deployment.

Keys, with the owner as a hash tag so one owner's keys share a cluster slot:

    pensieve:{OWNER}:s:ID   the record (JSON), expiring ``ttl`` after its last turn
    pensieve:{OWNER}:idx    sorted set of the owner's ids scored by last-turn time (ms)

The TTL is Redis' own expiry on each record; the index drops ids older than
the TTL before it is counted. Creating a record and checking the owner's bound
happen in one Lua script, so two engines cannot both take the last slot.
"""
from __future__ import annotations

import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .base import SessionLimitError, SessionRecord, SessionStore, StoreUnavailableError, owner_id

PREFIX = "pensieve:"

# KEYS: record, index. ARGV: record JSON, id, now (ms), ttl (ms, 0: none), max per owner (0: none).
PUT_SCRIPT = """
local now, ttl, max = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if ttl > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - ttl)) end
if max > 0 and redis.call('EXISTS', KEYS[1]) == 0 and redis.call('ZCARD', KEYS[2]) >= max then
  return redis.call('ZCARD', KEYS[2])
end
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('ZADD', KEYS[2], now, ARGV[2])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return -1
"""


class RedisStore(SessionStore):
    kind = "redis"

    def __init__(self, url: str, ttl: float, max_per_owner: int):
        super().__init__(ttl, max_per_owner)
        self.url = url
        self._r = aioredis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0,
                                    health_check_interval=30)
        self._put_script = self._r.register_script(PUT_SCRIPT)

    def describe(self) -> str:
        kw = self._r.connection_pool.connection_kwargs
        where = kw.get("path") or f"{kw.get('host', '?')}:{kw.get('port', '?')}"
        return f"redis {where} db {kw.get('db', 0)}"

    @staticmethod
    def _keys(owner: str | None, sid: str | None = None) -> tuple[str, str]:
        tag = f"{PREFIX}{{{owner_id(owner)}}}:"
        return tag + "s:" + (sid or ""), tag + "idx"

    def _ttl_ms(self) -> int:
        return int(self.ttl * 1000) if self.ttl > 0 else 0

    async def get(self, owner, session_id):
        key, _ = self._keys(owner, session_id)
        try:
            raw = await self._r.get(key)
        except RedisError as e:
            raise StoreUnavailableError(f"session store {self.describe()}: {e}") from e
        return SessionRecord.from_json(owner_id(owner), session_id, raw) if raw is not None else None

    async def put(self, record):
        key, idx = self._keys(record.owner, record.session_id)
        args = [record.to_json(), record.session_id, int(time.time() * 1000), self._ttl_ms(), self.max_per_owner]
        try:
            held = await self._put_script(keys=[key, idx], args=args)
        except RedisError as e:
            raise StoreUnavailableError(f"session store {self.describe()}: {e}") from e
        if int(held) >= 0:
            raise SessionLimitError(f"this API key already has {held} sessions (the limit)")

    async def delete(self, owner, session_id):
        key, idx = self._keys(owner, session_id)
        try:
            async with self._r.pipeline(transaction=True) as p:
                deleted, _ = await p.delete(key).zrem(idx, session_id).execute()
        except RedisError as e:
            raise StoreUnavailableError(f"session store {self.describe()}: {e}") from e
        return bool(deleted)

    async def count(self, owner):
        _, idx = self._keys(owner)
        try:
            if self.ttl > 0:
                await self._r.zremrangebyscore(idx, "-inf", f"({int(time.time() * 1000) - self._ttl_ms()}")
            return int(await self._r.zcard(idx))
        except RedisError as e:
            raise StoreUnavailableError(f"session store {self.describe()}: {e}") from e

    async def ping(self):
        try:
            await self._r.ping()
        except RedisError as e:
            raise StoreUnavailableError(f"session store {self.describe()}: {e}") from e

    async def close(self):
        await self._r.aclose()
