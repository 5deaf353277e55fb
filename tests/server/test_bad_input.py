"""Table-driven bad input: each case gets its 4xx with an OpenAI-shaped JSON
error, the server stays up, and afterwards nothing is held (no request in the
engine, KV blocks and sessions back to where they were)."""
from __future__ import annotations

import json

import httpx
import pytest

from server_helpers import KEY1, MODEL

CHAT, COMPL = "/v1/chat/completions", "/v1/completions"
MSG = [{"role": "user", "content": "hello"}]


def body(**kw) -> bytes:
    return json.dumps({"model": MODEL, "messages": MSG, "max_tokens": 4, **kw}).encode()


def without(key: str) -> bytes:
    d = {"model": MODEL, "messages": MSG, "max_tokens": 4}
    d.pop(key)
    return json.dumps(d).encode()


LONG_TEXT = " ".join(["cache"] * 1500)  # > 1024 tokens (the tiny model's context)

# (id, method, path, headers, body, status, code, param)
CASES = [
    ("malformed-json", "POST", CHAT, {}, b'{"model": "tiny-llama", "messages": [', 400, "invalid_json", None),
    ("empty-body", "POST", CHAT, {}, b"", 400, "invalid_json", None),
    ("json-not-object", "POST", CHAT, {}, b"[1, 2, 3]", 400, "invalid_json", None),
    ("nan-literal", "POST", CHAT, {}, b'{"model": "tiny-llama", "messages": [], "temperature": NaN}', 400,
     "invalid_json", None),
    ("invalid-utf8", "POST", CHAT, {}, b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
     400, "invalid_encoding", None),
    ("missing-model", "POST", CHAT, {}, without("model"), 400, "missing_required_parameter", "model"),
    ("missing-messages", "POST", CHAT, {}, without("messages"), 400, "missing_required_parameter", "messages"),
    ("messages-not-list", "POST", CHAT, {}, body(messages="hello"), 400, "invalid_type", "messages"),
    ("messages-empty", "POST", CHAT, {}, body(messages=[]), 400, "invalid_value", "messages"),
    ("message-no-content", "POST", CHAT, {}, body(messages=[{"role": "user"}]), 400, "missing_required_parameter",
     "messages[0].content"),
    ("message-bad-role", "POST", CHAT, {}, body(messages=[{"role": "wizard", "content": "x"}]), 400, "invalid_value",
     "messages[0].role"),
    ("content-wrong-type", "POST", CHAT, {}, body(messages=[{"role": "user", "content": 42}]), 400, "invalid_type",
     "messages[0].content"),
    ("max-tokens-string", "POST", CHAT, {}, body(max_tokens="10"), 400, "invalid_type", "max_tokens"),
    ("max-tokens-zero", "POST", CHAT, {}, body(max_tokens=0), 400, "invalid_value", "max_tokens"),
    ("max-tokens-negative", "POST", CHAT, {}, body(max_tokens=-5), 400, "invalid_value", "max_tokens"),
    ("temperature-bool", "POST", CHAT, {}, body(temperature=True), 400, "invalid_type", "temperature"),
    ("temperature-high", "POST", CHAT, {}, body(temperature=5), 400, "invalid_value", "temperature"),
    ("top-p-zero", "POST", CHAT, {}, body(top_p=0), 400, "invalid_value", "top_p"),
    ("stream-string", "POST", CHAT, {}, body(stream="yes"), 400, "invalid_type", "stream"),
    ("seed-float", "POST", CHAT, {}, body(seed=1.5), 400, "invalid_type", "seed"),
    ("n-2", "POST", CHAT, {}, body(n=2), 400, "unsupported_value", "n"),
    ("huge-stop-list", "POST", CHAT, {}, body(stop=[f"s{i}" for i in range(5000)]), 400, "invalid_value", "stop"),
    ("stop-wrong-type", "POST", CHAT, {}, body(stop=[1, 2]), 400, "invalid_type", "stop"),
    ("unknown-model", "POST", CHAT, {}, body(model="gpt-5"), 404, "model_not_found", "model"),
    ("context-too-long", "POST", CHAT, {}, body(messages=[{"role": "user", "content": LONG_TEXT}]), 400,
     "context_length_exceeded", None),
    ("context-too-long-stream", "POST", CHAT, {}, body(messages=[{"role": "user", "content": LONG_TEXT}], stream=True),
     400, "context_length_exceeded", None),
    ("oversized-body", "POST", CHAT, {}, body(messages=[{"role": "user", "content": "x" * 70000}]), 413,
     "request_too_large", None),
    ("session-empty-header", "POST", CHAT, {"X-Session-ID": ""}, body(), 400, "invalid_session_id", "X-Session-ID"),
    ("session-too-long", "POST", CHAT, {"X-Session-ID": "s" * 200}, body(), 400, "invalid_session_id", "X-Session-ID"),
    ("session-space", "POST", CHAT, {"X-Session-ID": "has space"}, body(), 400, "invalid_session_id", "X-Session-ID"),
    ("session-control-chars", "POST", CHAT, {}, body(session_id="a\x01b\nc"), 400, "invalid_session_id", "session_id"),
    ("session-empty-body", "POST", CHAT, {}, body(session_id=""), 400, "invalid_session_id", "session_id"),
    ("session-not-string", "POST", CHAT, {}, body(session_id=12), 400, "invalid_session_id", "session_id"),
    ("session-header-body-differ", "POST", CHAT, {"X-Session-ID": "one"}, body(session_id="two"), 400,
     "invalid_session_id", "session_id"),
    ("append-without-session", "POST", CHAT, {}, body(session_mode="append"), 400, "missing_required_parameter",
     "session_mode"),
    ("session-mode-unknown", "POST", CHAT, {}, body(session_mode="sometimes"), 400, "invalid_value", "session_mode"),
    ("unknown-session-get", "GET", "/v1/sessions/never-made", {}, None, 404, "session_not_found", "session_id"),
    ("unknown-session-delete", "DELETE", "/v1/sessions/never-made", {}, None, 404, "session_not_found", "session_id"),
    ("odd-session-path", "GET", "/v1/sessions/a%01b", {}, None, 400, "invalid_session_id", "session_id"),
    ("completion-missing-prompt", "POST", COMPL, {}, json.dumps({"model": MODEL}).encode(), 400,
     "missing_required_parameter", "prompt"),
    ("completion-batch", "POST", COMPL, {}, json.dumps({"model": MODEL, "prompt": ["a", "b"]}).encode(), 400,
     "invalid_type", "prompt"),
    ("completion-token-out-of-range", "POST", COMPL, {},
     json.dumps({"model": MODEL, "prompt": [1, 99999999], "max_tokens": 2}).encode(), 400, None, "prompt"),
    ("completion-append", "POST", COMPL, {"X-Session-ID": "c1"},
     json.dumps({"model": MODEL, "prompt": "hi", "session_mode": "append"}).encode(), 400, "unsupported_value",
     "session_mode"),
    # issue 15: whatever the tokenizer or the template refuses is a 400, never a 500
    ("completion-lone-surrogate", "POST", COMPL, {}, json.dumps({"model": MODEL, "prompt": "a\ud800b"}).encode(),
     400, "invalid_value", "prompt"),
    ("chat-lone-surrogate", "POST", CHAT, {}, body(messages=[{"role": "user", "content": "a\udfffb"}]), 400,
     "invalid_value", "messages"),
    # issue 15: OpenAI fields are honoured or refused, never silently ignored
    ("logit-bias-not-object", "POST", CHAT, {}, body(logit_bias=[1, 2]), 400, "invalid_type", "logit_bias"),
    ("logit-bias-key-not-id", "POST", CHAT, {}, body(logit_bias={"hello": 5}), 400, "invalid_value", "logit_bias"),
    ("logit-bias-negative-id", "POST", CHAT, {}, body(logit_bias={"-3": 5}), 400, "invalid_value", "logit_bias"),
    ("logit-bias-over-100", "POST", CHAT, {}, body(logit_bias={"5": 100.5}), 400, "invalid_value", "logit_bias"),
    ("logit-bias-under-minus-100", "POST", CHAT, {}, body(logit_bias={"5": -101}), 400, "invalid_value",
     "logit_bias"),
    ("logit-bias-string-value", "POST", CHAT, {}, body(logit_bias={"5": "1"}), 400, "invalid_value", "logit_bias"),
    ("logit-bias-301-entries", "POST", CHAT, {}, body(logit_bias={str(i): 1 for i in range(301)}), 400,
     "invalid_value", "logit_bias"),
    ("logit-bias-id-past-vocab", "POST", COMPL, {},
     json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2, "logit_bias": {"99999": 1}}).encode(), 400, None,
     "logit_bias"),
    ("response-format-json-object", "POST", CHAT, {}, body(response_format={"type": "json_object"}), 400,
     "unsupported_value", "response_format"),
    ("response-format-json-schema", "POST", CHAT, {},
     body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
     400, "unsupported_value", "response_format"),
    ("response-format-completions", "POST", COMPL, {},
     json.dumps({"model": MODEL, "prompt": "hi", "response_format": {"type": "json_object"}}).encode(), 400,
     "unsupported_value", "response_format"),
    ("response-format-unknown", "POST", CHAT, {}, body(response_format={"type": "xml"}), 400, "invalid_value",
     "response_format"),
    ("response-format-not-object", "POST", CHAT, {}, body(response_format="json"), 400, "invalid_type",
     "response_format"),
    ("no-key", "POST", CHAT, {"Authorization": ""}, body(), 401, "invalid_api_key", None),
    ("wrong-key", "POST", CHAT, {"Authorization": "Bearer nope"}, body(), 401, "invalid_api_key", None),
    ("wrong-scheme", "POST", CHAT, {"Authorization": f"Basic {KEY1}"}, body(), 401, "invalid_api_key", None),
    ("unknown-route", "GET", "/v1/nothing-here", {}, None, 404, None, None),
    ("wrong-method", "GET", CHAT, {}, None, 405, None, None),
]


@pytest.fixture(scope="module")
def baseline(server):
    return server.wait_idle()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(server, baseline, case):
    _, method, path, headers, data, status, code, param = case
    h = server.headers()
    h.update(headers)
    if h.get("Authorization") == "":
        del h["Authorization"]
    r = httpx.request(method, server.url + path, headers=h, content=data, timeout=30)
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


def test_nothing_held_afterwards(server, baseline):
    after = server.wait_idle()
    assert after["gpu_blocks_used"] == baseline["gpu_blocks_used"]
    assert after["request_blocks"] == 0
    assert after["sessions_active"] == baseline["sessions_active"]  # refused requests create no session
    assert after["requests_finished"] == baseline["requests_finished"]  # none of them ran
    # and the server still answers
    r = httpx.post(server.url + CHAT, headers=server.headers(), content=body(), timeout=30)
    assert r.status_code == 200, r.text
