"""Which host call blocks a step? (issue "Engine speed": some eager steps' launches wait for the GPU.)

    python bench/diag_sync.py        # Llama-3-8B shape, dummy weights, on the GPU

Runs 256 x (512 + 8) under torch.profiler (CPU and CUDA activities, Python stacks) and
prints the longest CUDA runtime calls the host made, each with the torch op and the
engine lines above it. A launch that waits for the device shows as one runtime call
lasting about a step (cudaStreamSynchronize, cudaMemcpyAsync from pageable memory,
cudaHostAlloc, cudaFree, ...).
"""
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from shapes import shape_checkpoint  # noqa: E402


def where(event) -> str:
    """The torch op and the engine frames above a runtime call."""
    names, e = [], event.cpu_parent
    while e is not None:
        if e.stack:
            frames = [f for f in e.stack if "pensieve" in f or "bench" in f]
            return f"{' < '.join(names[:3])} | " + " < ".join(frames[:4])
        names.append(e.name)
        e = e.cpu_parent
    return " < ".join(names[:4])


def main() -> int:
    from pensieve.engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(model=shape_checkpoint("llama3-8b", "/tmp/pensieve-shapes"), load_format="dummy",
                                    cache_mode="none", max_num_batched_tokens=4096, max_num_seqs=256))
    rng = random.Random(0)
    vocab = engine.model_config["vocab_size"]
    for _ in range(256):
        engine.add_request([rng.randrange(vocab) for _ in range(512)],
                           SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, detokenize=False))
    calls = []
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, with_stack=True) as prof:
        while engine.has_unfinished():
            t0 = time.perf_counter()
            engine.step()
            calls.append(round((time.perf_counter() - t0) * 1e3))
    print("calls (ms):", calls)
    runtime = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU
               and e.name.startswith("cuda") and e.cpu_time_total > 2000]
    runtime.sort(key=lambda e: -e.cpu_time_total)
    print(f"{len(runtime)} runtime calls over 2 ms")
    for e in runtime[:25]:
        print(f"{e.cpu_time_total / 1e3:8.1f} ms  {e.name}  <- {where(e)}")
    slow_ops = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU
                and not e.name.startswith("cuda") and e.self_cpu_time_total > 5000]
    slow_ops.sort(key=lambda e: -e.self_cpu_time_total)
    print(f"{len(slow_ops)} ops with over 5 ms of their own host time")
    for e in slow_ops[:15]:
        frames = [f for f in (e.stack or []) if "pensieve" in f or "bench" in f]
        print(f"{e.self_cpu_time_total / 1e3:8.1f} ms  {e.name}  <- {' < '.join(frames[:4])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
