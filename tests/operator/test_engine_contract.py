"""The operator configures engine pods through PENSIEVE_<FLAG> variables: each one
must be a flag the engine's `serve` command knows, with a value it accepts."""
from __future__ import annotations

import argparse
import dataclasses

from pdep_helpers import NODES, make_spec

from pensieve.operator.render import engine_env
from pensieve.operator.sizing import compute_sizing


def test_rendered_engine_env_is_accepted_by_the_engine(settings):
    from pensieve.engine.config import EngineConfig, add_dataclass_args, dataclass_from_args
    from pensieve.engine.server import ServerConfig

    spec = make_spec(settings, engine={"cacheMode": "pensieve", "maxModelLen": 4096})
    sizing = compute_sizing([NODES["8xH100"]()], spec, settings)
    env = engine_env(spec, sizing)
    flags = {f"PENSIEVE_{f.name.upper()}" for cls in (EngineConfig, ServerConfig) for f in dataclasses.fields(cls)}
    assert set(env) <= flags, f"variables the engine would ignore: {sorted(set(env) - flags)}"
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, EngineConfig)
    add_dataclass_args(parser, ServerConfig)
    args = parser.parse_args([])
    engine_cfg = dataclass_from_args(EngineConfig, args, env)
    server_cfg = dataclass_from_args(ServerConfig, args, env)
    assert engine_cfg.model == spec.model_dir and engine_cfg.cache_mode == "pensieve"
    assert engine_cfg.cpu_cache_bytes == str(sizing.cpu_cache_bytes) and engine_cfg.max_model_len == 4096
    assert server_cfg.port == spec.engine.port


def test_gpus_per_pod_sets_the_engine_tensor_parallel_size(settings):
    """gpusPerPod 4: the engine env asks for 4 ranks, the pod for 4 GPUs, and the engine loads it."""
    from pensieve.engine.config import EngineConfig, add_dataclass_args, dataclass_from_args
    from pensieve.operator.render import render_engine_deployment

    spec = make_spec(settings, resources={"gpusPerPod": 4})
    sizing = compute_sizing([NODES["8xH100"]()], spec, settings)
    env = engine_env(spec, sizing)
    assert env["PENSIEVE_TENSOR_PARALLEL_SIZE"] == "4"
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, EngineConfig)
    assert dataclass_from_args(EngineConfig, parser.parse_args([]), env).tensor_parallel_size == 4
    container = render_engine_deployment(spec, sizing, settings)["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    one = make_spec(settings, resources={"gpusPerPod": 1})
    assert "PENSIEVE_TENSOR_PARALLEL_SIZE" not in engine_env(one, compute_sizing([NODES["8xH100"]()], one, settings))
