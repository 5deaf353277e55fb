"""Shared helpers for the kernel tests.

The tests run the Triton kernels on the device at hand: CUDA when present,
otherwise the CPU under TRITON_INTERPRET=1 (scripts/test.sh sets it). Without
either, Triton tests are skipped with the reason.
"""
from __future__ import annotations

import os

import pytest
import torch


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture(scope="session")
def device() -> torch.device:
    if torch.cuda.is_available() and not _interpret():
        return torch.device("cuda")
    if not _interpret():
        pytest.skip("no CUDA device and TRITON_INTERPRET is not set")
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed")
    return torch.device("cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and not _interpret():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
