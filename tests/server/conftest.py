"""Fixtures for the server tests: a tiny checkpoint and real server processes on loopback.

One shared server (two API keys, a deliberately small engine: 2 running
sequences, 4 waiting, 64 KV blocks, 64 KiB bodies) serves every module except
the drain test, which owns its process because it sends SIGTERM.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from server_helpers import KEY1, KEY2, Server, start_server, stop_server


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from pensieve.engine.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama", seed=0)


@pytest.fixture(scope="session")
def server(tiny_ckpt, tmp_path_factory) -> Server:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    # Keys from the environment (the operator's way); the drain test passes them as repeated flags.
    srv = start_server(tiny_ckpt, log, "--max-num-seqs", "2", "--max-waiting-requests", "4",
                       "--num-gpu-blocks", "64", "--max-body-bytes", "65536",
                       env={"PENSIEVE_API_KEY": f"{KEY1},{KEY2}", "PENSIEVE_MAX_NUM_BATCHED_TOKENS": "512"})
    yield srv
    stop_server(srv)
    assert srv.proc.returncode == 0, srv.log.read_text()[-3000:]
