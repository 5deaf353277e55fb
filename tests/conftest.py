"""Fixtures shared by every test tier."""
from __future__ import annotations

import pytest




@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(family) -> folder of a tiny random checkpoint, made once per session."""
    from pensieve.engine.tiny import make_tiny_checkpoint

    made = {}

    def make(family: str = "llama"):
        if family not in made:
            made[family] = str(make_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{family}"), family, seed=0))
        return made[family]

    return make
