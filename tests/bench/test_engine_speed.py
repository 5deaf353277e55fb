"""bench/engine_speed.py on the CPU: the engine part's runs (greedy and sampled), the merge and the table."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_engine_part_smoke_runs_every_batch_and_tables_them(tmp_path):
    run = [sys.executable, str(ROOT / "bench" / "engine_speed.py")]
    part, merged, md = tmp_path / "engine.json", tmp_path / "merged.json", tmp_path / "table.md"
    subprocess.run(run + ["engine", "--smoke", "--workdir", str(tmp_path / "work"), "--out", str(part)],
                   check=True, timeout=300, cwd=ROOT)
    subprocess.run(run + ["merge", str(part), "--smoke", "--out", str(merged)], check=True, timeout=60, cwd=ROOT)
    subprocess.run(run + ["table", str(merged), "--out", str(md)], check=True, timeout=60, cwd=ROOT)
    runs = json.loads(merged.read_text())["runs"]
    assert [(r["requests"], r["prompt_len"], r["output_len"]) for r in runs] == [(8, 40, 6), (16, 24, 4), (1, 40, 5),
                                                                                 (8, 40, 6)]
    assert [r["sampling"] for r in runs] == ["greedy"] * 3 + ["temperature 0.8, top_p 0.95"]
    for r in runs:
        assert r["seconds"] > 0 and r["decode_step_ms"]["count"] > 0 and r["steps_over_2x_median"] >= 0
    assert "| 8 x (40 + 6), temperature 0.8, top_p 0.95 |" in md.read_text()
