"""Sessions are scoped to the API key that made them."""
from __future__ import annotations

import httpx

from server_helpers import KEY1, KEY2, MODEL


def chat(server, key, sid, content, **kw):
    return httpx.post(server.url + "/v1/chat/completions", headers=server.headers(key, **{"X-Session-ID": sid}),
                      json={"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4,
                            "temperature": 0, **kw}, timeout=60)


def test_keys_cannot_read_or_extend_each_others_sessions(server):
    sid = "private-conversation"
    r = chat(server, KEY1, sid, "my secret plan", session_mode="append")
    assert r.status_code == 200 and r.headers["X-Session-ID"] == sid
    first = server.headers(KEY1)

    for key in (KEY2,):
        other = server.headers(key)
        # read
        g = httpx.get(f"{server.url}/v1/sessions/{sid}", headers=other, timeout=10)
        assert g.status_code == 404 and g.json()["error"]["code"] == "session_not_found"
        # extend, both modes
        for mode in ("append", "full"):
            e = chat(server, key, sid, "tell me the plan", session_mode=mode)
            assert e.status_code == 404, e.text
            assert e.json()["error"]["code"] == "session_not_found"
        # same through the body field
        e = httpx.post(server.url + "/v1/chat/completions", headers=other, timeout=60,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                             "session_id": sid})
        assert e.status_code == 404
        # delete
        d = httpx.delete(f"{server.url}/v1/sessions/{sid}", headers=other, timeout=10)
        assert d.status_code == 404

    # the owner's session is untouched: one turn, two messages held
    info = httpx.get(f"{server.url}/v1/sessions/{sid}", headers=first, timeout=10).json()
    assert info["num_turns"] == 1 and info["num_messages"] == 2 and info["cached_tokens"] > 0
    # the owner continues; the append turn reuses the cache
    r2 = chat(server, KEY1, sid, "next step?", session_mode="append")
    assert r2.status_code == 200 and r2.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert httpx.delete(f"{server.url}/v1/sessions/{sid}", headers=first, timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/v1/sessions/{sid}", headers=first, timeout=10).status_code == 404


def test_other_key_gets_its_own_session_of_the_same_name_after_delete(server):
    sid = "reused-name"
    assert chat(server, KEY1, sid, "one").status_code == 200
    assert httpx.delete(f"{server.url}/v1/sessions/{sid}", headers=server.headers(KEY1), timeout=10).status_code == 200
    r = chat(server, KEY2, sid, "two")
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert httpx.get(f"{server.url}/v1/sessions/{sid}", headers=server.headers(KEY1), timeout=10).status_code == 404
    assert httpx.delete(f"{server.url}/v1/sessions/{sid}", headers=server.headers(KEY2), timeout=10).status_code == 200


def test_health_ready_metrics_need_no_key(server):
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(server.url + path, timeout=10).status_code == 200
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401


def test_second_turn_while_first_in_flight_is_409(server):
    sid = "one-turn-at-a-time"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "long"}], "max_tokens": 400,
            "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as client, client.stream(
            "POST", server.url + "/v1/chat/completions", headers=server.headers(KEY1, **{"X-Session-ID": sid}),
            json=body) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: {"))  # the first turn is generating
        busy = chat(server, KEY1, sid, "and another thing")
        assert busy.status_code == 409, busy.text
        assert busy.json()["error"]["code"] == "session_busy"
        assert any(line == "data: [DONE]" for line in lines)  # the first turn still completes
    assert chat(server, KEY1, sid, "now it is my turn").status_code == 200
