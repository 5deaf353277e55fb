"""One dataclass -> flags/environment loader (pensieve.common.flags), one rule:
command line, then environment, then default. The rule is tested once here, on a
dataclass of every supported type; then each of the three configs (engine, router,
operator) is shown to load through it."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from pensieve.common import flags


@dataclasses.dataclass
class Sample:
    name: str = dataclasses.field(default="d", metadata={"help": "a string", "aliases": ("--label",)})
    count: int = 1
    ratio: float = 0.5
    on: bool = False
    limit: int | None = None
    keys: list[str] = dataclasses.field(default_factory=list)
    spaces: tuple[str, ...] = ()
    mode: str = dataclasses.field(default="a", metadata={"choices": ("a", "b")})


def parse(argv, env):
    p = argparse.ArgumentParser()
    flags.add_flags(p, Sample, "T_")
    return flags.load(Sample, "T_", p.parse_args(argv), env)


ENV = {"T_NAME": "env", "T_COUNT": "2", "T_RATIO": "0.25", "T_ON": "yes", "T_LIMIT": "7", "T_KEYS": "a, b",
       "T_SPACES": "x,y", "T_MODE": "b"}


def test_command_line_then_environment_then_default():
    assert parse([], {}) == Sample()
    assert parse([], ENV) == Sample("env", 2, 0.25, True, 7, ["a", "b"], ("x", "y"), "b")
    cli = ["--label", "cli", "--count", "3", "--ratio", "1", "--no-on", "--limit", "9", "--keys", "k",
           "--keys", "l", "--spaces", "z", "--mode", "a"]
    assert parse(cli, ENV) == Sample("cli", 3, 1.0, False, 9, ["k", "l"], ("z",), "a")
    # Field by field: a flag given wins for that field only.
    assert parse(["--count", "4"], ENV) == Sample("env", 4, 0.25, True, 7, ["a", "b"], ("x", "y"), "b")
    # An empty variable: the empty string for a string field, unset for any other type.
    assert parse([], {"T_NAME": "", "T_COUNT": "", "T_ON": ""}) == Sample(name="")


@pytest.mark.parametrize("env, field", [({"T_COUNT": "two"}, "count"), ({"T_ON": "maybe"}, "on"),
                                        ({"T_MODE": "c"}, "mode"), ({"T_RATIO": "x"}, "ratio")])
def test_bad_environment_values_name_the_variable(env, field):
    with pytest.raises(flags.ConfigError, match=f"T_{field.upper()}") as e:
        parse([], env)
    assert e.value.field == field


def test_parsers_read_a_type_differently():
    from pensieve.common.quantity import parse_bytes

    assert flags.load(Sample, "T_", None, {"T_COUNT": "2Ki"}, parsers={int: parse_bytes}).count == 2048


@pytest.fixture
def calls(monkeypatch):
    seen = []
    real = flags.load

    def spy(cls, prefix, *a, **kw):
        seen.append((cls.__name__, prefix))
        return real(cls, prefix, *a, **kw)

    monkeypatch.setattr(flags, "load", spy)
    return seen


def test_the_three_configs_load_through_the_one_loader(calls, monkeypatch):
    from pensieve.engine import EngineConfig
    from pensieve.engine.cli import build_parser
    from pensieve.engine.config import dataclass_from_args
    from pensieve.engine.server import ServerConfig
    from pensieve.operator.settings import Settings
    from pensieve.router.config import parse_args

    args = build_parser().parse_args(["serve", "--model", "m", "--block-size", "16"])
    env = {"PENSIEVE_BLOCK_SIZE": "64", "PENSIEVE_NUM_GPU_BLOCKS": "99", "PENSIEVE_PORT": "9"}
    engine, server = dataclass_from_args(EngineConfig, args, env), dataclass_from_args(ServerConfig, args, env)
    assert (engine.block_size, engine.num_gpu_blocks, server.port) == (16, 99, 9)

    router = parse_args(["--static-endpoints", "h:1", "--load-floor", "3"],
                        {"PENSIEVE_ROUTER_LOAD_FLOOR": "5", "PENSIEVE_ROUTER_PORT": "81"})
    assert (router.load_floor, router.port) == (3, 81)

    operator = Settings.from_env({"PENSIEVE_OPERATOR_ENGINE_MEMORY_OVERHEAD_BYTES": "2Gi"})
    assert operator.engine_memory_overhead_bytes == 2 * 2**30 and operator.resync_seconds == 60.0

    assert calls == [("EngineConfig", "PENSIEVE_"), ("ServerConfig", "PENSIEVE_"),
                     ("RouterConfig", "PENSIEVE_ROUTER_"), ("Settings", "PENSIEVE_OPERATOR_")]


def test_every_cli_prints_its_help():
    """Help texts go through argparse's %-formatting: a stray % would crash --help."""
    import subprocess
    import sys

    for argv in (["-m", "pensieve.engine", "serve", "--help"], ["-m", "pensieve.router", "--help"]):
        out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "--" in out.stdout
