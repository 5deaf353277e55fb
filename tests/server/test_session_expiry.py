"""Idle sessions are forgotten after --session-idle-timeout: the engine's cache and
the session store's record both go, so storage does not grow without bound."""
from __future__ import annotations

import time

import httpx

from server_helpers import KEY1, MODEL, start_server, stop_server


def test_idle_session_expires(tiny_ckpt, tmp_path):
    srv = start_server(tiny_ckpt, tmp_path / "server.log", "--api-key", KEY1, "--session-idle-timeout", "1.5")
    try:
        h = srv.headers(KEY1, **{"X-Session-ID": "brief"})
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
                "session_mode": "append"}
        assert httpx.post(srv.url + "/v1/chat/completions", headers=h, json=body, timeout=30).status_code == 200
        assert httpx.get(srv.url + "/v1/sessions/brief", headers=h, timeout=10).status_code == 200
        deadline = time.monotonic() + 15
        status = 200
        while time.monotonic() < deadline and status == 200:
            time.sleep(0.5)
            status = httpx.get(srv.url + "/v1/sessions/brief", headers=h, timeout=10).status_code
        assert status == 404
        assert srv.state()["sessions_active"] == 0  # the engine dropped its KV too
        # The same id now starts a new conversation: the old transcript is gone from the store.
        r = httpx.post(srv.url + "/v1/chat/completions", headers=h, json=body, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens_details"]["recomputed_tokens"] == 0
        info = httpx.get(srv.url + "/v1/sessions/brief", headers=h, timeout=10).json()
        assert info["num_turns"] == 1 and len(info["messages"]) == 2
    finally:
        stop_server(srv)
