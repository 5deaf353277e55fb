"""Engine speed against its roofline (issue "Engine speed"), one part per call:

    python bench/engine_speed.py engine --out engine.json     # ceilings, start-up, batches, per-step times
    python bench/engine_speed.py hf --out hf.json             # transformers' continuous batching, 64 x (1240 + 200)
    python bench/engine_speed.py http --out http.json         # 256 streaming clients against `serve`
    python bench/engine_speed.py merge engine.json hf.json http.json --out engine_speed.json

Every part runs the Llama-3-8B shape with dummy bf16 weights (bench/shapes.py).

Roofline of a batch of N requests x (P prompt + O output tokens), with the
copy bandwidth C and the bf16 matmul rate M measured in the same run:

    prefill:  N * P tokens x 2 FLOP per weight of the decoder layers (the
              embedding table is a lookup and the LM head runs on the last
              position only), plus causal attention 2 * 2 * L * H * D per
              (query, key) pair: seconds = FLOPs / M;
    decode:   O - 1 steps (the first token comes out of the prefill); step i
              reads every weight but the embedding table once and the KV of
              N * (P + i) tokens: seconds = bytes / C.
    roofline_seconds = prefill + decode.

A decode step's floor is its bytes over C; a prefill step's rate is its FLOPs
over its time. Steps are timed on the host around `engine.step()`; with
asynchronous scheduling a call launches one step and collects the one before,
so each call's time is counted for the step it collected (the one it waited
for). `decode_wait_ms_median` is how long the host waited for a decode step's
tokens: near 0 means the host, not the GPU, sets the pace.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
from shapes import shape_checkpoint  # noqa: E402

# (requests, prompt, output, sampled): the last run repeats the first with temperature and top-p rows
# (their parameters take the sampler's other path to the device)
BATCHES = [(64, 1240, 200, False), (256, 512, 128, False), (1, 1240, 64, False), (64, 1240, 200, True)]
HF_BATCH = (64, 1240, 200)
HTTP_BATCH = (256, 512, 128)
SMOKE = dict(batches=[(8, 40, 6, False), (16, 24, 4, False), (1, 40, 5, False), (8, 40, 6, True)],
             hf=(8, 40, 6), http=(16, 24, 4))  # CPU plumbing check
SAMPLED = dict(temperature=0.8, top_p=0.95)


# ----------------------------------------------------------------------------- model arithmetic
def model_numbers(cfg: dict) -> dict:
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // heads
    per_layer = h * (heads + 2 * kv_heads) * d + heads * d * h + 3 * h * inter
    layer_params = layers * per_layer
    vocab = cfg["vocab_size"]
    return dict(layer_params=layer_params, head_params=vocab * h, layers=layers, heads=heads, head_dim=d,
                kv_bytes_per_token=2 * layers * kv_heads * d * 2, weight_bytes=2 * (layer_params + vocab * h))


def prefill_flops(m: dict, tokens: int, pairs: int) -> float:
    return 2 * m["layer_params"] * tokens + 4 * m["layers"] * m["heads"] * m["head_dim"] * pairs


def roofline(m: dict, ceil: dict, n: int, p: int, o: int) -> dict:
    pairs = n * p * (p + 1) // 2
    pre = prefill_flops(m, n * p, pairs) / (ceil["matmul_TFLOPs"] * 1e12)
    dec = sum(m["weight_bytes"] + n * (p + i) * m["kv_bytes_per_token"] for i in range(1, o)) / (ceil["copy_TBps"] * 1e12)
    return dict(prefill_s=pre, decode_s=dec, total_s=pre + dec)


# ----------------------------------------------------------------------------- parts
def part_engine(args) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from kernels import measure_ceilings
    from pensieve.engine import EngineConfig, LLMEngine, SamplingParams

    dev = torch.device("cpu" if args.smoke else "cuda")
    ceil = measure_ceilings(dev, smoke=args.smoke)
    print(f"ceilings: copy {ceil['copy_TBps']:.2f} TB/s, bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s "
          f"(best of {ceil.get('matmul_TFLOPs_samples')})", flush=True)
    torch.cuda.empty_cache()
    model = shape_checkpoint(args.shape, args.workdir)
    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=model, load_format="dummy", cache_mode="none",
                                    max_num_batched_tokens=4096, max_num_seqs=256))
    startup = time.perf_counter() - t0
    print(f"start-up {startup:.1f} s ({engine.num_gpu_blocks} GPU blocks)", flush=True)
    from pensieve.engine.heap import freeze_startup_heap

    freeze_startup_heap()  # as `serve` does after start-up
    compiles = watch_triton_compiles()  # from here on, any compile is one made while serving
    collections = watch_collections()
    m = model_numbers(engine.model_config)
    vocab = engine.model_config["vocab_size"]
    rng = random.Random(0)
    runs = []
    for n, p, o, sampled in (SMOKE["batches"] if args.smoke else BATCHES):
        prompts = [[rng.randrange(vocab) for _ in range(p)] for _ in range(n)]
        params = SamplingParams(max_tokens=o, ignore_eos=True, detokenize=False,
                                **(SAMPLED if sampled else dict(temperature=0.0)))
        steps = []
        t0 = time.perf_counter()
        for prompt in prompts:
            engine.add_request(prompt, params)
        while engine.has_unfinished():
            s0 = time.perf_counter()
            before = engine.last_step
            engine.step()
            info = engine.last_step
            if info is None or info is before:
                continue  # nothing collected by this call (the first launch of a batch)
            # this call also launched the next step: a host wait there shows up in its launch time
            nxt = engine.inflight.info if engine.inflight is not None else None
            steps.append((time.perf_counter() - s0, dict(decode_only=info.decode_only, seqs=info.seqs,
                                                         tokens=info.tokens, context=info.context,
                                                         pairs=info.pairs, wait=info.wait_s,
                                                         launch=info.launch_s, execute=info.execute_s,
                                                         next_launch=nxt.launch_s if nxt else 0.0,
                                                         next_execute=nxt.execute_s if nxt else 0.0)))
        seconds = time.perf_counter() - t0
        runs.append(summarize(m, ceil, n, p, o, seconds, steps))
        runs[-1]["sampling"] = ", ".join(f"{k} {v}" for k, v in SAMPLED.items()) if sampled else "greedy"
        runs[-1]["triton_compiles_while_serving"] = list(compiles)
        compiles.clear()
        runs[-1]["gc_collections"] = dict(count=len(collections), max_ms=max(collections, default=0.0),
                                          total_ms=sum(collections))
        collections.clear()
        print(json.dumps(runs[-1]), flush=True)
    return dict(ceilings=ceil, startup_seconds=startup, gpu_blocks=engine.num_gpu_blocks,
                cuda_graphs=engine.runner.graphs is not None, runs=runs)


def watch_triton_compiles() -> list[str]:
    """The names of the Triton kernels compiled from now on (a list the hook appends to; empty on the
    CPU, where the interpreter compiles nothing)."""
    seen: list[str] = []
    try:
        import triton
        hook = lambda **kw: seen.append(kw["repr"])  # noqa: E731 - called after each compile
        triton.knobs.runtime.jit_post_compile_hook = hook
    except (ImportError, AttributeError):
        pass
    return seen


def watch_collections() -> list[float]:
    """Milliseconds of each garbage collection from now on (a list the callback appends to)."""
    import gc

    seen: list[float] = []
    start = [0.0]

    def callback(phase, info):
        if phase == "start":
            start[0] = time.perf_counter()
        else:
            seen.append((time.perf_counter() - start[0]) * 1e3)

    gc.callbacks.append(callback)
    return seen


def summarize(m, ceil, n, p, o, seconds, steps) -> dict:
    decode = [(t, s) for t, s in steps if s["decode_only"]]
    prefill = [(t, s) for t, s in steps if not s["decode_only"]]

    def ms_stats(items):
        ms = [t * 1e3 for t, _ in items]
        return dict(median=statistics.median(ms), max=max(ms), count=len(ms)) if ms else None

    def over_2x(items):
        if not items:
            return 0
        med = statistics.median(t for t, _ in items)
        return sum(1 for t, _ in items if t > 2 * med)

    def slow(kind, items):  # steps over 1.5x their kind's median, with what they held, to explain them
        if not items:
            return []
        med = statistics.median(t for t, _ in items)
        return [dict(kind=kind, index=steps.index((t, s)), ms=t * 1e3, **s) for t, s in items if t > 1.5 * med]

    full = [(t, s) for t, s in decode if s["seqs"] == n]
    floors = [t / ((m["weight_bytes"] + s["context"] * m["kv_bytes_per_token"]) / (ceil["copy_TBps"] * 1e12))
              for t, s in full]
    big = [(t, s) for t, s in prefill if s["tokens"] >= 4096]
    rates = [prefill_flops(m, s["tokens"], s["pairs"]) / t / 1e12 for t, s in big]
    roof = roofline(m, ceil, n, p, o)
    return dict(requests=n, prompt_len=p, output_len=o, seconds=seconds, roofline_seconds=roof["total_s"],
                roofline=roof, ratio=seconds / roof["total_s"],
                decode_step_ms=ms_stats(decode), prefill_step_ms=ms_stats(prefill),
                steps_over_2x_median=over_2x(decode) + over_2x(prefill),
                full_decode_step_over_floor=statistics.median(floors) if floors else None,
                prefill_4096_pct_matmul=100 * statistics.median(rates) / ceil["matmul_TFLOPs"] if rates else None,
                decode_wait_ms_median=statistics.median(s["wait"] * 1e3 for _, s in decode) if decode else None,
                steps=len(steps), slow_steps=slow("decode", decode) + slow("prefill", prefill),
                call_ms=[round(t * 1e3, 2) for t, _ in steps],
                next_launch_ms=[round(s["next_launch"] * 1e3, 2) for _, s in steps])


def part_hf(args) -> dict:
    """transformers' own continuous batching (generate_batch, paged SDPA, its default sizing from
    free GPU memory) on the same batch: CUDA only (its sizing finds no memory on a CPU)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.generation import GenerationConfig

    model_dir = shape_checkpoint(args.shape, args.workdir)
    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("cpu" if args.smoke else "cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="paged|sdpa").eval()
    n, p, o = SMOKE["hf"] if args.smoke else HF_BATCH
    rng = random.Random(0)
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(p)] for _ in range(n)]
    gen = GenerationConfig(max_new_tokens=o, min_new_tokens=o, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate_batch(inputs=prompts[:4], generation_config=GenerationConfig(
        max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0), progress_bar=False)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=gen, progress_bar=False)
    sync()
    seconds = time.perf_counter() - t0
    tokens = sum(len(r.generated_tokens) for r in out.values())
    print(f"transformers continuous batching: {seconds:.1f} s, {tokens} tokens", flush=True)
    return dict(transformers_cb_seconds=seconds, transformers_cb_tokens=tokens)


def part_http(args) -> dict:
    model = shape_checkpoint(args.shape, args.workdir)
    port = 18000 + os.getpid() % 1000
    server = subprocess.Popen([sys.executable, "-m", "pensieve.engine", "serve", "--model", model,
                               "--load-format", "dummy", "--cache-mode", "none", "--max-num-batched-tokens", "4096",
                               "--max-num-seqs", "256", "--max-waiting-requests", "1024", "--port", str(port)])
    n, p, o = SMOKE["http"] if args.smoke else HTTP_BATCH
    try:
        vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
        result = asyncio.run(_http_load(port, n, p, o, Path(model).name, vocab, server.poll))
    finally:
        server.terminate()
        server.wait(60)
    print(f"http: {result}", flush=True)
    return result


async def _http_load(port: int, n: int, p: int, o: int, served_name: str, vocab: int, exited) -> dict:
    import aiohttp

    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900),
                                     connector=aiohttp.TCPConnector(limit=0)) as http:
        for _ in range(900):
            if exited() is not None:
                raise SystemExit(f"serve exited with code {exited()} before it was ready (see its log above)")
            try:
                async with http.get(base + "/ready") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(1)
        rng = random.Random(1)
        async with http.get(base + "/v1/models") as r:
            assert (await r.json())["data"][0]["id"] == served_name

        async def one(prompt):
            body = dict(model=served_name, prompt=prompt, max_tokens=o, temperature=0, ignore_eos=True, stream=True)
            got = 0
            async with http.post(base + "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        got += 1
            return got

        await asyncio.gather(*(one([rng.randrange(vocab) for _ in range(16)]) for _ in range(8)))  # warm
        prompts = [[rng.randrange(vocab) for _ in range(p)] for _ in range(n)]
        t0 = time.perf_counter()
        events = await asyncio.gather(*(one(pr) for pr in prompts))
        seconds = time.perf_counter() - t0
    return dict(http_seconds=seconds, http_output_tokens_per_s=n * o / seconds, http_stream_events=sum(events))


def merge(paths: list[str], smoke: bool = False) -> dict:
    hf_batch, http_batch = (SMOKE["hf"], SMOKE["http"]) if smoke else (HF_BATCH, HTTP_BATCH)
    result: dict = {}
    for path in paths:
        if Path(path).is_file():
            result.update(json.loads(Path(path).read_text()))
    runs = result.get("runs", [])
    for run in runs:
        if run.get("sampling", "greedy") != "greedy":
            continue  # transformers and the HTTP clients decode greedily
        if (run["requests"], run["prompt_len"], run["output_len"]) == hf_batch and "transformers_cb_seconds" in result:
            run["transformers_cb_seconds"] = result["transformers_cb_seconds"]
            run["speedup_vs_transformers_cb"] = result["transformers_cb_seconds"] / run["seconds"]
        if (run["requests"], run["prompt_len"], run["output_len"]) == http_batch and "http_seconds" in result:
            inproc = run["requests"] * run["output_len"] / run["seconds"]
            result["http_vs_inprocess"] = result["http_output_tokens_per_s"] / inproc
    return result


def table(result: dict) -> str:
    """The figures as a Markdown table (the results README quotes it)."""
    c = result["ceilings"]
    lines = [f"Ceilings in the same run: copy {c['copy_TBps']:.2f} TB/s, bf16 matmul {c['matmul_TFLOPs']:.0f} TFLOP/s; "
             f"start-up {result['startup_seconds']:.1f} s.", "",
             "| batch | seconds | roofline s | ratio | decode step ms (median / max) | decode vs floor | "
             "prefill step ms (median / max) | prefill % of matmul | steps > 2x median |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["runs"]:
        d, p = r["decode_step_ms"], r["prefill_step_ms"]
        pct = r["prefill_4096_pct_matmul"]
        label = "" if r.get("sampling", "greedy") == "greedy" else f", {r['sampling']}"
        lines.append(f"| {r['requests']} x ({r['prompt_len']} + {r['output_len']}){label} | {r['seconds']:.2f} | "
                     f"{r['roofline_seconds']:.2f} | {r['ratio']:.2f} | {d['median']:.2f} / {d['max']:.2f} | "
                     f"{r['full_decode_step_over_floor']:.2f} | {p['median']:.1f} / {p['max']:.1f} | "
                     f"{'' if pct is None else f'{pct:.0f}%'} | {r['steps_over_2x_median']} |")
    for r in result["runs"]:
        if "transformers_cb_seconds" in r:
            lines.append(f"\ntransformers {r['transformers_cb_seconds']:.1f} s on {r['requests']} x "
                         f"({r['prompt_len']} + {r['output_len']}): Pensieve {r['speedup_vs_transformers_cb']:.1f}x faster.")
    if "http_vs_inprocess" in result:
        lines.append(f"\nHTTP (256 streaming clients): {result['http_output_tokens_per_s']:.0f} output tokens/s, "
                     f"{100 * result['http_vs_inprocess']:.1f}% of in-process.")
    return "\n".join(lines)


def main() -> int:
    ap = harness.parser(__doc__, out_required=True)
    ap.add_argument("part", choices=["engine", "hf", "http", "merge", "table"])
    ap.add_argument("inputs", nargs="*", help="merge: the parts' JSON files")
    ap.add_argument("--smoke", action="store_true", help="tiny batches on the CPU (checks the plumbing, no figures; "
                                                         "the llama-mini shape unless --shape says otherwise)")
    args = ap.parse_args()
    if args.smoke and args.shape == harness.SHAPE_DEFAULT:
        args.shape = "llama-mini"  # the 8B shape's float32 dummy weights do not fit a CPU machine
    if args.part == "merge":
        Path(args.out).write_text(json.dumps(merge(args.inputs, args.smoke), indent=2))
        return 0
    if args.part == "table":
        Path(args.out).write_text(table(json.loads(Path(args.inputs[0]).read_text())) + "\n")
        return 0
    result = {"engine": part_engine, "hf": part_hf, "http": part_http}[args.part](args)
    harness.write_result(result, args.out, echo=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
