"""One quantity parser: the engine (--cpu-cache-bytes, PENSIEVE_CPU_CACHE_BYTES), the
operator's spec (spec.cache.cpuCache) and its settings (int fields) give the same answer
for every input of the table, "64m" among them."""
from __future__ import annotations

import pytest

from pensieve.common.quantity import QuantityError, parse_bytes, parse_quantity

GiB = 2**30
REFUSED = None
TABLE = [
    ("64Gi", 64 * GiB),
    ("1.5Gi", 3 * GiB // 2),
    ("1.5G", 1_500_000_000),
    ("500M", 500_000_000),
    ("8000000000", 8_000_000_000),
    ("1k", 1000),
    ("2Ki", 2048),
    ("1e9", 1_000_000_000),
    ("1000m", 1),         # milli: 1000 thousandths of a byte
    ("64m", REFUSED),     # 0.064 bytes: refused, not rounded (did you mean 64Mi?)
    ("1.5", REFUSED),
    ("64g", REFUSED),     # suffixes are case-sensitive, as in Kubernetes
    ("64GB", REFUSED),
    ("-1Gi", REFUSED),
    ("lots", REFUSED),
]


def engine_answer(text):
    from pensieve.engine import EngineConfig, InvalidRequestError

    try:
        return EngineConfig(model="x", cpu_cache_bytes=text).cpu_cache_bytes_value()
    except InvalidRequestError:
        return REFUSED


def engine_env_answer(text):
    import argparse

    from pensieve.engine import EngineConfig, InvalidRequestError
    from pensieve.engine.config import add_dataclass_args, dataclass_from_args

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, EngineConfig)
    try:
        cfg = dataclass_from_args(EngineConfig, parser.parse_args(["--model", "x"]), {"PENSIEVE_CPU_CACHE_BYTES": text})
        return cfg.cpu_cache_bytes_value()
    except InvalidRequestError:
        return REFUSED


def operator_spec_answer(text):
    from pensieve.operator.spec import SpecError, parse_spec

    body = {"metadata": {"name": "p", "namespace": "ns"},
            "spec": {"model": {"source": {"hostPath": {"path": "/m"}}}, "cache": {"cpuCache": text}}}
    try:
        return parse_spec(body, default_engine_image="e", default_router_image="r").cache.cpu_cache_bytes
    except SpecError as e:
        assert "spec.cache.cpuCache" in str(e)
        return REFUSED


def operator_settings_answer(text):
    from pensieve.operator.settings import Settings

    try:
        return Settings.from_env({"PENSIEVE_OPERATOR_ENGINE_MEMORY_OVERHEAD_BYTES": text}).engine_memory_overhead_bytes
    except ValueError:
        return REFUSED


@pytest.mark.parametrize("text, want", TABLE, ids=[t for t, _ in TABLE])
def test_engine_and_operator_read_quantities_alike(text, want):
    answers = {"engine flag": engine_answer(text), "engine env": engine_env_answer(text),
               "operator spec": operator_spec_answer(text), "operator settings": operator_settings_answer(text)}
    assert set(answers.values()) == {want}, answers


def test_the_refusal_of_milli_bytes_says_what_was_meant():
    with pytest.raises(QuantityError, match="did you mean 64Mi or 64M"):
        parse_bytes("64m")


def test_quantities_that_are_not_bytes_keep_their_fractions():
    assert parse_quantity("500m") == parse_quantity("0.5")
    assert parse_quantity("1.5") * 2 == 3
    with pytest.raises(QuantityError):
        parse_quantity(True)
