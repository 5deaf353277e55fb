"""The two SessionStore implementations against the same contract (SQLite file, real redis-server)."""
from __future__ import annotations

import asyncio
import os

import pytest

from pensieve.engine.errors import InvalidRequestError
from pensieve.engine.server.store import SessionLimitError, SessionRecord, open_store
from pensieve.engine.server.store.factory import check_store_url, default_store_url


@pytest.fixture(params=["sqlite", "redis"])
def with_store(request, tmp_path):
    """with_store(coro_fn, ttl=, max_per_owner=, db=): run ``coro_fn(store)`` in one event loop on a
    fresh store of this kind (a Redis db flushed first), then close the store."""

    def run(fn, ttl: float = 0.0, max_per_owner: int = 0, db: int = 0):
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path / f'sessions-{db}.sqlite3'}"
        else:
            url = request.getfixturevalue("redis_url").rsplit("/", 1)[0] + f"/{db}"

        async def main():
            store = open_store(url, ttl, max_per_owner)
            try:
                if store.kind == "redis":
                    await store._r.flushdb()
                await fn(store)
            finally:
                await store.close()
        asyncio.run(main())

    return run


def test_put_get_delete_and_owner_isolation(with_store):
    async def main(store):
        rec = SessionRecord("owner-a", "s1", [1, 2, 3], [{"role": "user", "content": "hi"}], 1)
        await store.put(rec)
        got = await store.get("owner-a", "s1")
        assert got.token_ids == [1, 2, 3] and got.messages == rec.messages and got.num_turns == 1
        assert await store.get("owner-b", "s1") is None  # another owner: a different, absent record
        assert await store.count("owner-a") == 1 and await store.count("owner-b") == 0
        assert await store.delete("owner-b", "s1") is False
        assert await store.delete("owner-a", "s1") is True
        assert await store.get("owner-a", "s1") is None and await store.count("owner-a") == 0
        # None (a server without API keys) is an owner of its own
        await store.put(SessionRecord("", "anon", [5], [], 1))
        assert (await store.get(None, "anon")).token_ids == [5]
    with_store(main, db=1)


def test_bound_per_owner_is_enforced_by_the_store(with_store):
    async def main(store):
        await store.put(SessionRecord("a", "s1"))
        await store.put(SessionRecord("a", "s2"))
        with pytest.raises(SessionLimitError):
            await store.put(SessionRecord("a", "s3"))
        await store.put(SessionRecord("a", "s2", [9], [], 2))  # updating an existing one always works
        await store.put(SessionRecord("b", "s3"))              # other owners have their own bound
        await store.delete("a", "s1")
        await store.put(SessionRecord("a", "s3"))
        assert await store.count("a") == 2
        # concurrent creations cannot overshoot the bound
        await store.delete("a", "s3")
        results = await asyncio.gather(*(store.put(SessionRecord("a", f"c{i}")) for i in range(6)),
                                       return_exceptions=True)
        assert sum(r is None for r in results) == 1 and await store.count("a") == 2
        assert all(isinstance(r, SessionLimitError) for r in results if r is not None)
    with_store(main, max_per_owner=2, db=2)


def test_idle_ttl_is_enforced_by_the_store(with_store):
    async def main(store):
        await store.put(SessionRecord("a", "old"))
        assert await store.get("a", "old") is not None
        await asyncio.sleep(1.3)
        assert await store.get("a", "old") is None
        assert await store.count("a") == 0
        await store.put(SessionRecord("a", "new"))  # the expired one no longer counts against the bound
        await store.purge()
        assert await store.delete("a", "old") is False
    with_store(main, ttl=1.0, max_per_owner=1, db=3)


def test_store_urls():
    assert check_store_url("sqlite:///var/lib/x.db") == ("sqlite", "/var/lib/x.db")
    assert check_store_url("redis://10.0.0.1:6379/2")[0] == "redis"
    for bad in ("sqlite://relative.db", "sqlite:///", "mysql://x", "/tmp/x.db", ""):
        with pytest.raises(InvalidRequestError):
            check_store_url(bad)
    url = default_store_url("org/My Model")
    assert url.startswith("sqlite:///") and url.endswith("sessions-org_My_Model.sqlite3")
    assert "/.cache/pensieve/" in url or "PENSIEVE_CACHE" in os.environ
