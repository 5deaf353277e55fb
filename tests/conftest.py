"""Fixtures shared by every test tier."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _session_store_per_run(tmp_path_factory):
    """Engines the tests start keep their conversations in this run's own SQLite file, not in the
    user's cache directory (the default), so no run sees another's sessions. Tests that care about
    the store pass --session-store themselves."""
    if "PENSIEVE_SESSION_STORE" not in os.environ:
        path = tmp_path_factory.mktemp("session-store") / "sessions.sqlite3"
        os.environ["PENSIEVE_SESSION_STORE"] = f"sqlite:///{path}"
    yield


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server on a free loopback port for the whole run; its URL (db 0)."""
    from redis_server import start_redis

    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server.url()
    server.stop()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(family) -> folder of a tiny random checkpoint, made once per session."""
    from pensieve.engine.tiny import make_tiny_checkpoint

    made = {}

    def make(family: str = "llama"):
        if family not in made:
            made[family] = str(make_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{family}"), family, seed=0))
        return made[family]

    return make
