"""Stop strings with the engine in its own process (and, for comparison, in a thread).

The server turns token ids into text and finds stop strings; the engine, which
runs ahead, is told to end the request at the token that completed the stop
string. Checked against the in-process library engine (the reference text and
token count), streamed and not streamed, and across a session's next turn:
the stored transcript holds exactly the text the client saw, the engine's
cache ends where the reply did, and the follow-up turn answers what a
stateless request for the same conversation answers.
"""
from __future__ import annotations

import json

import httpx
import pytest

from server_helpers import KEY1, MODEL, start_server, stop_server

PROMPT = "once upon a time"
GEN = {"model": MODEL, "max_tokens": 24, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    """The unstopped greedy text of PROMPT, a stop string from its middle, and what the library
    engine makes of PROMPT with that stop string."""
    from pensieve.engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(model=str(tiny_ckpt), device="cpu", num_gpu_blocks=64))

    def run(stop: list[str]) -> tuple[str, int, str]:
        engine.add_request(PROMPT, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=stop))
        text, n, reason = "", 0, None
        while engine.has_unfinished():
            for out in engine.step():
                text += out.new_text
                n += len(out.new_token_ids)
                reason = out.finish_reason
        return text, n, reason

    full, _, _ = run([])
    k = len(full) // 3
    stop = full[k:k + 3]
    text, n, reason = run([stop])
    assert reason == "stop" and text == full[:full.find(stop)] and 0 < n < 24, (full, stop, text, n)
    return {"stop": stop, "text": text, "tokens": n}


@pytest.fixture(scope="module", params=["on", "off"])
def srv(request, tiny_ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("stop") / f"server-{request.param}.log"
    s = start_server(tiny_ckpt, log, "--num-gpu-blocks", "64", "--engine-process", request.param)
    yield s
    stop_server(s)
    assert s.proc.returncode == 0, s.log.read_text()[-3000:]


def _post(url: str, path: str, body: dict, **headers) -> httpx.Response:
    r = httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {KEY1}", **headers}, timeout=60)
    assert r.status_code == 200, r.text
    return r


def _stream_text(url: str, path: str, body: dict) -> tuple[str, str, dict]:
    text, finish, usage = "", None, None
    with httpx.stream("POST", url + path, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                      timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            obj = json.loads(line[6:])
            if obj.get("usage") and not obj["choices"]:
                usage = obj["usage"]
            for c in obj["choices"]:
                text += c.get("text") or c.get("delta", {}).get("content") or ""
                finish = c["finish_reason"] or finish
    return text, finish, usage


def test_completion_stops_like_the_library_engine(srv, reference):
    body = {**GEN, "prompt": PROMPT, "stop": [reference["stop"]]}
    r = _post(srv.url, "/v1/completions", body).json()
    assert r["choices"][0]["text"] == reference["text"]
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] == reference["tokens"]
    text, finish, usage = _stream_text(srv.url, "/v1/completions", body)
    assert (text, finish) == (reference["text"], "stop")
    assert usage["completion_tokens"] == reference["tokens"]


def test_next_turn_sees_exactly_the_reply(srv, reference):
    stop = reference["stop"]
    chat = {**GEN, "session_mode": "append"}
    first = [{"role": "user", "content": PROMPT}]
    # What the chat reply is without and with the stop string (stateless).
    plain = _post(srv.url, "/v1/chat/completions", {**GEN, "messages": first}).json()
    full = plain["choices"][0]["message"]["content"]
    cut = full.find(stop)
    if cut < 0:  # the chat template changes the reply: take the stop string from this one
        k = len(full) // 3
        stop, cut = full[k:k + 3], full.find(full[k:k + 3])
    assert cut > 0, full

    sid = f"stop-{srv.url.rsplit(':', 1)[1]}"
    one = _post(srv.url, "/v1/chat/completions", {**chat, "messages": first, "stop": [stop]},
                **{"X-Session-ID": sid}).json()
    reply = one["choices"][0]["message"]["content"]
    assert reply == full[:cut] and one["choices"][0]["finish_reason"] == "stop"
    text, finish, _ = _stream_text(srv.url, "/v1/chat/completions", {**GEN, "messages": first, "stop": [stop]})
    assert (text, finish) == (reply, "stop")

    info = httpx.get(f"{srv.url}/v1/sessions/{sid}", headers={"Authorization": f"Bearer {KEY1}"}, timeout=10).json()
    assert info["messages"][-1] == {"role": "assistant", "content": reply}
    u = one["usage"]
    assert info["context_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    # The engine's cache ends where the reply did (the last token's KV may not be computed yet).
    assert info["context_tokens"] - 1 <= info["cached_tokens"] <= info["context_tokens"], info

    follow = [{"role": "user", "content": "and then?"}]
    two = _post(srv.url, "/v1/chat/completions", {**chat, "max_tokens": 8, "messages": follow},
                **{"X-Session-ID": sid}).json()
    assert two["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    stateless = _post(srv.url, "/v1/chat/completions", {
        **GEN, "max_tokens": 8,
        "messages": first + [{"role": "assistant", "content": reply}] + follow}).json()
    assert two["choices"][0]["message"]["content"] == stateless["choices"][0]["message"]["content"]
    assert two["usage"]["prompt_tokens"] == stateless["usage"]["prompt_tokens"]
