"""Multi-turn chat load generator over HTTP (docs/design.md, "Performance method").

Workload (the paper's replay): sessions arrive as a Poisson process; each
session's next turn is sent only after the previous answer arrived, after an
exponential think time; turns per conversation and tokens per turn follow
ShareGPT's shape (mean 5.56 turns, 37.8 input and 204.6 output tokens per turn)
or UltraChat's (3.86, 51.8, 257.8). Turn counts are geometric (>= 1) and token
counts log-normal (sigma 0.8) with those means, then clipped to
--max-input-tokens / --max-output-tokens. Outputs have fixed lengths
(``ignore_eos``), so every cache mode generates the same tokens. Seedable; a
time-scale factor multiplies every arrival gap and think time.

Reports request throughput, output-token throughput, time-to-first-token (at
the first streamed chunk, which the server sends at the first sampled token) and
normalized latency (end-to-end latency / output tokens) percentiles, and where
the prompt tokens came from (``pensieve_context_tokens_total`` deltas from
/metrics); writes everything as JSON.

Against a running server:
    python bench/multiturn.py --url http://127.0.0.1:8000 --sessions 50 --rate 1

Several configurations back to back (the script starts and stops each server):
    python bench/multiturn.py --model /path/ckpt --cache-mode pensieve,gpu-only,none \
        --server-args "--load-format dummy --num-gpu-blocks 2000" --sessions 200 --rate 2 \
        --out bench/results/multiturn.json
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass

import aiohttp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

DATASETS = {  # turns per session, input tokens per turn, output tokens per turn (means)
    "sharegpt": (5.56, 37.8, 204.6),
    "ultrachat": (3.86, 51.8, 257.8),
    # long conversations (documents pasted turn after turn): with --min-turns 4 --max-turns 8 and inputs
    # clipped to 4096, histories reach 8k to 32k tokens (bench/multiturn_sweep.py's "long" variant)
    "long": (6.0, 3000.0, 260.0),
}
WORDS = ("the a cache keeps each conversation between turns so new tokens only are computed memory gpu cpu tier "
         "block chunk session history model serve request prompt answer question user assistant hello world chat "
         "attention key value layer copy swap evict retention idle leading drop recompute batch schedule decode "
         "prefill kernel paged table what is how does why can you tell me about please explain thanks").split()


@dataclass
class Turn:
    input_tokens: int
    output_tokens: int
    think_time: float  # seconds before this turn is sent (after the previous answer), 0 for the first


@dataclass
class SessionPlan:
    session_id: str
    arrival: float
    turns: list[Turn]


@dataclass
class TurnResult:
    session_id: str
    turn: int
    ok: bool
    status: int = 0
    error: str = ""
    ttft: float = math.nan
    latency: float = math.nan
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    start: float = 0.0


def _lognormal(rng: random.Random, mean: float, sigma: float = 0.8) -> float:
    mu = math.log(mean) - sigma * sigma / 2
    return rng.lognormvariate(mu, sigma)


def make_workload(args) -> list[SessionPlan]:
    rng = random.Random(args.seed)
    mean_turns, mean_in, mean_out = DATASETS[args.dataset]
    plans, t = [], 0.0
    for i in range(args.sessions):
        t += rng.expovariate(args.rate) * args.time_scale
        n_turns = getattr(args, "min_turns", 1)
        p = 1.0 / max(1.0, mean_turns - n_turns + 1)  # geometric above the minimum, same mean
        while rng.random() > p and n_turns < args.max_turns:
            n_turns += 1
        turns = []
        for j in range(n_turns):
            n_in = int(min(args.max_input_tokens, max(1, round(_lognormal(rng, mean_in)))))
            n_out = int(min(args.max_output_tokens, max(1, round(_lognormal(rng, mean_out)))))
            think = 0.0 if j == 0 else rng.expovariate(1.0 / args.think_time) * args.time_scale
            turns.append(Turn(n_in, n_out, think))
        plans.append(SessionPlan(f"bench-{args.seed}-{i}", t, turns))
    return plans


def _text(rng: random.Random, n_tokens: int) -> str:
    # about one token per word for these words with most tokenizers
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n_tokens)))


async def run_session(http: aiohttp.ClientSession, args, plan: SessionPlan, t0: float, results: list,
                      started: list | None = None) -> None:
    """Replay one session; each finished turn goes to ``results``, each sent one to ``started`` too."""
    await asyncio.sleep(max(0.0, t0 + plan.arrival - time.monotonic()))
    rng = random.Random(f"{args.seed}-{plan.session_id}")
    history: list[dict] = []
    headers = {"X-Session-ID": plan.session_id}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    for j, turn in enumerate(plan.turns):
        if turn.think_time:
            await asyncio.sleep(turn.think_time)
        new = [{"role": "user", "content": _text(rng, turn.input_tokens)}]
        messages = new if args.session_mode == "append" else history + new
        body = {"model": args.model_name, "messages": messages, "max_tokens": turn.output_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                "session_mode": args.session_mode}
        r = TurnResult(plan.session_id, j, ok=False, start=time.monotonic() - t0)
        if started is not None:
            started.append(r)
        start = time.monotonic()
        text = []
        try:
            async with http.post(args.url + "/v1/chat/completions", json=body, headers=headers) as resp:
                r.status = resp.status
                if resp.status != 200:
                    r.error = (await resp.text())[:200]
                    results.append(r)
                    return  # a conversation stops at its first failed turn
                async for line in resp.content:
                    if not line.startswith(b"data: {"):
                        continue
                    obj = json.loads(line[6:])
                    if "error" in obj:
                        r.error = json.dumps(obj["error"])[:200]
                        break
                    if obj.get("choices") and math.isnan(r.ttft):
                        # the server sends the first chunk at the first sampled token (for chat, the role
                        # chunk), whether or not that token decodes to any text
                        r.ttft = time.monotonic() - start
                    for c in obj.get("choices", []):
                        piece = c.get("delta", {}).get("content")
                        if piece:
                            text.append(piece)
                    u = obj.get("usage")
                    if u and not obj.get("choices"):
                        r.prompt_tokens = u["prompt_tokens"]
                        r.output_tokens = u["completion_tokens"]
                        r.cached_tokens = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            r.latency = time.monotonic() - start
            r.ok = not r.error and r.output_tokens > 0
            if math.isnan(r.ttft):
                r.ttft = r.latency
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            r.error = f"{type(e).__name__}: {e}"
        results.append(r)
        if not r.ok:
            return
        history += new + [{"role": "assistant", "content": "".join(text)}]


def scrape_context(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'^(pensieve_(?:context_tokens_total|prompt_tokens_total|generation_tokens_total|'
                     r'swap_bytes_total|evicted_tokens_total|swap_out_in_step_bytes_total|engine_steps_total))(\{[^}]*\})? ([0-9.e+-]+)$', line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def percentiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(x for x in xs if not math.isnan(x))
    if not xs:
        return {}

    def q(p):
        k = (len(xs) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {"mean": sum(xs) / len(xs), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": xs[-1]}


async def run_workload(args, plans: list[SessionPlan]) -> dict:
    before = scrape_context(args.url)
    results: list[TurnResult] = []
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
        t0 = time.monotonic()
        await asyncio.gather(*(run_session(http, args, p, t0, results) for p in plans))
        duration = time.monotonic() - t0
    after = scrape_context(args.url)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    ok = [r for r in results if r.ok]
    ctx = {src: delta.get(f'pensieve_context_tokens_total{{source="{src}"}}', 0.0)
           for src in ("gpu", "cpu", "recomputed", "new")}
    total_ctx = sum(ctx.values()) or 1.0
    return {
        "duration_s": duration,
        "turns_planned": sum(len(p.turns) for p in plans),
        "turns_ok": len(ok),
        "turns_failed": len(results) - len(ok),
        "failures_by_status": _count(str(r.status) for r in results if not r.ok),
        "errors_sample": [r.error for r in results if not r.ok][:5],
        "throughput_requests_per_s": len(ok) / duration,
        "throughput_output_tokens_per_s": sum(r.output_tokens for r in ok) / duration,
        "ttft_s": percentiles([r.ttft for r in ok]),
        "normalized_latency_s_per_token": percentiles([r.latency / r.output_tokens for r in ok]),
        "latency_s": percentiles([r.latency for r in ok]),
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "cached_tokens_reported": sum(r.cached_tokens for r in ok),
        "context_tokens_from_metrics": ctx,
        "context_fraction": {k: v / total_ctx for k, v in ctx.items()},
        "metrics_delta": delta,
        "turns": [asdict(r) for r in results] if args.keep_turns else None,
    }


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, cache_mode: str) -> tuple[subprocess.Popen, str, object]:
    port = _free_port()
    cmd = [sys.executable, "-m", "pensieve.engine", "serve", "--model", args.model, "--host", "127.0.0.1",
           "--port", str(port), "--cache-mode", cache_mode, "--served-model-name", args.model_name,
           *shlex.split(args.server_args)]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    log = open(os.path.join(args.log_dir, f"server-{cache_mode}.log"), "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server ({cache_mode}) exited with {proc.returncode}; see {log.name}")
        try:
            urllib.request.urlopen(url + "/ready", timeout=1)
            return proc, url, log
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server ({cache_mode}) not ready after {args.startup_timeout}s; see {log.name}")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def summarize(label: str, res: dict) -> str:
    t, n, c = res["ttft_s"], res["normalized_latency_s_per_token"], res["context_fraction"]
    lines = [f"[{label}] {res['turns_ok']}/{res['turns_planned']} turns ok ({res['turns_failed']} failed "
             f"{res['failures_by_status']}) in {res['duration_s']:.1f}s: {res['throughput_requests_per_s']:.2f} req/s, "
             f"{res['throughput_output_tokens_per_s']:.1f} output tok/s"]
    if t:
        lines.append(f"    TTFT s: p50 {t['p50']:.4f}  p90 {t['p90']:.4f}  p99 {t['p99']:.4f}  mean {t['mean']:.4f}")
        lines.append(f"    normalized latency s/token: p50 {n['p50']:.5f}  p90 {n['p90']:.5f}  p99 {n['p99']:.5f}")
    lines.append("    context sources: " + "  ".join(f"{k} {100 * v:.1f}%" for k, v in c.items()) +
                 f"  ({int(sum(res['context_tokens_from_metrics'].values()))} prompt tokens)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = harness.parser(__doc__, shape=False, workdir=False)
    tgt = p.add_mutually_exclusive_group(required=True)
    tgt.add_argument("--url", help="a running server (one configuration)")
    tgt.add_argument("--model", help="checkpoint folder: start a server per --cache-mode, back to back")
    p.add_argument("--cache-mode", default="pensieve", help="comma-separated, with --model (e.g. pensieve,gpu-only,none)")
    p.add_argument("--server-args", default="", help="extra serve flags, one string (with --model)")
    p.add_argument("--model-name", default="bench-model", help="served model name used in requests")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", choices=sorted(DATASETS), default="sharegpt")
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--rate", type=float, default=1.0, help="session arrivals per second (Poisson)")
    p.add_argument("--think-time", type=float, default=30.0, help="mean think time between turns, seconds")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiplies arrival gaps and think times")
    p.add_argument("--max-turns", type=int, default=32)
    p.add_argument("--min-turns", type=int, default=1)
    p.add_argument("--max-input-tokens", type=int, default=1024)
    p.add_argument("--max-output-tokens", type=int, default=1024)
    p.add_argument("--session-mode", choices=("append", "full"), default="append")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--log-dir", default=".")
    p.add_argument("--keep-turns", action="store_true", help="store every turn's result in the JSON")
    p.add_argument("--label", default="", help="free text stored in the JSON (what machine, what for)")
    args = p.parse_args(argv)

    plans = make_workload(args)
    mean_turns = sum(len(x.turns) for x in plans) / max(1, len(plans))
    print(f"workload: {args.sessions} sessions ({args.dataset}), {mean_turns:.2f} turns/session on average, "
          f"rate {args.rate}/s, think {args.think_time}s, time scale {args.time_scale}", file=sys.stderr)
    report = {"label": args.label,
              "workload": {k: getattr(args, k) for k in ("dataset", "sessions", "rate", "think_time", "time_scale",
                                                         "max_turns", "max_input_tokens", "max_output_tokens",
                                                         "session_mode", "seed")},
              "workload_stats": {"turns": sum(len(x.turns) for x in plans),
                                 "input_tokens": sum(t.input_tokens for x in plans for t in x.turns),
                                 "output_tokens": sum(t.output_tokens for x in plans for t in x.turns)},
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "configs": []}
    if args.url:
        args.url = args.url.rstrip("/")
        if args.model_name == "bench-model":
            models = json.loads(urllib.request.urlopen(urllib.request.Request(
                args.url + "/v1/models", headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}),
                timeout=10).read())
            args.model_name = models["data"][0]["id"]
        res = asyncio.run(run_workload(args, plans))
        print(summarize(args.url, res))
        report["configs"].append({"url": args.url, "results": res})
    else:
        for mode in [m.strip() for m in args.cache_mode.split(",") if m.strip()]:
            proc, url, _ = start_server(args, mode)
            args.url = url
            try:
                res = asyncio.run(run_workload(args, plans))
            finally:
                rc = stop_server(proc)
            print(summarize(mode, res))
            report["configs"].append({"cache_mode": mode, "server_args": args.server_args, "server_exit": rc,
                                      "results": res})
    harness.write_result(report, args.out, echo=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
