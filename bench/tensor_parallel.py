"""Tensor parallelism: one engine over N GPUs against one GPU, in the same run.

    python bench/tensor_parallel.py all --sizes 1 2 --big-shape llama2-70b --big-tp 2 --out tp.json
    python bench/tensor_parallel.py part --tp 2 --shape llama3-8b --out part.json --logits part.pt
    python bench/tensor_parallel.py all --smoke --out tp.json      # CPU plumbing check (gloo, tiny shape)

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
  bench/engine_speed.py's first batch (cache mode none, 4096-token steps).

At sizes above 1 the engine runs without CUDA graphs (see docs/design.md), so
the size-1 figure is also given without them (``--same-settings``, on by
default) for a like-for-like ratio.
"""
from __future__ import annotations

import json
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

    model = shape_checkpoint(args.shape, args.workdir)
    device = "cpu" if args.smoke else "cuda"
    extra = dict(dtype="float32", num_gpu_blocks=256) if args.smoke else {}
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
        n, p, o = SMOKE_BATCH if args.smoke else BATCH
        prompts = [[rng.randrange(vocab) for _ in range(p)] for _ in range(n)]
        params = SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True, detokenize=False)
        t0 = time.perf_counter()
        out = engine.generate(prompts, params)
        seconds = time.perf_counter() - t0
        assert all(len(x) == o for x in out)
        result = dict(shape=args.shape, tensor_parallel_size=args.tp, eager=args.eager, startup_seconds=startup,
                      gpu_blocks=engine.num_gpu_blocks, batch=dict(requests=n, prompt_len=p, output_len=o),
                      seconds=seconds, output_tokens_per_s=n * o / seconds, cuda_graphs=engine.runner.graphs is not None,
                      async_scheduling=engine.async_scheduling)
        print(json.dumps(result), flush=True)
        return result
    finally:
        engine.close()


def run_all(args) -> dict:
    import torch

    gpus = 0 if args.smoke else torch.cuda.device_count()
    work = Path(args.workdir) / "tensor-parallel-parts"  # the parts' files stay out of --out's folder
    work.mkdir(parents=True, exist_ok=True)
    runs, skipped = [], []
    plan = [(args.shape, size, False) for size in args.sizes]
    if args.same_settings and 1 in args.sizes:
        plan.insert(args.sizes.index(1) + 1, (args.shape, 1, True))
    if args.big_shape:
        plan.append((args.big_shape, args.big_tp, False))
    for shape, size, eager in plan:
        if not args.smoke and size > gpus:
            skipped.append(f"{shape} at size {size}: {gpus} CUDA device(s)")
            continue
        tag = f"{shape}-tp{size}{'-eager' if eager else ''}"
        cmd = [sys.executable, __file__, "part", "--tp", str(size), "--shape", shape, "--workdir", args.workdir,
               "--out", str(work / f"{tag}.json"), "--logits", str(work / f"{tag}.pt")]
        cmd += ["--smoke"] if args.smoke else []
        cmd += ["--eager"] if eager else []
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, timeout=args.part_timeout).returncode
        entry = {"tag": tag, "rc": rc, "wall_seconds": time.perf_counter() - t0}
        if rc == 0:
            part_result = json.loads((work / f"{tag}.json").read_text())
            entry.update({k: v for k, v in part_result.items() if k not in ("command", "machine")})
        runs.append(entry)
    return dict(runs=runs, skipped=skipped, parity=_parity(work, args.shape, args.sizes), speedup=_speedup(runs))


def _parity(work: Path, shape: str, sizes: list[int]) -> list[dict]:
    import torch

    ref_path = work / f"{shape}-tp1.pt"
    if not ref_path.is_file():
        return []
    ref = torch.load(ref_path)
    out = []
    for size in sizes:
        path = work / f"{shape}-tp{size}.pt"
        if size == 1 or not path.is_file():
            continue
        other = torch.load(path)
        rel = float((other["logits"] - ref["logits"]).norm() / ref["logits"].norm())
        agree = next((i for i, (a, b) in enumerate(zip(ref["greedy"], other["greedy"])) if a != b), len(ref["greedy"]))
        out.append(dict(shape=shape, tensor_parallel_size=size, logits_rel_l2=rel, greedy_tokens_agreeing=agree,
                        greedy_tokens=len(ref["greedy"])))
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
    lines += [f"- parity at size {p['tensor_parallel_size']}: logits relative L2 {p['logits_rel_l2']:.2e}, "
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
    ap.add_argument("--same-settings", action=__import__("argparse").BooleanOptionalAction, default=True,
                    help="all: also run size 1 without CUDA graphs")
    ap.add_argument("--eager", action="store_true", help="part: no CUDA graphs")
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
