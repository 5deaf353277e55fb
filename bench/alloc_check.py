"""Does serving stall the host? (issue "Engine speed": some eager steps' launches waited for the
device. The cause was the first launch of a cuBLAS kernel, which start-up's warm-up now makes;
cudaMalloc calls while serving remain, 7 in the 64 batch, and stall nothing.)

    python bench/alloc_check.py        # Llama-3-8B shape, dummy weights, on the GPU

Runs 64 x (1240 + 40) and 256 x (512 + 24) after start-up and prints, per batch, the
caching allocator's device allocations made while serving (0 is the goal: start-up's
warm-up runs the largest step, whose blocks the allocator keeps) and the first
engine.step() call times (a host stall shows as a call of about two steps' time
followed by a short one). It also lists every synchronizing torch call made while
serving (torch.cuda.set_sync_debug_mode), by the engine line that made it: the only
one expected is the wait for the sampled token ids. The batches run twice: the
first pass lists the synchronizing calls; a stall in the first pass and not the second is
something start-up's warm-up left to serving.
"""
import collections
import random
import traceback
import warnings
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from shapes import shape_checkpoint  # noqa: E402


def main() -> int:
    from pensieve.engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model=shape_checkpoint("llama3-8b", "/tmp/pensieve-shapes"), load_format="dummy",
                                    cache_mode="none", max_num_batched_tokens=4096, max_num_seqs=256))
    rng = random.Random(0)
    vocab = engine.model_config["vocab_size"]
    # twice: the first pass, in a fresh process, shows what start-up left to serving (allocations,
    # first launches); the second shows the same batches once everything has run
    for first in (True, False):
        print("first pass" if first else "second pass", flush=True)
        run_batches(engine, rng, vocab, syncs_too=first)
    return 0


def run_batches(engine, rng, vocab, syncs_too: bool) -> None:
    from pensieve.engine import SamplingParams

    for n, p, o in ((64, 1240, 40), (256, 512, 24)):
        before = torch.cuda.memory_stats()["num_device_alloc"]
        for _ in range(n):
            engine.add_request([rng.randrange(vocab) for _ in range(p)],
                               SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True, detokenize=False))
        calls = []
        syncs: collections.Counter = collections.Counter()

        def record(message, category, filename, lineno, file=None, line=None):
            # the engine frames nearest the synchronizing call say which line made it
            frames = [f for f in traceback.extract_stack()[:-1] if "pensieve" in f.filename]
            syncs[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-3:][::-1])] += 1

        if syncs_too:
            torch.cuda.set_sync_debug_mode("warn")
        saved = warnings.showwarning
        warnings.showwarning = record
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = record
                while engine.has_unfinished():
                    t0 = time.perf_counter()
                    engine.step()
                    calls.append((time.perf_counter() - t0) * 1e3)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = saved
        grown = torch.cuda.memory_stats()["num_device_alloc"] - before
        slow = sum(c > 1.5 * sorted(calls[:16])[8] for c in calls)
        print(f"{n} x ({p} + {o}): {sum(calls) / 1e3:.3f} s, {slow} calls over 1.5x the first prefill calls' median; "
              f"cudaMalloc while serving: {grown}; first calls (ms): {[round(c) for c in calls[:36]]}", flush=True)
        for where, count in syncs.most_common(12):
            print(f"  synchronizing call x{count}: {where}")


if __name__ == "__main__":
    sys.exit(main())
