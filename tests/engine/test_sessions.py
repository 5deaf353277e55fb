"""Multi-turn sessions: cached turns give the tokens of a full recompute while computing only new tokens."""
from __future__ import annotations

import pytest

from pensieve.engine import SamplingParams

from engine_helpers import hf_greedy

USER_TURNS = ["Hello, what is a cache?", "Why keep it between turns?", "What about the GPU tier?",
              "And the CPU tier?", "How are chunks evicted?", "Thanks, summarize please."]
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def converse(engine, session_id=None, append_model=None):
    """Six turns, full history each time (OpenAI style). Returns per-turn (tokens, cached, computed)."""
    messages, turns = [], []
    for text in USER_TURNS:
        messages.append({"role": "user", "content": text})
        prompt = engine.encode_chat(messages)
        before = engine.stats.computed_tokens
        rid = engine.add_request(prompt, PARAMS, session_id=session_id)
        tokens, cached = [], None
        while engine.has_unfinished():
            for o in engine.step():
                tokens.extend(o.new_token_ids)
                cached = o.num_cached_tokens
        turns.append((prompt, tokens, cached, engine.stats.computed_tokens - before))
        messages.append({"role": "assistant", "content": engine.tokenizer.decode(tokens, skip_special_tokens=True)})
    return turns


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_six_turns_cached_equal_stateless_and_transformers(make_engine, tiny_checkpoint, family):
    cached = converse(make_engine(family, cache_mode="gpu-only"), session_id="chat")
    stateless = converse(make_engine(family, cache_mode="none"), session_id="chat")
    assert [t[1] for t in cached] == [t[1] for t in stateless]
    for prompt, tokens, _, _ in cached:
        assert tokens == hf_greedy(tiny_checkpoint(family), prompt, len(tokens))
    # Stateless recomputes every prompt; the cached run only what the cache lacks.
    for i, ((p, toks, hit, computed), (_, _, miss, computed_none)) in enumerate(zip(cached, stateless)):
        assert miss == 0 and computed_none == len(p) + len(toks) - 1
        assert computed == len(p) - hit + len(toks) - 1
        if i > 0:
            assert hit > 0
            # The cache holds everything up to the last turn's final sampled token's predecessor,
            # so at most the re-rendered tail of that answer plus the new message is recomputed.
            prev_prompt, prev_tokens = cached[i - 1][0], cached[i - 1][1]
            assert hit >= len(prev_prompt)
    total_cached = sum(t[3] for t in cached)
    total_none = sum(t[3] for t in stateless)
    assert total_cached < total_none / 2


def test_cache_mode_none_keeps_no_blocks(make_engine):
    engine = make_engine("llama", cache_mode="none")
    converse(engine, session_id="s")
    assert engine.cache.gpu.num_free == engine.cache.gpu.num_blocks


def test_diverging_history_reuses_only_matching_prefix(make_engine, tiny_checkpoint):
    engine = make_engine("llama", cache_mode="gpu-only")
    a = list(range(10, 60))
    engine.add_request(a, PARAMS, session_id="s")
    while engine.has_unfinished():
        engine.step()
    edited = a[:37] + [5, 6, 7]
    engine.add_request(edited, PARAMS, session_id="s")
    tokens, cached = [], None
    while engine.has_unfinished():
        for o in engine.step():
            tokens.extend(o.new_token_ids)
            cached = o.num_cached_tokens
    assert cached == 37
    assert tokens == hf_greedy(tiny_checkpoint("llama"), edited, len(tokens))


def test_gpu_only_reclaims_idle_sessions_lru_from_the_tail(make_engine):
    engine = make_engine("llama", cache_mode="gpu-only", num_gpu_blocks=12)
    for sid in ("old", "new"):
        engine.add_request(list(range(20, 80)), PARAMS, session_id=sid)  # 72 tokens -> 5 blocks each
        while engine.has_unfinished():
            engine.step()
    assert [len(engine.get_session(s).block_ids) for s in ("old", "new")] == [5, 5]
    engine.add_request(list(range(100, 150)), PARAMS)  # needs 4 blocks, 2 free: take 2 from "old"'s tail
    while engine.has_unfinished():
        engine.step()
    assert len(engine.get_session("new").block_ids) == 5
    assert len(engine.get_session("old").block_ids) <= 3
    assert engine.cache.stats.evicted_tokens["gpu"] > 0


def test_session_turns_are_sequential(make_engine):
    from pensieve.engine import SessionBusyError

    engine = make_engine("llama")
    rid = engine.add_request([1, 2, 3], PARAMS, session_id="s")
    with pytest.raises(SessionBusyError):
        engine.add_request([1, 2, 3, 4], PARAMS, session_id="s")
    engine.abort(rid)
    engine.add_request([1, 2, 3, 4], PARAMS, session_id="s")
    while engine.has_unfinished():
        engine.step()


def test_abort_keeps_computed_context_in_session(make_engine):
    engine = make_engine("llama", cache_mode="gpu-only")
    rid = engine.add_request(list(range(10, 50)), SamplingParams(max_tokens=50, temperature=0), session_id="s")
    for _ in range(4):
        engine.step()
    out = engine.abort(rid)
    assert out.finished and out.finish_reason == "abort"
    s = engine.get_session("s")
    assert s.active_request is None and s.num_cached >= 40


def test_idle_sessions_expire(make_engine):
    engine = make_engine("llama", session_idle_timeout=30.0)
    now = [1000.0]
    engine.cache.clock = lambda: now[0]
    for sid in ("old", "busy"):
        engine.add_request([1, 2, 3, 4], PARAMS, session_id=sid)
        while engine.has_unfinished():
            engine.step()
    now[0] += 20
    engine.add_request([1, 2, 3, 4, 5], SamplingParams(max_tokens=50, temperature=0), session_id="busy")
    engine.step()
    assert engine.expire_idle_sessions() == []
    now[0] += 15  # "old" idle 35 s; "busy" has a request in flight
    assert engine.expire_idle_sessions() == [(None, "old")]
    assert (None, "old") not in engine.cache.sessions and (None, "busy") in engine.cache.sessions
    engine.abort(engine.get_session("busy").active_request)
    assert make_engine("llama", session_idle_timeout=0).expire_idle_sessions() == []


def test_sessions_are_keyed_by_owner_and_id(make_engine):
    from pensieve.engine import UnknownSessionError

    engine = make_engine("llama")
    engine.add_request([1, 2, 3], PARAMS, session_id="mine", owner="key-a")
    while engine.has_unfinished():
        engine.step()
    assert engine.get_session("mine", "key-a").owner == "key-a"
    for call in (lambda: engine.get_session("mine", "key-b"), lambda: engine.delete_session("mine", None)):
        with pytest.raises(UnknownSessionError):
            call()
    # Another owner's turn on the same id gets its own session: nothing reused, nothing busy.
    engine.add_request([1, 2, 3, 4], PARAMS, request_id="b1", session_id="mine", owner="key-b")
    assert engine.requests["b1"].session is not engine.get_session("mine", "key-a")
    while engine.has_unfinished():
        for out in engine.step():
            assert out.num_cached_tokens == 0
    assert set(engine.cache.sessions) == {("key-a", "mine"), ("key-b", "mine")}
    engine.delete_session("mine", "key-a")
    assert set(engine.cache.sessions) == {("key-b", "mine")}


def test_history_from_a_store_counts_as_recomputed(make_engine):
    """A turn whose conversation the engine does not hold, but whose store history matches the
    prompt, reports that prefix as recomputed context (not new input)."""
    engine = make_engine("llama")
    before = dict(engine.cache.stats.context_tokens)
    history = list(range(5, 45))  # 40 tokens the conversation had
    prompt = history[:38] + [99, 98, 97]  # the template re-rendered the tail differently
    engine.add_request(prompt, PARAMS, request_id="r", session_id="lost", history=history)
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    assert outs[-1].num_recomputed_tokens == 38 and outs[-1].num_cached_tokens == 0
    after = engine.cache.stats.context_tokens
    assert after["recomputed"] - before["recomputed"] == 38 and after["new"] - before["new"] == 3
    # The next turn finds its context cached: nothing recomputed although the history is passed again.
    prompt2 = prompt + [7, 8]
    engine.add_request(prompt2, PARAMS, request_id="r2", session_id="lost", history=prompt)
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    assert outs[-1].num_recomputed_tokens == 0 and outs[-1].num_cached_tokens > 0


def test_a_replys_last_token_is_new_work_not_recomputed(make_engine):
    """The stored history ends with the reply's last sampled token, which no forward pass has
    computed: a turn that extends the whole history recomputes the rest of it, not that token,
    and a turn on the engine that holds the session recomputes nothing."""
    engine = make_engine("llama")
    prompt = list(range(5, 45))
    engine.add_request(prompt, PARAMS, request_id="t1", session_id="s")
    reply = []
    while engine.has_unfinished():
        for out in engine.step():
            reply.extend(out.new_token_ids)
    history = prompt + reply
    engine.add_request(history + [7, 8], PARAMS, request_id="t2", session_id="s", history=history)
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    assert outs[-1].num_recomputed_tokens == 0 and outs[-1].num_cached_tokens == len(history) - 1
    fresh = make_engine("llama")  # no KV of this conversation: all of it but the last token is recomputed
    fresh.add_request(history + [7, 8], PARAMS, request_id="t3", session_id="s", history=history)
    outs = []
    while fresh.has_unfinished():
        outs.extend(fresh.step())
    assert outs[-1].num_recomputed_tokens == len(history) - 1
    assert outs[-1].context_sources["new"] == 3
