"""``LLMEngine.stop_at``: the server found a stop string after the engine ran on.

The request ends after exactly the tokens the client's reply covered, whether
it is still running (tokens sampled beyond, placeholders of a step in flight,
are dropped) or already finished by itself (its session's context is cut
back). Either way the session's cache then ends where the reply did, and the
next turn answers what a stateless engine answers for the same context.
Plus ``TextStream``, the one owner of text and stop strings.
"""
from __future__ import annotations

import pytest

from pensieve.engine import SamplingParams
from pensieve.engine.detokenizer import TextStream
from pensieve.engine.request import SessionKey

PROMPT = list(range(30, 70))   # 40 tokens: 2.5 blocks of 16
GREEDY = dict(temperature=0, ignore_eos=True)


def _outputs(engine, rid, steps=None):
    """Output tokens of ``rid`` over ``steps`` steps (None: until nothing is unfinished)."""
    got = []
    n = 0
    while engine.has_unfinished() and (steps is None or n < steps):
        got += [t for o in engine.step() if o.request_id == rid for t in o.new_token_ids]
        n += 1
    return got


def _next_turn(engine, context, sid=None):
    """The next turn's output tokens and its prompt tokens found in the cache."""
    rid = engine.add_request(context + [5, 6, 7, 8], SamplingParams(max_tokens=6, **GREEDY), session_id=sid)
    got, cached = [], None
    while engine.has_unfinished():
        for o in engine.step():
            got += o.new_token_ids
            cached = o.num_cached_tokens
    return got, cached


@pytest.mark.parametrize("async_scheduling", ["on", "off"])
def test_stop_at_a_running_request(make_engine, async_scheduling):
    engine = make_engine("llama", async_scheduling=async_scheduling)
    rid = engine.add_request(PROMPT, SamplingParams(max_tokens=30, **GREEDY), session_id="s")
    got = _outputs(engine, rid, steps=12)
    assert 5 <= len(got) < 30 and rid in engine.requests
    keep = len(PROMPT) + 3  # the reply ended at its third token
    engine.stop_at(rid, keep, SessionKey(None, "s"))
    assert rid not in engine.requests and not engine.has_unfinished()
    s = engine.get_session("s")
    assert s.token_ids == (PROMPT + got)[:keep]
    _next_turn_continues_exactly(make_engine, engine, (PROMPT + got)[:keep])


def _next_turn_continues_exactly(make_engine, engine, context: list[int]) -> None:
    """The cut session is consistent, its next turn reuses all of ``context`` and answers as a
    stateless engine does for the same conversation."""
    engine.cache.check_invariants()
    out, cached = _next_turn(engine, context, "s")
    assert cached == len(context)
    assert out == _next_turn(make_engine("llama"), context)[0]

def test_stop_at_after_the_request_finished(make_engine):
    engine = make_engine("llama")
    rid = engine.add_request(PROMPT, SamplingParams(max_tokens=20, **GREEDY), session_id="s")
    got = _outputs(engine, rid)
    s = engine.get_session("s")
    assert len(got) == 20 and s.num_cached == len(PROMPT) + 19  # the last token has no KV yet
    used = engine.cache.gpu.num_used
    keep = len(PROMPT) + 2
    engine.stop_at(rid, keep, SessionKey(None, "s"))
    assert s.token_ids == (PROMPT + got)[:keep]
    assert engine.cache.gpu.num_used == used - 1  # 59 tokens held 4 blocks of 16, 42 hold 3
    _next_turn_continues_exactly(make_engine, engine, (PROMPT + got)[:keep])


def test_text_stream_holds_back_a_possible_stop_and_cuts_at_it(make_engine):
    tok = make_engine("llama").tokenizer
    ids = tok.encode("the cat sat on the mat and the dog", add_special_tokens=False)
    full = tok.decode(ids, skip_special_tokens=True)
    plain = TextStream(tok, [1, 2, 3])
    assert "".join(plain.release(False) for t in ids if not plain.push(t)) + plain.release(True) == full
    stop = full[full.index("on t"):][:4]
    ts = TextStream(tok, [1, 2, 3], [stop])
    released, n = "", 0
    for t in ids:
        n += 1
        if ts.push(t):
            break
        released += ts.release(False)
        assert full.startswith(released) and stop not in released
    released += ts.release(True)
    assert ts.stopped and released == full[:full.index(stop)]
    assert tok.decode(ids[:n], skip_special_tokens=True).find(stop) >= 0  # it stopped at the completing token
    assert tok.decode(ids[:n - 1], skip_special_tokens=True).find(stop) < 0
