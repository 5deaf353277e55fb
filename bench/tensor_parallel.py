"""Tensor parallelism: one engine over N GPUs against one GPU, in the same run.

    python bench/tensor_parallel.py all --sizes 1 2 --big-shape llama2-70b --big-tp 2 --out tp.json
    python bench/tensor_parallel.py part --tp 2 --shape llama3-8b --out part.json --logits part.pt
    python bench/tensor_parallel.py all --smoke --out tp.json      # CPU plumbing check (gloo, tiny shape)
    python bench/tensor_parallel.py all --cpu --layers 4 --parity-only --out parity.json  # bf16 noise vs sharding

``all`` runs one ``part`` per size, each in its own process (a process holds one
tensor-parallel group), then the big shape at ``--big-tp``, and writes one JSON
(plus a markdown table beside it). A part builds the engine with dummy bf16
weights (bench/shapes.py; the dummy weights of every size are the same model:
a shard is a slice of the size-1 tensor), then

* parity: the float32 logits of a fixed prompt's last 16 positions and 32 greedy
  tokens (kept in ``--logits``; ``all`` compares each size with size 1: relative
  L2 error of the logits, and how many greedy tokens agree before the first
  difference);
* throughput: 64 requests x (1240 prompt + 200 output tokens) at once, as
  bench/engine_speed.py's first batch (cache mode none, 4096-token steps);
  before it, a batch of prefills alone and one of decodes alone, each timed
  (ms a step), and with ``--profile`` rank 0's host profile of each.

``--same-settings`` also runs size 1 without CUDA graphs; ``--fp32-parity`` (on
by default) also runs every size in float32 for parity only, which tells a
sharding error (float32 sizes disagree) from bf16's own rounding (bf16 at size 1
is as far from float32 as bf16 at size N).
"""
from __future__ import annotations

import cProfile
import json
import pstats
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
from shapes import shape_checkpoint  # noqa: E402

BATCH = (64, 1240, 200)
SMOKE_BATCH = (4, 40, 6)
PARITY_PROMPT_LEN, PARITY_ROWS, PARITY_TOKENS = 64, 16, 32


def part(args) -> dict:
    import torch

    from pensieve.engine import EngineConfig, LLMEngine, SamplingParams
    from pensieve.engine.scheduler import ScheduledChunk, SchedulerOutput

    model = shape_checkpoint(args.shape, args.workdir, args.layers)
    device = "cpu" if args.smoke or args.cpu else "cuda"
    extra = dict(dtype="float32", num_gpu_blocks=256) if args.smoke else {}
    if args.cpu:  # (bf16 on the CPU too, as on the GPU, unless --fp32)
        extra.update(dtype="bfloat16", num_gpu_blocks=64)
    if args.fp32:
        extra.update(dtype="float32")
    if args.eager:
        extra.update(cuda_graphs=False)
    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=model, load_format="dummy", cache_mode="none", device=device,
                                    max_num_batched_tokens=4096, max_num_seqs=256,
                                    tensor_parallel_size=args.tp, **extra))
    startup = time.perf_counter() - t0
    print(f"tp {args.tp}: start-up {startup:.1f} s, {engine.num_gpu_blocks} GPU blocks", flush=True)
    try:
        vocab = engine.model_config["vocab_size"]
        rng = random.Random(0)
        prompt = [rng.randrange(vocab) for _ in range(PARITY_PROMPT_LEN)]
        rid = engine.add_request(prompt, SamplingParams(max_tokens=1))
        req = engine.requests[rid]
        assert engine.cache.grow(req, len(prompt))
        logits = engine.runner.execute(SchedulerOutput([ScheduledChunk(req, 0, len(prompt))]), all_logits=True)
        engine.abort(rid)
        greedy = engine.generate([prompt], SamplingParams(max_tokens=PARITY_TOKENS, temperature=0,
                                                          ignore_eos=True, detokenize=False))[0]
        if args.logits:
            torch.save({"logits": logits[-PARITY_ROWS:].float().cpu(), "greedy": greedy}, args.logits)
        if args.parity_only:
            return dict(shape=args.shape, tensor_parallel_size=args.tp, eager=args.eager, fp32=args.fp32,
                        startup_seconds=startup, gpu_blocks=engine.num_gpu_blocks)
        n, p, o = SMOKE_BATCH if args.smoke else BATCH
        # where a step's time goes: a batch of prefills alone (one output token each), and one
        # of decodes (short prompts), each timed apart before the whole batch
        phases = {}
        for phase, (pn, pp, po) in {"prefill": (n, p, 1), "decode": (n, 16, o)}.items():
            probe = [[rng.randrange(vocab) for _ in range(pp)] for _ in range(pn)]
            prof = cProfile.Profile() if args.profile else None
            t0 = time.perf_counter()
            if prof:
                prof.enable()
            steps = _run_counting_steps(engine, probe, SamplingParams(max_tokens=po, temperature=0.0,
                                                                      ignore_eos=True, detokenize=False))
            seconds = time.perf_counter() - t0
            if prof:  # rank 0's host time by function: where a step waits
                prof.disable()
                print(f"tp {args.tp}: {phase} phase, rank 0's host time", flush=True)
                pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(14)
            phases[phase] = dict(requests=pn, prompt_len=pp, output_len=po, seconds=seconds, steps=steps,
                                 ms_per_step=1e3 * seconds / max(steps, 1))
        print(f"tp {args.tp}: phases {json.dumps(phases)}", flush=True)
        prompts = [[rng.randrange(vocab) for _ in range(p)] for _ in range(n)]
        params = SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True, detokenize=False)
        t0 = time.perf_counter()
        out = engine.generate(prompts, params)
        seconds = time.perf_counter() - t0
        assert all(len(x) == o for x in out)
        result = dict(shape=args.shape, tensor_parallel_size=args.tp, eager=args.eager, startup_seconds=startup,
                      gpu_blocks=engine.num_gpu_blocks, batch=dict(requests=n, prompt_len=p, output_len=o),
                      seconds=seconds, output_tokens_per_s=n * o / seconds, cuda_graphs=engine.runner.graphs is not None,
                      async_scheduling=engine.async_scheduling, phases=phases)
        print(json.dumps(result), flush=True)
        return result
    finally:
        engine.close()


def _run_counting_steps(engine, prompts, params) -> int:
    """Run ``prompts`` to completion; returns how many engine steps it took."""
    for p in prompts:
        engine.add_request(p, params)
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    return steps


def run_all(args) -> dict:
    import torch

    gpus = 0 if args.smoke or args.cpu else torch.cuda.device_count()
    work = Path(args.workdir) / "tensor-parallel-parts"  # the parts' files stay out of --out's folder
    work.mkdir(parents=True, exist_ok=True)
    runs, skipped = [], []
    plan = [(args.shape, size, False) for size in args.sizes]
    if args.same_settings and 1 in args.sizes:
        plan.insert(args.sizes.index(1) + 1, (args.shape, 1, True))
    if args.big_shape:
        plan.append((args.big_shape, args.big_tp, False))
    plan = [(shape, size, eager, False) for shape, size, eager in plan]
    if args.parity_only:  # bf16 and float32 at each size, parity alone
        plan = [(args.shape, size, False, fp32) for fp32 in (False, True) for size in args.sizes]
    elif args.fp32_parity and not args.smoke:
        # float32 at every size: sharding errors show there; bf16's own noise is tp1 bf16 against tp1 float32
        plan += [(args.shape, size, False, True) for size in args.sizes]
    for shape, size, eager, fp32 in plan:
        if not (args.smoke or args.cpu) and size > gpus:
            skipped.append(f"{shape} at size {size}: {gpus} CUDA device(s)")
            continue
        tag = f"{shape}-tp{size}{'-eager' if eager else ''}{'-fp32' if fp32 else ''}"
        cmd = [sys.executable, __file__, "part", "--tp", str(size), "--shape", shape, "--workdir", args.workdir,
               "--out", str(work / f"{tag}.json"), "--logits", str(work / f"{tag}.pt")]
        cmd += ["--smoke"] if args.smoke else []
        cmd += ["--eager"] if eager else []
        cmd += ["--fp32", "--parity-only", "--eager"] if fp32 else []  # (no graphs to capture: a faster start)
        cmd += ["--profile"] if args.profile else []
        cmd += ["--cpu"] if args.cpu else []
        cmd += ["--layers", str(args.layers)] if args.layers else []
        cmd += ["--parity-only"] if args.parity_only and not fp32 else []
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, timeout=args.part_timeout).returncode
        entry = {"tag": tag, "rc": rc, "wall_seconds": time.perf_counter() - t0}
        if rc == 0:
            part_result = json.loads((work / f"{tag}.json").read_text())
            entry.update({k: v for k, v in part_result.items() if k not in ("command", "machine")})
        runs.append(entry)
    runs = [r for r in runs if r["rc"] or "seconds" in r]  # parity-only parts: in "parity", not in the table
    return dict(runs=runs, skipped=skipped, parity=_parity(work, args.shape, args.sizes), speedup=_speedup(runs))


def _parity(work: Path, shape: str, sizes: list[int]) -> list[dict]:
    """Each size against size 1 in bf16; where the float32 parts ran, each size's float32 logits
    against size 1's (sharding errors), and bf16 against float32 at each size (bf16's own noise)."""
    import torch

    def load(tag):
        path = work / f"{shape}-{tag}.pt"
        return torch.load(path) if path.is_file() else None

    def compare(a, b, what, size):
        rel = float((b["logits"] - a["logits"]).norm() / a["logits"].norm())
        agree = next((i for i, (x, y) in enumerate(zip(a["greedy"], b["greedy"])) if x != y), len(a["greedy"]))
        return dict(shape=shape, tensor_parallel_size=size, what=what, logits_rel_l2=rel,
                    greedy_tokens_agreeing=agree, greedy_tokens=len(a["greedy"]))

    out = []
    ref, ref32 = load("tp1"), load("tp1-fp32")
    for size in sizes:
        bf, f32 = load(f"tp{size}"), load(f"tp{size}-fp32")
        if size != 1 and ref is not None and bf is not None:
            out.append(compare(ref, bf, "bf16 vs tp1 bf16", size))
        if size != 1 and ref32 is not None and f32 is not None:
            out.append(compare(ref32, f32, "float32 vs tp1 float32", size))
        if ref32 is not None and bf is not None:
            out.append(compare(ref32, bf, "bf16 vs tp1 float32", size))
    return out


def _speedup(runs: list[dict]) -> list[dict]:
    ok = [r for r in runs if r["rc"] == 0]
    base = {r["eager"]: r for r in ok if r["tensor_parallel_size"] == 1}
    out = []
    for r in ok:
        if r["tensor_parallel_size"] == 1:
            continue
        for eager, b in base.items():
            if b["shape"] == r["shape"]:
                out.append(dict(shape=r["shape"], tensor_parallel_size=r["tensor_parallel_size"],
                                against="tp1 " + ("without CUDA graphs" if eager else "default settings"),
                                speedup=b["seconds"] / r["seconds"]))
    return out


def table(result: dict) -> str:
    lines = ["| run | start-up s | batch s | output tok/s | GPU blocks |", "| --- | --- | --- | --- | --- |"]
    for r in result["runs"]:
        if r["rc"]:
            lines.append(f"| {r['tag']} | failed (rc {r['rc']}) | | | |")
            continue
        lines.append(f"| {r['tag']} | {r['startup_seconds']:.1f} | {r['seconds']:.2f} | "
                     f"{r['output_tokens_per_s']:.0f} | {r['gpu_blocks']} |")
    lines += [""] + [f"- speedup at size {s['tensor_parallel_size']} ({s['shape']}) vs {s['against']}: "
                     f"{s['speedup']:.2f}x" for s in result["speedup"]]
    lines += [f"- parity at size {p['tensor_parallel_size']} ({p['what']}): logits relative L2 {p['logits_rel_l2']:.2e}, "
              f"{p['greedy_tokens_agreeing']}/{p['greedy_tokens']} greedy tokens agree" for p in result["parity"]]
    lines += [f"- skipped: {s}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = harness.parser(__doc__)
    ap.add_argument("what", choices=["all", "part"])
    ap.add_argument("--tp", type=int, default=1, help="part: the tensor-parallel size")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2], help="all: the sizes to compare")
    ap.add_argument("--big-shape", default=None, help="all: also load and serve this shape at --big-tp")
    ap.add_argument("--big-tp", type=int, default=2)
    ap.add_argument("--same-settings", action=__import__("argparse").BooleanOptionalAction, default=False,
                    help="all: also run size 1 without CUDA graphs")
    ap.add_argument("--eager", action="store_true", help="part: no CUDA graphs")
    ap.add_argument("--profile", action="store_true", help="part: print rank 0's host profile of each phase")
    ap.add_argument("--fp32", action="store_true", help="part: float32 weights and activations")
    ap.add_argument("--parity-only", action="store_true",
                    help="the parity logits and tokens alone, no batch (all: bf16 and float32 at every size)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (gloo) in bf16, e.g. a cut shape's parity")
    ap.add_argument("--layers", type=int, default=0, help="cut the shape to this many layers (0: all)")
    ap.add_argument("--fp32-parity", action=__import__("argparse").BooleanOptionalAction, default=True,
                    help="all: also every size in float32, parity only (tells sharding errors from bf16 noise)")
    ap.add_argument("--logits", default=None, help="part: save parity logits and greedy tokens here")
    ap.add_argument("--part-timeout", type=float, default=900)
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, the llama-mini shape, tiny batch (plumbing)")
    args = ap.parse_args()
    if args.smoke and args.shape == harness.SHAPE_DEFAULT:
        args.shape = "llama-mini"
    if args.what == "part":
        harness.write_result(part(args), args.out)
        return 0
    result = run_all(args)
    harness.write_result(result, args.out)
    if args.out:
        Path(args.out).with_suffix(".md").write_text(table(result))
    print(table(result))
    return 0 if all(r["rc"] == 0 for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
