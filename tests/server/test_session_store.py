"""Conversations survive their engine: the session store (SQLite, a real redis-server) behind
append mode, engine processes killed with SIGKILL, two engines behind the router sharing one
Redis, and DELETE of a session whose turn is running."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from server_helpers import KEY1, MODEL, free_port, start_server, stop_server

pytestmark = pytest.mark.slow

QUESTIONS = ["what is a pensieve?", "who owns one?", "and what does it hold?"]


def turn(url: str, sid: str, content: str, **kw) -> httpx.Response:
    r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY1}", "X-Session-ID": sid},
                   json={"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 6,
                         "temperature": 0, "session_mode": "append", **kw}, timeout=60)
    assert r.status_code == 200, r.text
    return r


def usage(r: httpx.Response) -> dict:
    u = r.json()["usage"]
    return {"prompt": u["prompt_tokens"], **u["prompt_tokens_details"]}


def transcript(url: str, sid: str) -> list[dict]:
    r = httpx.get(f"{url}/v1/sessions/{sid}", headers={"Authorization": f"Bearer {KEY1}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["messages"]


def reference_reply(url: str, messages: list[dict]) -> str:
    """The reply to the whole conversation sent at once to a fresh session (greedy: the same tokens)."""
    r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY1}"}, timeout=60,
                   json={"model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def recomputed_metric(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    line = next(x for x in text.splitlines() if x.startswith('pensieve_context_tokens_total{source="recomputed"}'))
    return float(line.split()[-1])


def check_continued(url: str, sid: str, replies: list[httpx.Response], before: dict) -> None:
    """The third turn ran on an engine without this session's KV: it recomputed the stored
    conversation (not a fresh start), answered as if never interrupted, and the transcript has
    every turn."""
    after = usage(replies[2])
    assert after["cached_tokens"] == 0
    assert after["recomputed_tokens"] > before["prompt"]  # turn 2's prompt and reply came back from the store
    assert after["prompt"] > before["prompt"]
    msgs = transcript(url, sid)
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 3
    assert [m["content"] for m in msgs[::2]] == QUESTIONS
    assert [m["content"] for m in msgs[1::2]] == [r.json()["choices"][0]["message"]["content"] for r in replies]
    assert reference_reply(url, msgs[:5]) == msgs[5]["content"]


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_append_conversation_survives_sigkill_and_restart(kind, tiny_ckpt, tmp_path, request):
    store = f"sqlite:///{tmp_path / 'sessions.sqlite3'}" if kind == "sqlite" else \
        request.getfixturevalue("redis_url").rsplit("/", 1)[0] + "/4"
    args = ("--api-key", KEY1, "--session-store", store)
    sid = f"survivor-{kind}"
    srv = start_server(tiny_ckpt, tmp_path / "first.log", *args)
    try:
        replies = [turn(srv.url, sid, QUESTIONS[0]), turn(srv.url, sid, QUESTIONS[1])]
        assert usage(replies[1])["cached_tokens"] > 0 and usage(replies[1])["recomputed_tokens"] == 0
    finally:
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(10)
    srv = start_server(tiny_ckpt, tmp_path / "second.log", *args)
    try:
        assert recomputed_metric(srv.url) == 0
        replies.append(turn(srv.url, sid, QUESTIONS[2]))
        assert recomputed_metric(srv.url) == usage(replies[2])["recomputed_tokens"]
        check_continued(srv.url, sid, replies, usage(replies[1]))
    finally:
        stop_server(srv)


def test_two_engines_share_redis_through_the_router(tiny_ckpt, tmp_path, redis_url):
    store = redis_url.rsplit("/", 1)[0] + "/5"
    engines = [start_server(tiny_ckpt, tmp_path / f"engine{i}.log", "--api-key", KEY1, "--session-store", store)
               for i in range(2)]
    addrs = [e.url.removeprefix("http://") for e in engines]
    rport = free_port()
    router = subprocess.Popen([sys.executable, "-m", "pensieve.router", "--port", str(rport),
                               "--static-endpoints", ",".join(addrs), "--health-interval", "0.5",
                               "--eject-seconds", "2"], env=dict(os.environ, PYTHONUNBUFFERED="1"),
                              stdout=open(tmp_path / "router.log", "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{rport}"
    try:
        deadline = time.monotonic() + 30
        while "pensieve_router_ready_endpoints 2.0" not in _get_text(url + "/metrics"):
            assert time.monotonic() < deadline and router.poll() is None, (tmp_path / "router.log").read_text()
            time.sleep(0.2)
        sid = "travels-between-engines"
        replies = [turn(url, sid, QUESTIONS[0]), turn(url, sid, QUESTIONS[1])]
        home = {r.headers["X-Pensieve-Endpoint"] for r in replies}
        assert len(home) == 1  # affinity: both turns on one engine
        victim = engines[addrs.index(home.pop())]
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        replies.append(turn(url, sid, QUESTIONS[2]))
        assert replies[2].headers["X-Pensieve-Endpoint"] != replies[0].headers["X-Pensieve-Endpoint"]
        check_continued(url, sid, replies, usage(replies[1]))
    finally:
        router.kill()
        router.wait(10)
        for e in engines:
            stop_server(e)


def _get_text(url: str) -> str:
    try:
        return httpx.get(url, timeout=2).text
    except httpx.HTTPError:
        return ""


LONG = {"model": MODEL, "messages": [{"role": "user", "content": "talk for a long time"}], "max_tokens": 900,
        "temperature": 0, "ignore_eos": True, "session_mode": "append"}


def _delete(server, sid: str) -> httpx.Response:
    return httpx.delete(f"{server.url}/v1/sessions/{sid}", headers=server.headers(KEY1), timeout=10)


def test_delete_ends_a_running_stream_within_a_second(server):
    sid = "deleted-while-streaming"
    with httpx.Client(timeout=60) as client, client.stream(
            "POST", server.url + "/v1/chat/completions", headers=server.headers(KEY1, **{"X-Session-ID": sid}),
            json={**LONG, "stream": True}) as stream:
        lines = stream.iter_lines()
        next(x for x in lines if x.startswith("data: {") and '"content"' in x)  # it is generating
        t0 = time.monotonic()
        d = _delete(server, sid)
        assert d.status_code == 200 and d.json()["ended_running_turn"] is True
        rest = [x for x in lines if x.startswith("data: ")]
        elapsed = time.monotonic() - t0
    assert elapsed < 1.0, elapsed
    errors = [json.loads(x[6:]) for x in rest if x.startswith("data: {") and '"error"' in x]
    assert errors and errors[-1]["error"]["code"] == "session_deleted", rest[-3:]
    assert rest[-1] == "data: [DONE]"
    assert _delete(server, sid).status_code == 404  # gone: nothing saved it back
    server.wait_idle()


def test_delete_answers_a_running_request_within_a_second(server):
    sid = "deleted-while-waiting"
    result = {}

    def post():
        result["r"] = httpx.post(server.url + "/v1/chat/completions", json=LONG, timeout=60,
                                 headers=server.headers(KEY1, **{"X-Session-ID": sid}))
        result["t"] = time.monotonic()

    th = threading.Thread(target=post)
    th.start()
    deadline = time.monotonic() + 30
    while True:  # wait until the turn is generating
        g = httpx.get(f"{server.url}/v1/sessions/{sid}", headers=server.headers(KEY1), timeout=10)
        if g.status_code == 200 and g.json()["active"] and server.state()["generation_tokens"] > 0:
            break
        assert time.monotonic() < deadline, g.text
        time.sleep(0.02)
    t0 = time.monotonic()
    assert _delete(server, sid).status_code == 200
    th.join(10)
    assert not th.is_alive()
    r = result["r"]
    assert result["t"] - t0 < 1.0
    assert r.status_code == 409 and r.json()["error"]["code"] == "session_deleted", r.text
    assert httpx.get(f"{server.url}/v1/sessions/{sid}", headers=server.headers(KEY1), timeout=10).status_code == 404
    server.wait_idle()
