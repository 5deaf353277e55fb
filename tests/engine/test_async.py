"""Asynchronous scheduling: the step launched by one engine.step() call is collected
by the next, its sampled tokens fed to the next step on the device through
placeholders. On a CPU the same code runs without overlap; the outputs must equal
the synchronous engine's token for token, under batching, stop conditions,
aborts and cache-tier pressure."""
from __future__ import annotations

from engine_helpers import run_to_end

from pensieve.engine import SamplingParams


def _pair(make_engine, **kw):
    return make_engine("llama", async_scheduling="on", **kw), make_engine("llama", async_scheduling="off", **kw)


def test_async_equals_sync_batch(make_engine):
    fast, slow = _pair(make_engine, max_num_batched_tokens=24)
    assert fast.async_scheduling and not slow.async_scheduling
    prompts = [list(range(5 + i, 20 + 9 * i)) for i in range(4)]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (1, 5, 9, 16)]
    assert fast.generate(prompts, params) == slow.generate(prompts, params)


def test_async_stop_tokens_and_strings(make_engine):
    fast, slow = _pair(make_engine)
    prompt = list(range(30, 60))
    free = slow.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    by_token = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop_token_ids=[free[6]])
    assert fast.generate([prompt], by_token) == slow.generate([prompt], by_token)
    text = slow.tokenizer.decode(free[:12])
    by_text = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[text[-3:]])
    outs = []
    for engine in (fast, slow):
        engine.add_request(prompt, by_text, request_id="s")
        outs.append("".join(o.new_text for o in _all_outputs(engine)))
    assert outs[0] == outs[1]


def _all_outputs(engine):
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    return outs


def test_async_abort_with_a_step_in_flight(make_engine):
    fast, slow = _pair(make_engine)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    results = []
    for engine in (fast, slow):
        for i in range(3):
            engine.add_request(list(range(10 + i, 40)), params, request_id=f"r{i}")
        for _ in range(5):
            engine.step()
        engine.abort("r1")
        out = run_to_end(engine)
        assert "r1" not in out or len(out["r1"]) < 12
        results.append({k: v for k, v in out.items() if k != "r1"})
    assert fast.inflight is None or all(r.status.value == "finished" for r, _ in fast.inflight.rows)
    assert results[0].keys() == results[1].keys()


def test_async_sessions_under_tier_pressure(make_engine):
    """Swaps, drops, suspensions and recompute with a step always in flight."""
    from test_tiers import run_interleaved

    engine = make_engine("llama", async_scheduling="on", num_gpu_blocks=18, num_cpu_blocks=6,
                         max_num_batched_tokens=40)
    oracle = make_engine("llama", cache_mode="none", num_gpu_blocks=256)
    assert run_interleaved(engine, oracle, seed=3, n_sessions=5, n_turns=3) == 15
    stats = engine.cache.stats
    assert stats.context_tokens["cpu"] > 0 or stats.context_tokens["recomputed"] > 0
