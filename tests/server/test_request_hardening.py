"""Issue 15 on the shared server: the character bound before tokenizing, log
injection, logit_bias applied by the sampler, response_format "text".
(Bad-input cases of these fields are rows of test_bad_input's table.)"""
from __future__ import annotations

import time
import uuid

import httpx
import pytest
from transformers import AutoTokenizer

from server_helpers import MODEL

COMPL = "/v1/completions"


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return AutoTokenizer.from_pretrained(str(tiny_ckpt))


def _complete(server, **kw) -> httpx.Response:
    body = {"model": MODEL, "prompt": "the cache keeps", "max_tokens": 6, "temperature": 0, "ignore_eos": True, **kw}
    return httpx.post(server.url + COMPL, headers=server.headers(), json=body, timeout=60)


def _word_tokens(tok, n: int) -> list[int]:
    """n ordinary (non-special) token ids that decode to letters only."""
    special = set(tok.all_special_ids)
    out = []
    for token, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
        if i not in special and tok.decode([i]).strip().isalpha() and len(tok.decode([i]).strip()) >= 3:
            out.append(i)
        if len(out) == n:
            return out
    raise AssertionError("the tiny vocabulary has too few word tokens")


def test_logit_bias_forces_and_bans_tokens(server, tok):
    plain = _complete(server)
    assert plain.status_code == 200, plain.text
    a, b = _word_tokens(tok, 2)
    # +100 makes token a win every step, greedy or sampled (OpenAI: "exclusive selection")
    for extra in ({"temperature": 0}, {"temperature": 1.0, "seed": 7}):
        r = _complete(server, logit_bias={str(a): 100}, **extra)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == tok.decode([a] * 6), (extra, r.json())
    # biases add to the logits: a at +50 beats b at +40; banning a (-100) leaves b
    r1 = _complete(server, logit_bias={str(a): 50, str(b): 40})
    r2 = _complete(server, logit_bias={str(a): -100, str(b): 40})
    assert r1.json()["choices"][0]["text"] == tok.decode([a] * 6)
    assert r2.json()["choices"][0]["text"] == tok.decode([b] * 6)
    assert plain.json()["choices"][0]["text"] not in (tok.decode([a] * 6), tok.decode([b] * 6))
    # and the chat endpoint takes it too
    chat = httpx.post(server.url + "/v1/chat/completions", headers=server.headers(), timeout=60,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                            "temperature": 0, "ignore_eos": True, "logit_bias": {str(b): 100}})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == tok.decode([b] * 3)


def test_response_format_text_is_accepted(server):
    r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers(), timeout=60,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                         "response_format": {"type": "text"}})
    assert r.status_code == 200, r.text


def test_prompt_over_character_bound_is_refused_before_tokenizing(server):
    """The tiny model: 1024 tokens, longest vocabulary entry 13 characters -> bound 1024*13*4 characters."""
    info = httpx.get(server.url + "/v1/models", headers=server.headers(), timeout=10).json()["data"][0]
    bound = info["max_model_len"] * 13 * 4
    r = _complete(server, prompt="x" * (bound + 1))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded"
    assert f"{bound + 1} characters" in err["message"] and str(bound) in err["message"], err
    # just under the bound it is tokenized, and refused for its tokens
    r = _complete(server, prompt="x " * (bound // 2 - 1))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert "characters" not in r.json()["error"]["message"], r.text


def _log_lines(server, needle: str, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = server.log.read_text(errors="replace").splitlines()
        if any(needle in line for line in lines) or time.monotonic() > deadline:
            return lines


def test_request_data_cannot_forge_log_lines(server):
    marker = uuid.uuid4().hex
    forged = f"FORGED INFO pensieve.server: {marker}"
    raw = f"/v1/x%0A{forged.replace(' ', '%20')}%0D%1B[31m%E2%80%AE%5C"
    for key in (None, server.headers()):  # 401 before any handler, and 404 with a key
        httpx.get(server.url + raw, headers=key or {}, timeout=10)
    lines = _log_lines(server, marker)
    hits = [line for line in lines if marker in line]
    assert len(hits) == 2, hits
    for line in hits:
        assert not line.startswith("FORGED"), line
        assert f"/v1/x\\n{forged}\\r\\x1b[31m\\u202e\\\\" in line, line
        assert all(c >= " " and c not in "\x7f\u202e" for c in line), repr(line)
