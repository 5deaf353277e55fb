"""Bad input raises a clear typed error and leaves the engine usable."""
from __future__ import annotations

import pytest

from pensieve.engine import (ContextLengthExceededError, EngineConfig, InvalidRequestError, SamplingParams)


@pytest.mark.parametrize("kwargs,param", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(max_tokens=2.5), "max_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-5), "top_k"),
    (dict(stop=5), "stop"),
    (dict(stop=["ok", 3]), "stop"),
    (dict(stop=[""]), "stop"),
    (dict(stop=["x"] * 100), "stop"),
    (dict(seed="abc"), "seed"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
])
def test_bad_sampling_params(kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and str(e.value)


def test_bad_prompts_leave_engine_usable(make_engine):
    engine = make_engine("llama")
    limit = engine.max_model_len
    bad = [("", InvalidRequestError), ([], InvalidRequestError), (None, InvalidRequestError),
           ([1, "x"], InvalidRequestError), ([10**9], InvalidRequestError),
           ([5] * limit, ContextLengthExceededError)]
    for prompt, err in bad:
        with pytest.raises(err):
            engine.add_request(prompt, SamplingParams(max_tokens=4))
    assert not engine.has_unfinished() and not engine.requests
    assert engine.generate(["hello"], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]


def test_request_too_large_for_the_cache(make_engine):
    engine = make_engine("llama", num_gpu_blocks=4, block_size=16)
    with pytest.raises(ContextLengthExceededError, match="KV blocks"):
        engine.add_request(list(range(10, 60)), SamplingParams(max_tokens=30))


def test_max_tokens_clipped_to_context(make_engine):
    engine = make_engine("llama", max_model_len=40)
    out = engine.generate([list(range(10, 35))], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert len(out) == 15


def test_bad_engine_config():
    with pytest.raises(InvalidRequestError):
        EngineConfig(model="x", block_size=24)
    with pytest.raises(InvalidRequestError):
        EngineConfig(model="x", gpu_memory_utilization=1.5)
    with pytest.raises(InvalidRequestError):
        EngineConfig(model="x", cpu_cache_bytes="lots")


def test_cpu_cache_bytes_are_kubernetes_quantities():
    assert EngineConfig(model="x", cpu_cache_bytes="64Gi").cpu_cache_bytes_value() == 64 * 2**30
    assert EngineConfig(model="x", cpu_cache_bytes="1.5G").cpu_cache_bytes_value() == 1_500_000_000
    assert EngineConfig(model="x").cpu_cache_bytes_value() is None
    with pytest.raises(InvalidRequestError, match="did you mean 64Mi or 64M"):
        EngineConfig(model="x", cpu_cache_bytes="64m")
