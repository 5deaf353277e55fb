"""The official openai client against the server: chat (plain and streamed),
multi-turn sessions reporting cached tokens, completions, models, wrong key."""
from __future__ import annotations

import openai
import pytest

from server_helpers import KEY1, MODEL


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY1, max_retries=0, timeout=60)


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_plain_and_streamed_same_text(client):
    messages = [{"role": "user", "content": "hello, what is a cache?"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    choice = plain.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert plain.usage.prompt_tokens > 0 and plain.usage.completion_tokens >= 1
    assert plain.usage.prompt_tokens_details.cached_tokens == 0

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None and not chunk.choices:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert "".join(pieces) == choice.message.content
    assert finish == choice.finish_reason
    assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens


@pytest.mark.parametrize("mode", ["full", "append"])
def test_multi_turn_session_reports_cached_tokens(client, mode):
    sid = f"openai-multi-turn-{mode}"
    history: list[dict] = []
    cached, context = [], []
    for turn, text in enumerate(["tell me about the cache", "and the GPU tier?", "thanks, what about swap"]):
        new = [{"role": "user", "content": text}]
        messages = new if mode == "append" else history + new
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=8, temperature=0, extra_headers={"X-Session-ID": sid},
            extra_body={"session_mode": mode})
        assert raw.headers["X-Session-ID"] == sid
        resp = raw.parse()
        history += new + [{"role": "assistant", "content": resp.choices[0].message.content}]
        cached.append(resp.usage.prompt_tokens_details.cached_tokens)
        context.append(resp.usage.prompt_tokens + resp.usage.completion_tokens)
        assert resp.usage.prompt_tokens > cached[-1]
        # the tier breakdown (a Pensieve extension): cached = gpu + cpu; all sources sum to the prompt
        src = resp.usage.prompt_tokens_details.model_extra["context_sources"]
        assert set(src) == {"gpu", "cpu", "recomputed", "new"}
        assert src["gpu"] + src["cpu"] == cached[-1] and sum(src.values()) == resp.usage.prompt_tokens
    assert cached[0] == 0
    assert all(c > 0 for c in cached[1:]), cached
    assert cached[2] > cached[1]  # the conversation grows, so does what comes from cache
    if mode == "append":
        # the session's tokens are extended, never re-encoded: all of the last turn's context is
        # cached but its last sampled token (no forward pass has computed it), although the random
        # model's replies need not encode back to the ids it generated
        assert cached[1:] == [c - 1 for c in context[:-1]], (cached, context)
    info = client.get(f"/sessions/{sid}", cast_to=object)
    assert info["num_turns"] == 3 and info["cached_tokens"] > 0
    client.delete(f"/sessions/{sid}", cast_to=object)


def test_completions(client):
    resp = client.completions.create(model=MODEL, prompt="The cache keeps", max_tokens=6, temperature=0)
    assert resp.object == "text_completion"
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert 1 <= resp.usage.completion_tokens <= 6
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The cache keeps", max_tokens=6, temperature=0, stream=True) if c.choices)
    assert streamed == resp.choices[0].text


def test_wrong_key_rejected(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert info.value.status_code == 401
    assert info.value.body["code"] == "invalid_api_key"


def test_client_sees_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
    assert info.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])


def test_logit_bias_and_response_format(client, tiny_ckpt):
    """logit_bias as the client sends it ({"id": int}); json_object is refused, not ignored (issue 15)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_ckpt))
    token = tok.encode(" cache", add_special_tokens=False)[0]
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                         temperature=0.7, seed=3, logit_bias={str(token): 100},
                                         extra_body={"ignore_eos": True})
    assert out.choices[0].message.content == tok.decode([token] * 4)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       response_format={"type": "json_object"})
    assert e.value.code == "unsupported_value"
