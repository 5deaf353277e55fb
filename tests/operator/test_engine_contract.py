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
