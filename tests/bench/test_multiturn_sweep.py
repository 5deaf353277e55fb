"""bench/multiturn_sweep.py: the capacity function, the tier sizing, merging parts, and the whole
sweep end to end in its smoke mode (real servers with the tiny checkpoint on the CPU)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import multiturn as mt  # noqa: E402
import multiturn_sweep as sw  # noqa: E402


def pts(*rows):
    """(rate, normalized latency p90, TTFT p90[, failed fraction]) -> points."""
    return [{"rate": r[0], "normalized_latency_p90": r[1], "ttft_p90": r[2],
             "failed_fraction": r[3] if len(r) > 3 else 0.0} for r in rows]


def test_capacity_every_rate_passes_is_not_saturated():
    c = sw.capacity_at_slo(pts((1, 0.030, 0.1), (2, 0.031, 0.2), (4, 0.044, 0.9)))
    assert c["rate"] == 4 and c["saturated"] is False and c["first_violation"] is None
    assert c["normalized_latency_p90_limit"] == pytest.approx(0.045)


def test_capacity_stops_at_the_latency_knee():
    c = sw.capacity_at_slo(pts((1, 0.030, 0.1), (2, 0.040, 0.2), (3, 0.046, 0.2), (4, 0.09, 0.5)))
    assert c["rate"] == 2 and c["saturated"] and "normalized latency" in c["first_violation"]


def test_capacity_stops_at_the_ttft_limit_and_sorts_points():
    c = sw.capacity_at_slo(pts((4, 0.031, 1.5), (1, 0.030, 0.1), (2, 0.030, 0.99)))
    assert c["rate"] == 2 and "TTFT" in c["first_violation"]


def test_capacity_a_noisy_pass_above_a_failure_does_not_count():
    c = sw.capacity_at_slo(pts((1, 0.03, 0.1), (2, 0.03, 1.2), (3, 0.03, 0.5)))
    assert c["rate"] == 1


def test_capacity_zero_when_the_lowest_rate_fails_and_failed_turns_count():
    assert sw.capacity_at_slo(pts((1, 0.03, 2.0), (2, 0.03, 0.1)))["rate"] == 0.0
    c = sw.capacity_at_slo(pts((1, 0.03, 0.1), (2, 0.03, 0.1, 0.2)))
    assert c["rate"] == 1 and "failed" in c["first_violation"]
    assert sw.capacity_at_slo(pts((1, 0.03, 0.1), (2, math.nan, math.nan)))["rate"] == 1
    with pytest.raises(ValueError):
        sw.capacity_at_slo([])


def test_tier_sizes_follow_the_formula():
    # arrives at 1 s; turn 1 generates 50 tokens (5 s), thinks 10 s, turn 2 generates 30 tokens (3 s)
    plan = mt.SessionPlan("s", 1.0, [mt.Turn(100, 50, 0.0), mt.Turn(20, 30, 10.0)])
    active, idle, longest = sw.held_context(plan, tpot=0.1, t_lo=0.0, t_hi=100.0)
    assert active == pytest.approx(125 * 5 + 185 * 3) and idle == pytest.approx(150 * 10) and longest == 200
    # only [4, 17]: 2 s of turn 1, the 10 s think, 1 s of turn 2
    active, idle, _ = sw.held_context(plan, tpot=0.1, t_lo=4.0, t_hi=17.0)
    assert active == pytest.approx(125 * 2 + 185 * 1) and idle == pytest.approx(150 * 10)
    s = sw.tier_sizes([plan], rate=2.0, tpot=0.1, block_size=16, t_lo=4.0, t_hi=17.0, pressure=4.0, cpu_share=0.9)
    live, act = (435 + 1500) / 13, 435 / 13
    assert s.live_tokens == pytest.approx(live) and s.active_tokens == pytest.approx(act)
    assert s.num_gpu_blocks == math.ceil(max(live / 4, act, 200) / 16) and s.bound_by == "longest_turn"
    assert s.num_cpu_blocks == math.ceil(0.9 * live / 16)
    assert sw.tier_sizes([plan], 2.0, 0.1, 16, 4.0, 17.0, max_cpu_tokens=32).num_cpu_blocks == 2
    with pytest.raises(ValueError):
        sw.tier_sizes([], 1.0, 0.1, 16, 0.0, 1.0)


def _part(mode, rates, sizing=None):
    points = [dict(rate=r, normalized_latency_p90=0.03 * (1 + (r > 2)), ttft_p90=0.1,
                   failed_fraction=0.0, context_fraction=dict(gpu=0.5, cpu=0.1, recomputed=0.0, new=0.4))
              for r in rates]
    return {"variants": {"sharegpt": {"workload": {}, "sizing": sizing or {"num_gpu_blocks": 10},
                                      "modes": {mode: {"server_args": "", "points": points}}}}}


def test_merge_parts_keys_points_and_computes_capacities():
    out = sw.merge([_part("pensieve", [1, 2]), _part("pensieve", [3]), _part("none", [1, 3])])
    var = out["variants"]["sharegpt"]
    assert [p["rate"] for p in var["modes"]["pensieve"]["points"]] == [1, 2, 3]
    assert var["modes"]["pensieve"]["capacity_at_slo"]["rate"] == 2
    assert var["modes"]["none"]["capacity_at_slo"]["rate"] == 1
    assert var["capacity_ratio_pensieve_over"] == {"none": 2.0}
    assert "| sharegpt | pensieve | 2 |" in sw.table(out)
    # rate 3's latency is 2x the low-load value: inside the 2x and 3x factors, outside 1.5x
    assert var["modes"]["pensieve"]["capacity_by_latency_factor"] == {"1.5": 2, "2.0": 3, "3.0": 3}
    assert var["capacity_ratio_pensieve_over_by_latency_factor"]["3.0"] == {"none": 1.0}
    assert "| 3 / 3 |" in sw.table(out)
    with pytest.raises(SystemExit):
        sw.merge([_part("pensieve", [1]), _part("none", [1], sizing={"num_gpu_blocks": 11})])


@pytest.mark.slow
def test_point_seed_depends_on_the_rate_only():
    """An A/B at one rate and a sweep's point at that rate replay the same sessions (the seed
    used to depend on the rate's place in --rates)."""
    assert sw.point_seed(0, 12.0) == sw.point_seed(0, 12) == 12_000
    assert sw.point_seed(0, 0.5) == 500 and sw.point_seed(7, 2.0) == 2007
    assert len({sw.point_seed(0, r) for r in (0.25, 0.5, 1, 1.5, 2, 4, 8, 12, 16)}) == 9


def test_smoke_sweep_end_to_end(tmp_path):
    run = [sys.executable, str(ROOT / "bench" / "multiturn_sweep.py")]
    part = tmp_path / "part.json"
    subprocess.run(run + ["run", "--smoke", "--workdir", str(tmp_path / "work"), "--log-dir", str(tmp_path / "logs"),
                          "--out", str(part)], check=True, timeout=120, cwd=ROOT)
    merged = tmp_path / "sweep.json"
    subprocess.run(run + ["merge", str(part), "--out", str(merged)], check=True, timeout=60, cwd=ROOT)
    subprocess.run(run + ["plot", str(merged), "--out", str(tmp_path / "png")], check=True, timeout=120, cwd=ROOT)
    result = json.loads(merged.read_text())
    var = result["variants"]["smoke"]
    assert set(var["modes"]) == {"pensieve", "gpu-only", "none"}
    for mode, m in var["modes"].items():
        assert [p["rate"] for p in m["points"]] == [2.0, 4.0, 8.0]
        assert "capacity_at_slo" in m and m["capacity_at_slo"]["rate"] >= 0
        for p in m["points"]:
            assert p["seed"] == sw.point_seed(0, p["rate"])  # the rate's sessions, whatever else ran
            assert p["turns_ok"] > 0 and p["output_tokens_per_s"] > 0
            assert 0 < p["ttft_s"]["p50"] <= p["ttft_s"]["p90"] <= p["ttft_s"]["p99"]
            assert set(p["normalized_latency_s_per_token"]) >= {"p50", "p90", "p99"}
            assert sum(p["context_tokens"].values()) > 0
            # the CPU engine has no CUDA graphs: its steps are all eager
            assert p["steps_by_path"]["eager"] > 0 and p["steps_by_path"]["graph"] == 0
            assert 0 <= p["swap_out_in_step_bytes"] <= p["swap_bytes"].get('direction="out"', 0)
            if mode != "pensieve":
                assert p["context_tokens"]["cpu"] == 0 and not any(p["swap_bytes"].values())
            if mode == "none":
                assert p["context_tokens"]["gpu"] == 0
    assert "--num-cpu-blocks" in var["modes"]["pensieve"]["server_args"]
    # every server kept its conversations in a store of its own, under the log folder (never the
    # machine-wide default another sweep on the same machine would share)
    stores = {m["server_args"].split("--session-store ")[1].split()[0] for m in var["modes"].values()}
    assert len(stores) == 3 and all(s.startswith(f"sqlite://{tmp_path / 'logs'}/") for s in stores), stores
    pngs = sorted(x.name for x in (tmp_path / "png").iterdir())
    assert pngs == ["smoke_context_sources.png", "smoke_latency_throughput.png", "smoke_ttft_p90.png"]
    assert all((tmp_path / "png" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in pngs)
