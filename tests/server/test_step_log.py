"""The engine loop's step-statistics log line (engine_loop.StepLog)."""
from __future__ import annotations

import logging

from pensieve.engine import EngineConfig, LLMEngine, SamplingParams
from pensieve.engine.server.engine_loop import STATS_INTERVAL, StepLog


def test_step_log_counts_the_steps_and_their_paths_per_interval(tiny_checkpoint, caplog):
    engine = LLMEngine(EngineConfig(model=tiny_checkpoint("llama"), device="cpu", dtype="float32",
                                    num_gpu_blocks=64, num_cpu_blocks=16, block_size=16))
    steps = StepLog(engine)
    engine.add_request(list(range(5, 40)), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    now = 1000.0
    collected = 0
    with caplog.at_level(logging.INFO, logger="pensieve.server"):
        while engine.has_unfinished():
            engine.step()
            collected += 1
            steps.stepped(now)  # nothing logged before STATS_INTERVAL has passed
            now += 0.01
        assert not [r for r in caplog.records if "steps:" in r.message]
        steps.stepped(now + STATS_INTERVAL)
        steps.stepped(now + 2 * STATS_INTERVAL + 1)  # the next interval starts from zero
    lines = [r.message for r in caplog.records if "steps:" in r.message]
    assert len(lines) == 2, lines
    # 6 tokens: one prefill step, five decode steps, all eager on a CPU; a step's host times are there
    assert lines[0].startswith(f"steps: {collected} in ") and f"(eager {collected})" in lines[0]
    assert "schedule " in lines[0] and "running 0, waiting 0, preempted 0" in lines[0]
    assert "swap in 0.00 GB/s, out 0.00 GB/s (in-step 0.00)" in lines[0]
    assert lines[1].startswith("steps: 0 in ") and "(none)" in lines[1]
