"""The kind tier: the same scenarios against a kind cluster with CPU images.

Skipped, with the reason printed, where Docker (a reachable daemon) or kind is missing.
PENSIEVE_E2E_KEEP=1 keeps the cluster afterwards; PENSIEVE_E2E_MODEL_ID picks the model.
"""
from __future__ import annotations

from waiting import wait_for as _wait_for

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CLUSTER = "pensieve-e2e"
IMAGES = {"engine-cpu": "pensieve-engine:e2e", "operator": "pensieve-operator:e2e", "router": "pensieve-router:e2e"}


def pytest_collection_modifyitems(items):
    for item in items:
        if str(HERE) in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


def _missing() -> str | None:
    if not shutil.which("docker"):
        return "docker is not installed"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode != 0:
        return "no Docker daemon is reachable (`docker info` failed)"
    if not shutil.which("kind"):
        return "kind is not installed"
    if not shutil.which("kubectl"):
        return "kubectl is not installed"
    return None


def run(*argv: str, check: bool = True, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(argv), file=sys.stderr, flush=True)
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p


@pytest.fixture(scope="session")
def kind_cluster():
    why = _missing()
    if why:
        print(f"\n[e2e] skipped: {why}", file=sys.stderr)
        pytest.skip(f"e2e needs Docker and kind: {why}")
    existing = run("kind", "get", "clusters").stdout.split()
    if CLUSTER not in existing:
        run("kind", "create", "cluster", "--config", str(HERE / "kind-config.yaml"), "--wait", "120s")
    for dockerfile, tag in IMAGES.items():
        run("docker", "build", "-f", str(ROOT / "docker" / f"{dockerfile}.Dockerfile"), "-t", tag, str(ROOT), timeout=3600)
        run("kind", "load", "docker-image", tag, "--name", CLUSTER)
    ctx = f"kind-{CLUSTER}"
    yield ctx
    if not os.environ.get("PENSIEVE_E2E_KEEP"):
        run("kind", "delete", "cluster", "--name", CLUSTER, check=False)


def kubectl(ctx: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return run("kubectl", "--context", ctx, *args, **kw)


def wait_for(fn, timeout: float, what: str, interval: float = 2.0):
    return _wait_for(fn, timeout, what, interval)
