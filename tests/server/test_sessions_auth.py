"""Sessions are named by (API key, id): one key can neither read, extend, detect nor squat another's."""
from __future__ import annotations

import httpx

from server_helpers import KEY1, KEY2, MODEL


def chat(server, key, sid, content, **kw):
    return httpx.post(server.url + "/v1/chat/completions", headers=server.headers(key, **{"X-Session-ID": sid}),
                      json={"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4,
                            "temperature": 0, **kw}, timeout=60)


def get(server, key, sid):
    return httpx.get(f"{server.url}/v1/sessions/{sid}", headers=server.headers(key), timeout=10)


def delete(server, key, sid):
    return httpx.delete(f"{server.url}/v1/sessions/{sid}", headers=server.headers(key), timeout=10)


def observe(server, key, sid) -> list:
    """Everything a key can learn about an id: GET, DELETE, then a first turn of each mode and GET again."""
    seen = [(get(server, key, sid).status_code, get(server, key, sid).json()["error"]["code"]),
            (delete(server, key, sid).status_code,)]
    for mode in ("append", "full"):
        r = chat(server, key, sid, "tell me the plan", session_mode=mode)
        assert r.status_code == 200, r.text
        seen.append((mode, r.json()["usage"]))
    info = get(server, key, sid).json()
    seen.append((info["num_turns"], info["messages"], info["context_tokens"] > 0))
    assert delete(server, key, sid).status_code == 200
    return seen


def test_another_keys_session_id_looks_exactly_unused(server):
    """(key, id) is the identity: KEY2 cannot tell KEY1's id from one nobody ever used."""
    sid = "private-conversation"
    r = chat(server, KEY1, sid, "my secret plan", session_mode="append")
    assert r.status_code == 200 and r.headers["X-Session-ID"] == sid
    used = observe(server, KEY2, sid)
    unused = observe(server, KEY2, "never-used-by-anyone")
    assert used == unused
    assert used[0] == (404, "session_not_found") and used[1] == (404,)
    assert used[-1][0] == 2 and "secret" not in str(used[-1][1])

    # KEY1's conversation is untouched and continues from its cache.
    info = get(server, KEY1, sid).json()
    assert info["num_turns"] == 1 and info["num_messages"] == 2 and info["cached_tokens"] > 0
    assert info["messages"][0]["content"] == "my secret plan"
    r2 = chat(server, KEY1, sid, "next step?", session_mode="append")
    assert r2.status_code == 200 and r2.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert delete(server, KEY1, sid).status_code == 200
    assert get(server, KEY1, sid).status_code == 404


def test_an_id_cannot_be_squatted(server):
    """KEY2 takes an id first (and is even mid-turn on it): KEY1's first turn on it is a fresh conversation."""
    sid = "squat"
    assert chat(server, KEY2, sid, "mine now", session_mode="append").status_code == 200
    body = {"model": MODEL, "messages": [{"role": "user", "content": "long"}], "max_tokens": 300,
            "temperature": 0, "ignore_eos": True, "stream": True, "session_mode": "append"}
    with httpx.Client(timeout=60) as client, client.stream(
            "POST", server.url + "/v1/chat/completions", headers=server.headers(KEY2, **{"X-Session-ID": sid}),
            json=body) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: {"))  # KEY2's second turn is running
        r = chat(server, KEY1, sid, "hello", session_mode="append")
        assert r.status_code == 200, r.text  # not 404, not 409 session_busy
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        for _ in lines:
            pass
    mine, theirs = get(server, KEY1, sid).json(), get(server, KEY2, sid).json()
    assert [m["content"] for m in mine["messages"][::2]] == ["hello"] and mine["num_turns"] == 1
    assert [m["content"] for m in theirs["messages"][::2]] == ["mine now", "long"] and theirs["num_turns"] == 2
    assert delete(server, KEY1, sid).status_code == 200
    assert get(server, KEY2, sid).json()["num_turns"] == 2  # deleting one never touches the other
    assert delete(server, KEY2, sid).status_code == 200


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
