"""Tier 1 units: block pool, scheduler decisions, sampler filters, config from CLI/env, checkpoint errors."""
from __future__ import annotations

import argparse
import json
import math
import shutil

import pytest
import torch

from pensieve.engine import CheckpointError, EngineConfig, InvalidRequestError, SamplingParams
from pensieve.engine.block_pool import BlockPool
from pensieve.engine.cache_manager import CacheManager
from pensieve.engine.config import add_dataclass_args, dataclass_from_args
from pensieve.engine.request import Request
from pensieve.engine.sampling import Sampler, _apply_top_k, _apply_top_p
from pensieve.engine.scheduler import Scheduler


def test_block_pool_fifo_and_none_when_short():
    pool = BlockPool(4)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) is None and pool.num_free == 1
    pool.free([1])
    assert pool.allocate(2) == [3, 1]
    with pytest.raises(RuntimeError):
        pool.free([0, 0])


def _req(rid, n, max_tokens=4):
    return Request(rid, list(range(n)), n, SamplingParams(max_tokens=max_tokens), max_tokens)


def test_scheduler_fcfs_budget_and_exact_blocks():
    cache = CacheManager(num_gpu_blocks=6, block_size=4, cache_mode="gpu-only")
    sched = Scheduler(cache, max_num_batched_tokens=10, max_num_seqs=8)
    a, b, c = _req("a", 6), _req("b", 9), _req("c", 3)
    for r in (a, b, c):
        sched.add(r)
    out = sched.schedule()
    assert [(ch.request.request_id, ch.start, ch.num_tokens) for ch in out.chunks] == [("a", 0, 6), ("b", 0, 4)]
    assert a.block_ids == [0, 1] and b.block_ids == [2]
    assert [r.request_id for r in sched.waiting] == ["c"]  # budget spent: c waits (FCFS, not skipped)
    for ch in out.chunks:
        ch.request.num_computed_tokens += ch.num_tokens
    a.token_ids.append(99)  # a sampled a token
    out = sched.schedule()
    assert [(ch.request.request_id, ch.start, ch.num_tokens) for ch in out.chunks] == \
        [("a", 6, 1), ("b", 4, 5), ("c", 0, 3)]
    assert b.block_ids == [2, 3, 4] and c.block_ids == [5]


def test_scheduler_preempts_newest_when_decode_runs_out():
    cache = CacheManager(num_gpu_blocks=2, block_size=4, cache_mode="gpu-only")
    sched = Scheduler(cache, max_num_batched_tokens=64, max_num_seqs=8)
    old, new = _req("old", 4), _req("new", 4)
    sched.add(old)
    sched.add(new)
    for ch in sched.schedule().chunks:
        ch.request.num_computed_tokens += ch.num_tokens
        ch.request.token_ids.append(7)
    out = sched.schedule()  # both need a 2nd block; only the oldest can have one
    assert [p.request_id for p in out.preempted] == ["new"]
    assert [ch.request.request_id for ch in out.chunks] == ["old"] and old.block_ids == [0, 1]
    assert sched.waiting[0] is new and new.block_ids == [] and new.num_computed_tokens == 0


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(_apply_top_k(logits, torch.tensor([2]))).tolist() == [[True, False, False, True]]
    probs = torch.softmax(logits, -1)[0]  # ~[.09, .64, .24, .03]
    kept = ~torch.isinf(_apply_top_p(logits, torch.tensor([0.7])))
    assert kept.tolist() == [[False, True, True, False]] and probs[1] < 0.7
    kept = ~torch.isinf(_apply_top_p(logits, torch.tensor([0.5])))
    assert kept.tolist() == [[False, True, False, False]]


def test_sampler_greedy_and_seeded():
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=3), SamplingParams(top_k=1)]
    tokens = Sampler()(logits, params, [0, 3, 0], [0, 5, 0])
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())
    assert Sampler()(logits, params, [0, 3, 0], [0, 5, 0]) == tokens
    # the same row alone (another batch) draws the same token
    assert Sampler()(logits[1:2], params[1:2], [3], [5]) == tokens[1:2]


def test_sampler_warm_up_runs_every_row_count():
    seen = []
    sampler = Sampler()
    real = sampler.sample
    sampler.sample = lambda logits, params, seeds, positions: seen.append(len(params)) or real(logits, params, seeds,
                                                                                                positions)
    sampler.warm_up(vocab=64, max_rows=5, device=torch.device("cpu"))
    assert seen == [1, 2, 3, 4, 5]


def test_sampler_draws_from_the_distribution():
    """Exponential race over hashed uniforms: frequencies follow softmax(logits / T) and respect top-k."""
    from pensieve.engine.sampling import uniform_noise

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    probs = torch.softmax(logits, -1)[0]
    n = 4000
    params = [SamplingParams(temperature=1.0, seed=11)] * n
    drawn = Sampler()(logits.expand(n, -1), params, [11] * n, list(range(n)))  # one request, n positions
    freq = torch.bincount(torch.tensor(drawn), minlength=5).float() / n
    assert (freq - probs).abs().max() < 0.03, (freq, probs)
    top2 = Sampler()(logits.expand(200, -1), [SamplingParams(temperature=1.0, top_k=2)] * 200, [7] * 200,
                     list(range(200)))
    assert set(top2) == {0, 1}
    u = uniform_noise(torch.tensor([1, 2]), torch.tensor([0, 0]), 1000)
    assert 0 < float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.03
    assert not torch.equal(u[0], u[1])


def test_config_refuses_unknown_choices_on_both_paths():
    # Precedence (command line, environment, default) is tested once, in tests/common/test_flags.py.
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, EngineConfig)
    with pytest.raises(SystemExit):
        parser.parse_args(["--cache-mode", "bogus"])
    with pytest.raises(InvalidRequestError, match="PENSIEVE_CACHE_MODE"):
        dataclass_from_args(EngineConfig, parser.parse_args(["--model", "m"]), {"PENSIEVE_CACHE_MODE": "bogus"})


def test_checkpoint_errors_name_the_file(tiny_checkpoint, tmp_path):
    from pensieve.engine import LLMEngine

    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        LLMEngine(EngineConfig(model=str(tmp_path / "missing")))
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint("llama"), bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        LLMEngine(EngineConfig(model=str(bad)))
    with open(tiny_checkpoint("llama") + "/config.json") as f:
        cfg = json.load(f)
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not supported"):
        LLMEngine(EngineConfig(model=str(bad)))
    cfg["architectures"] = ["LlamaForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read"):
        LLMEngine(EngineConfig(model=str(bad)))
    weights.unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        LLMEngine(EngineConfig(model=str(bad)))


def test_dummy_load_needs_no_weights(tiny_checkpoint, tmp_path):
    from pensieve.engine import LLMEngine

    folder = tmp_path / "shape-only"
    shutil.copytree(tiny_checkpoint("qwen2"), folder)
    (folder / "model.safetensors").unlink()
    engine = LLMEngine(EngineConfig(model=str(folder), load_format="dummy", num_gpu_blocks=16))
    assert len(engine.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]) == 4


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    from pensieve.engine import LLMEngine

    folder = tmp_path / "partial"
    shutil.copytree(tiny_checkpoint("llama"), folder)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        LLMEngine(EngineConfig(model=str(folder)))


def test_sharded_checkpoint_loads(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    from pensieve.engine import LLMEngine

    folder = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoint("llama"), folder)
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sharded = LLMEngine(EngineConfig(model=str(folder), num_gpu_blocks=16))
    single = LLMEngine(EngineConfig(model=tiny_checkpoint("llama"), num_gpu_blocks=16))
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    assert sharded.generate([[4, 5, 6]], p) == single.generate([[4, 5, 6]], p)


def test_swap_dma_runs_merge_adjacent_pairs_only():
    from pensieve.engine.swapper import _runs

    assert _runs([]) == []
    assert _runs([(4, 10), (5, 11), (6, 12), (9, 13), (10, 2), (11, 3), (12, 5)]) == [
        (4, 10, 3), (9, 13, 1), (10, 2, 2), (12, 5, 1)]


@pytest.mark.parametrize("layers", [1, 2, 3, 24, 32, 80])
def test_layer_groups_cover_every_layer_once_in_doubling_runs(layers):
    from pensieve.engine.swapper import layer_groups

    groups = layer_groups(layers)
    assert [i for g in groups for i in g] == list(range(layers))
    sizes = [len(g) for g in groups]
    assert sizes[0] == 1 and all(b <= max(1, 2 * a) for a, b in zip(sizes, sizes[1:]))
    # each group after the first is at most as large as all before it: compute runs through those
    assert all(len(g) <= g.start for g in groups[1:])
    assert len(groups) <= 2 + math.ceil(math.log2(layers))  # 6 launches for 32 layers, not 32


def test_swapper_addresses_the_stacks_layer_by_layer(make_engine):
    """The GPU cache and the CPU tier are stacks [2 * layers, blocks, ...]: layer i's K and V
    are entries 2i and 2i + 1 of both, and the swapper copies a block of every layer."""
    from pensieve.engine.cache_manager import SwapPlan

    engine = make_engine("llama", num_cpu_blocks=5)
    runner = engine.runner
    sw = runner.swapper
    assert runner.gpu_stack.shape[0] == 2 * runner.num_layers == sw.cpu_stack.shape[0]
    for i, (k, v) in enumerate(runner.kv_caches):
        assert k.data_ptr() == runner.gpu_stack[2 * i].data_ptr() and v.data_ptr() == runner.gpu_stack[2 * i + 1].data_ptr()
    for t in range(runner.gpu_stack.shape[0]):
        runner.gpu_stack[t, 3].fill_(t + 1)
    sw.begin(SwapPlan(swap_out_ahead=[(3, 4)], ahead_batch=1))
    sw.after_forward()
    assert all(bool((sw.cpu_stack[t, 4] == t + 1).all()) for t in range(sw.cpu_stack.shape[0]))
    assert sw.completed_batch() == 1
    sw.begin(SwapPlan(swap_in=[(4, 0)]))
    sw.finish_without_compute()
    assert torch.equal(runner.gpu_stack[:, 0], runner.gpu_stack[:, 3])


def test_cpu_tier_layers_are_disjoint_views_of_one_buffer(make_engine):
    engine = make_engine("llama", num_cpu_blocks=5)
    runner = engine.runner
    flat = runner.cpu_buffer.tensor
    assert not runner.cpu_buffer.pinned  # no GPU: plain host memory
    views = [t for pair in runner.cpu_caches for t in pair]
    assert sum(v.numel() for v in views) == flat.numel()
    assert all(v.shape[0] == 5 and v.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for v in views)
    for i, v in enumerate(views):
        v.fill_(i)
    assert all(bool((v == i).all()) for i, v in enumerate(views))


def test_warm_up_shape_sweep_runs_each_projection_and_the_lm_head(make_engine, monkeypatch):
    """The start-up sweep over matmul shapes (CUDA only when serving) calls every projection of
    a layer at each token count and the LM head at each count of sampled rows."""
    engine = make_engine("llama")
    runner = engine.runner
    seen = []
    for mod in runner.model.layers[0].modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_hook(lambda m, args, out: seen.append((m.weight.shape, args[0].shape[0])))
    calls = []
    real = runner.model.compute_logits
    monkeypatch.setattr(runner.model, "compute_logits", lambda h: calls.append(h.shape[0]) or real(h))
    runner._warm_gemm_shapes(max_tokens=40, max_rows=6)
    shapes = {s for s, _ in seen}
    assert len(shapes) >= 3  # qkv, o, gate_up, down (o and ... may share a shape)
    for shape in shapes:
        assert sorted(m for s, m in seen if s == shape)[:40] == list(range(1, 41))
    assert calls == [1, 2, 3, 4, 5, 6]
