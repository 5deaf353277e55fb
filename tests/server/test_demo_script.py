"""The README's main command, `bash scripts/demo.sh`, run twice in a row: each run holds the
same 4-turn conversation from scratch (its own session store), each later turn takes its
context from the session's cache (nothing recomputed), and the fourth partly from the CPU tier."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\s+(\d)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$", re.M)

pytestmark = pytest.mark.slow


def _run_demo() -> dict[int, dict[str, int]]:
    env = dict(os.environ, PENSIEVE_VENV=str(Path(sys.executable).parent.parent))
    proc = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "server exited with 0" in proc.stdout
    names = ("turn", "ttft_ms", "prompt", "cached", "gpu", "cpu", "recomputed", "new", "output")
    rows = {int(m.group(1)): dict(zip(names, map(int, m.groups()))) for m in ROW.finditer(proc.stdout)}
    assert sorted(rows) == [1, 2, 3, 4], proc.stdout[-3000:]
    return rows


def test_demo_runs_twice_from_scratch():
    for _ in range(2):
        rows = _run_demo()
        assert rows[1]["cached"] == 0 and rows[1]["recomputed"] == 0
        for t in (2, 3, 4):
            r = rows[t]
            assert r["cached"] > 0 and r["recomputed"] == 0, rows
            assert r["cached"] + r["recomputed"] + r["new"] == r["prompt"], rows
        assert rows[4]["cpu"] > 0, rows  # the other session pushed demo-chat's leading chunks to the CPU tier
