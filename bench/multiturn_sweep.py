"""Multi-turn capacity sweep (issue 12): cache modes x session arrival rates, the paper's replay.

    python bench/multiturn_sweep.py run --variant sharegpt --modes pensieve --out parts/sharegpt-pensieve.json
    python bench/multiturn_sweep.py merge parts/*.json --out bench/results/h200/multiturn_sweep.json
    python bench/multiturn_sweep.py plot bench/results/h200/multiturn_sweep.json --out bench/results/h200
    python bench/multiturn_sweep.py run --smoke --out /tmp/sweep.json   # CPU plumbing check (tiny model)

A part is one variant, some modes and some rates; parts merge into one JSON
(points are keyed by variant, mode and rate), so a sweep splits into device
calls of a few minutes. Each mode gets one server; after each point the
sessions it made are deleted, so a point starts with empty tiers.

Workload per point (bench/multiturn.py's replay): sessions arrive as a Poisson
process at the point's rate for ``window`` seconds; turns, tokens and think
times follow the variant's dataset shape; the same seed per rate (``point_seed``) gives every
mode the same sessions. A point ends when its sessions are done or at
``window + drain`` seconds, whichever comes first; turns still running then
are cut (counted, not measured).

Tier sizing (one size for every rate, so that pressure grows with the rate).
A conversation holds its context H_j (tokens after turn j) during the think
time before turn j+1 and H_j + in_{j+1} + out_{j+1}/2 on average while turn
j+1 is generated (out * tpot seconds; tpot: an assumed seconds per output token
under load). Laying the planned sessions of the top rate r_ref on that timeline
gives live(t), the context held at time t, and active(t), the part held by
turns being generated; live and active below are their averages over the
measured part of a point, [window / 2, window + drain] (a point is too short
for the steady state of long think times, so the average is taken over what
the point actually runs):

    num_gpu_blocks = ceil(max(live / pressure, active, longest turn) / block_size)
    num_cpu_blocks = ceil(min(cpu_share * live, max_cpu_bytes / kv_bytes_per_token) / block_size)

pressure = 4 (live conversations need 4x the GPU tier), cpu_share = 0.9 (the
CPU tier holds most of them); active(r) is the part of live(r) held by turns
being generated (running requests' KV must be on the GPU: when it exceeds
live/pressure, ``bound_by`` says so and the pressure is lower), the longest
turn must fit. Throughput is the server's generated tokens (from
/metrics, cut turns included) over the point's duration.
The figures of each point are in the JSON; each mode gets ``capacity_at_slo``
(see ``capacity_at_slo``).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import multiturn as mt  # noqa: E402

MODES = ("pensieve", "gpu-only", "none")
SOURCES = ("gpu", "cpu", "recomputed", "new")


@dataclass(frozen=True)
class Variant:
    """One workload family of the sweep; rates in sessions per second."""

    dataset: str
    rates: tuple[float, ...]
    shape: str = "llama3-8b"
    window: float = 30.0          # seconds of arrivals per point
    drain: float = 26.0           # more seconds for the sessions to finish, then the point is cut
    think_time: float = 30.0      # mean, before time_scale
    time_scale: float = 0.7       # think time 21 s: most held context is idle
    min_turns: int = 1
    max_turns: int = 32
    max_input_tokens: int = 1024
    max_output_tokens: int = 1024
    max_model_len: int | None = None
    tpot: float = 0.03            # assumed seconds per output token under load (issue 12: ~30 ms on the H200)
    server_args: str = "--load-format dummy --max-num-seqs 256"
    sizing_rate: float | None = None  # the rate the tiers are sized at (None: the top rate)


# The H200 runs' settings (bench/gpu_session.sh): 40-45 s points with 6 s think times, so that
# most sessions play most of their turns within a point; ShareGPT sized at 12/s, below its top rate.
_CHAT = dict(window=15.0, drain=25.0, time_scale=0.2, tpot=0.01, sizing_rate=12.0)
VARIANTS = {
    "sharegpt": Variant("sharegpt", (2.0, 4.0, 6.0, 8.0, 12.0, 16.0), **_CHAT),
    "ultrachat": Variant("ultrachat", (2.0, 4.0, 6.0, 8.0, 12.0, 16.0), **_CHAT),
    "long": Variant("long", (0.25, 0.5, 0.75, 1.0, 1.5, 2.0), shape="llama3-8b-32k", window=15.0, drain=30.0,
                    time_scale=0.2, tpot=0.012, min_turns=4, max_turns=8, max_input_tokens=4096,
                    max_output_tokens=512, max_model_len=32768),
    # CPU plumbing check: the tiny random checkpoint, seconds per point
    "smoke": Variant("sharegpt", (2.0, 4.0, 8.0), shape="tiny", window=0.6, drain=6.0, think_time=0.2,
                     time_scale=1.0, max_turns=3, max_input_tokens=24, max_output_tokens=6, tpot=0.01,
                     server_args="--device cpu --max-num-seqs 16"),
}


# ----------------------------------------------------------------------------- sizing
def workload_args(v: Variant, rate: float, seed: int) -> argparse.Namespace:
    sessions = max(1, round(rate * v.window))
    # make_workload stretches arrival gaps by time_scale too: ask for rate * time_scale so that sessions
    # arrive at ``rate`` per second of wall time while think times are scaled
    return argparse.Namespace(dataset=v.dataset, sessions=sessions, rate=rate * v.time_scale, think_time=v.think_time,
                              time_scale=v.time_scale, min_turns=v.min_turns, max_turns=v.max_turns,
                              max_input_tokens=v.max_input_tokens, max_output_tokens=v.max_output_tokens, seed=seed)


def held_context(plan: mt.SessionPlan, tpot: float, t_lo: float, t_hi: float) -> tuple[float, float, int]:
    """(token-seconds held while generating, while thinking, within [t_lo, t_hi]; the longest turn's
    prompt + output) of one session. A turn's prompt is the whole conversation so far (what the cache
    must hold); while it generates it holds that plus half its output on average."""
    active = idle = 0.0
    history = longest = 0
    t = plan.arrival
    for j, turn in enumerate(plan.turns):
        if j:
            idle += history * _overlap(t, t + turn.think_time, t_lo, t_hi)
            t += turn.think_time
        gen = turn.output_tokens * tpot
        active += (history + turn.input_tokens + turn.output_tokens / 2) * _overlap(t, t + gen, t_lo, t_hi)
        t += gen
        history += turn.input_tokens + turn.output_tokens
        longest = max(longest, history)
    return active, idle, longest


def _overlap(a: float, b: float, lo: float, hi: float) -> float:
    return max(0.0, min(b, hi) - max(a, lo))


@dataclass
class Sizing:
    reference_rate: float
    live_tokens: float
    active_tokens: float
    longest_turn_tokens: int
    block_size: int
    pressure: float
    cpu_share: float
    num_gpu_blocks: int = 0
    num_cpu_blocks: int = 0
    bound_by: str = "pressure"
    effective_pressure: float = 0.0  # live_tokens over the GPU tier's tokens
    token_factor: float = 1.0


def measure_token_factor(model: str, plans: list[mt.SessionPlan], seed: int) -> float:
    """The server's prompt tokens per planned token: the longest planned conversation, with the load
    generator's words, through the checkpoint's chat template and tokenizer (replies: as many words
    as planned output tokens)."""
    import random

    from pensieve.engine.checkpoint import load_tokenizer

    tok = load_tokenizer(model)
    plan = max(plans, key=lambda p: sum(t.input_tokens + t.output_tokens for t in p.turns))
    rng = random.Random(f"{seed}-{plan.session_id}")
    messages: list[dict] = []
    for t in plan.turns:
        messages += [{"role": "user", "content": mt._text(rng, t.input_tokens)},
                     {"role": "assistant", "content": mt._text(rng, t.output_tokens)}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    n = len(tok(rendered, add_special_tokens=False)["input_ids"])
    return max(1.0, n / sum(t.input_tokens + t.output_tokens for t in plan.turns))


def tier_sizes(plans: list[mt.SessionPlan], rate: float, tpot: float, block_size: int, t_lo: float, t_hi: float,
               pressure: float = 4.0, cpu_share: float = 0.9, max_cpu_tokens: float = math.inf,
               token_factor: float = 1.0) -> Sizing:
    """Tier sizes from the expected live context of ``plans`` (made at ``rate``), averaged over
    [t_lo, t_hi] seconds of the point (the module docstring's formula). ``token_factor``: the server's
    tokens per planned token (chat template and tokenizer, see ``measure_token_factor``)."""
    if not plans or rate <= 0 or block_size <= 0 or pressure <= 0 or t_hi <= t_lo:
        raise ValueError("tier_sizes needs sessions, a positive rate, block size and pressure, and t_lo < t_hi")
    held = [tuple(token_factor * x for x in held_context(p, tpot, t_lo, t_hi)) for p in plans]
    active = sum(a for a, _, _ in held) / (t_hi - t_lo)
    live = active + sum(i for _, i, _ in held) / (t_hi - t_lo)
    longest = math.ceil(max(n for _, _, n in held))
    s = Sizing(rate, live, active, longest, block_size, pressure, cpu_share, token_factor=token_factor)
    floors = {"pressure": live / pressure, "active": active, "longest_turn": float(longest)}
    s.bound_by = max(floors, key=floors.get)
    s.num_gpu_blocks = math.ceil(floors[s.bound_by] / block_size)
    s.num_cpu_blocks = math.ceil(min(cpu_share * live, max_cpu_tokens) / block_size)
    s.effective_pressure = live / (s.num_gpu_blocks * block_size)
    return s


# ----------------------------------------------------------------------------- capacity
def capacity_at_slo(points: list[dict], latency_factor: float = 1.5, ttft_p90_limit_s: float = 1.0,
                    max_failed_fraction: float = 0.05) -> dict:
    """The highest rate at which the SLO holds: p90 normalized latency <= ``latency_factor`` x its
    value at the lowest rate, p90 TTFT <= ``ttft_p90_limit_s``, and at most ``max_failed_fraction`` of
    the turns that ended failed (400s aside: the workload's limits). The SLO must hold at that
    rate and every lower one (a noisy pass above a failure does not count). ``rate`` is that highest
    passing rate, 0.0 when the lowest rate fails; ``saturated`` is False when every rate passed (the
    capacity is at least ``rate``).

    points: dicts with ``rate``, ``normalized_latency_p90``, ``ttft_p90`` and ``failed_fraction``."""
    if not points:
        raise ValueError("capacity_at_slo needs at least one point")
    pts = sorted(points, key=lambda p: p["rate"])
    base = pts[0]["normalized_latency_p90"]
    limit = latency_factor * base if base is not None and not math.isnan(base) else math.nan
    best, reason = 0.0, None
    for p in pts:
        reason = _violation(p, limit, ttft_p90_limit_s, max_failed_fraction)
        if reason:
            break
        best = p["rate"]
    return {"rate": best, "saturated": reason is not None, "first_violation": reason,
            "baseline_normalized_latency_p90": base, "normalized_latency_p90_limit": limit,
            "ttft_p90_limit_s": ttft_p90_limit_s}


def _violation(p: dict, latency_limit: float, ttft_limit: float, max_failed: float) -> str | None:
    lat, ttft = p.get("normalized_latency_p90"), p.get("ttft_p90")
    if lat is None or ttft is None or math.isnan(lat) or math.isnan(ttft) or math.isnan(latency_limit):
        return f"rate {p['rate']}: no completed turns"
    if p.get("failed_fraction", 0.0) > max_failed:
        return f"rate {p['rate']}: {100 * p['failed_fraction']:.1f}% of the turns that ended failed"
    if lat > latency_limit:
        return f"rate {p['rate']}: normalized latency p90 {lat:.4f} > {latency_limit:.4f}"
    if ttft > ttft_limit:
        return f"rate {p['rate']}: TTFT p90 {ttft:.3f} s > {ttft_limit} s"
    return None


# ----------------------------------------------------------------------------- one point
async def run_point(url: str, model_name: str, v: Variant, rate: float, seed: int) -> dict:
    """Replay one point against a running server; delete its sessions afterwards."""
    wargs = workload_args(v, rate, seed)
    plans = mt.make_workload(wargs)
    cargs = argparse.Namespace(url=url, model_name=model_name, api_key=None, session_mode="append", seed=seed)
    before = mt.scrape_context(url)
    results: list[mt.TurnResult] = []
    started: list[mt.TurnResult] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=v.window + v.drain + 60),
                                     connector=aiohttp.TCPConnector(limit=0)) as http:
        t0 = time.monotonic()
        tasks = [asyncio.ensure_future(mt.run_session(http, cargs, p, t0, results, started)) for p in plans]
        done, pending = await asyncio.wait(tasks, timeout=v.window + v.drain)
        for t in pending:
            t.cancel()  # the client goes away: the server aborts the turn
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.monotonic() - t0
        await asyncio.sleep(0.2)  # let aborts settle before the counters are read
        after = mt.scrape_context(url)
        await _delete_sessions(http, url, [p.session_id for p in plans])
    return point_figures(rate, plans, results, len(started), duration, before, after)


async def _delete_sessions(http: aiohttp.ClientSession, url: str, ids: list[str]) -> None:
    async def one(sid):
        async with http.delete(f"{url}/v1/sessions/{sid}") as r:
            await r.read()  # 404 when the mode keeps no session: fine

    for i in range(0, len(ids), 64):
        await asyncio.gather(*(one(s) for s in ids[i:i + 64]))


def point_figures(rate: float, plans, results: list[mt.TurnResult], n_started: int, duration: float,
                  before: dict, after: dict) -> dict:
    """The figures of one point from the client's turn results and the /metrics counters' deltas.
    Turns: planned = ok + failed + cut (sent, still running at the end) + not sent (their time came
    after the end, or their session had failed). The SLO's failed fraction is over the turns that
    ended (ok or failed), 400s aside."""
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    ok = [r for r in results if r.ok]
    rejected = sum(1 for r in results if not r.ok and r.status == 400)
    planned = sum(len(p.turns) for p in plans)
    ctx = {s: delta.get(f'pensieve_context_tokens_total{{source="{s}"}}', 0.0) for s in SOURCES}
    total = sum(ctx.values())
    swap = {k.split("{", 1)[1].rstrip("}") if "{" in k else "all": v
            for k, v in delta.items() if k.startswith("pensieve_swap_bytes_total")}
    norm = mt.percentiles([r.latency / r.output_tokens for r in ok])
    ttft = mt.percentiles([r.ttft for r in ok])
    return {
        "rate": rate, "sessions": len(plans), "duration_s": duration, "turns_planned": planned,
        "turns_sent": n_started, "turns_ok": len(ok), "turns_failed": len(results) - len(ok),
        "turns_cut": n_started - len(results), "turns_not_sent": planned - n_started,
        # a 400 (e.g. context_length_exceeded) is the workload's limit, not the server's capacity
        "turns_rejected_400": rejected,
        # turns running at the end are cut whatever the load: not failures (overload shows in the latencies)
        "failed_fraction": (len(results) - len(ok) - rejected) / len(results) if results else 0.0,
        "output_tokens_per_s": delta.get("pensieve_generation_tokens_total", 0.0) / duration,
        "completed_output_tokens_per_s": sum(r.output_tokens for r in ok) / duration,
        "requests_per_s": len(ok) / duration,
        "normalized_latency_s_per_token": norm, "ttft_s": ttft,
        "normalized_latency_p90": norm.get("p90", math.nan), "ttft_p90": ttft.get("p90", math.nan),
        "context_tokens": ctx, "context_fraction": {s: (ctx[s] / total if total else 0.0) for s in SOURCES},
        "swap_bytes": swap, "evicted_tokens": delta.get("pensieve_evicted_tokens_total", 0.0),
        # what the copies cost the steps: in-step swap-outs, and decode steps run eagerly for copies
        "swap_out_in_step_bytes": delta.get("pensieve_swap_out_in_step_bytes_total", 0.0),
        "steps_by_path": {k.split('"')[1]: v for k, v in delta.items() if k.startswith("pensieve_engine_steps_total{")},
        "failures_by_status": mt._count(str(r.status) for r in results if not r.ok),
        "errors_sample": [r.error for r in results if not r.ok][:3],
    }


# ----------------------------------------------------------------------------- a part
def model_folder(v: Variant, workdir: str) -> str:
    if v.shape == "tiny":
        from pensieve.engine.tiny import make_tiny_checkpoint

        folder = Path(workdir) / "tiny-llama"
        if not (folder / "config.json").is_file():
            make_tiny_checkpoint(folder, "llama", seed=0)
        return str(folder)
    from shapes import shape_checkpoint

    return shape_checkpoint(v.shape, workdir)


def kv_bytes_per_token(v: Variant) -> int:
    """K and V of every layer in bf16 (the shapes' dtype on the GPU); the tiny checkpoint is small anyway."""
    if v.shape == "tiny":
        return 2 * 2 * 2 * 64 * 4
    from shapes import SHAPES

    c = SHAPES[v.shape]
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * (c["hidden_size"] // c["num_attention_heads"]) * 2


def server_args(v: Variant, mode: str, sizing: Sizing) -> str:
    args = f"{v.server_args} --block-size {sizing.block_size} --num-gpu-blocks {sizing.num_gpu_blocks}"
    if mode == "pensieve":
        args += f" --num-cpu-blocks {sizing.num_cpu_blocks}"
    if v.max_model_len:
        args += f" --max-model-len {v.max_model_len}"
    return args


def run_part(args) -> dict:
    """Run the part; the result file is rewritten after every point, so a part stopped by a time limit
    keeps the points it finished (merge takes them)."""
    v = VARIANTS["smoke" if args.smoke else args.variant]
    if args.shape:
        extra = "" if args.shape == "tiny" or "--load-format" in v.server_args else " --load-format dummy"
        v = dataclasses.replace(v, shape=args.shape, server_args=v.server_args + extra)
    # timing overrides, so that a sweep fits a device call; the JSON records the variant as run
    overrides = {k: getattr(args, k) for k in ("window", "drain", "time_scale", "tpot") if getattr(args, k) is not None}
    v = dataclasses.replace(v, **overrides)
    rates = tuple(args.rates) if args.rates else v.rates
    block_size = 16 if args.smoke else args.block_size
    ref = args.sizing_rate or v.sizing_rate or max(v.rates)  # every part of a sweep must size at the same rate
    model = model_folder(v, args.workdir)
    ref_plans = mt.make_workload(workload_args(v, ref, args.seed))
    factor = measure_token_factor(model, ref_plans, args.seed)
    sizing = tier_sizes(ref_plans, ref, v.tpot, block_size, v.window / 2, v.window + v.drain, args.pressure,
                        args.cpu_share, args.max_cpu_gib * 2**30 / kv_bytes_per_token(v), factor)
    print(f"sizing at {ref}/s: live {sizing.live_tokens:.0f} tokens (active {sizing.active_tokens:.0f}), "
          f"{sizing.num_gpu_blocks} GPU blocks ({sizing.bound_by}), {sizing.num_cpu_blocks} CPU blocks, "
          f"{factor:.2f} server tokens per planned token", flush=True)
    os.makedirs(args.log_dir, exist_ok=True)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    out: dict = {"variants": {args.variant if not args.smoke else "smoke": {
        "workload": asdict(v), "sizing": asdict(sizing), "modes": {}}}}
    entry = next(iter(out["variants"].values()))
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        # Each server keeps its conversations in its own store. The default (one SQLite file per
        # model under ~/.cache/pensieve) is shared by every server on the machine: two sweeps at
        # once (one per GPU) replaying the same sessions extended each other's records.
        store = Path(args.log_dir).resolve() / f"sessions-{mode}-{os.getpid()}.sqlite3"
        store.unlink(missing_ok=True)
        sargs = server_args(v, mode, sizing) + f" --session-store sqlite://{store}" + (
            f" {args.server_extra}" if args.server_extra else "")
        srv = argparse.Namespace(model=model, model_name="bench-model", api_key=None, server_args=sargs,
                                 log_dir=args.log_dir, startup_timeout=args.startup_timeout)
        t_start = time.monotonic()
        proc, url, _ = mt.start_server(srv, mode)
        points: list[dict] = []
        entry["modes"][mode] = {"server_args": sargs, "startup_s": time.monotonic() - t_start, "points": points}
        try:
            asyncio.run(_warm_up(url, v))
            for rate in rates:
                seed = point_seed(args.seed, rate)
                t0 = time.monotonic()
                pt = asyncio.run(run_point(url, "bench-model", v, rate, seed))
                pt["wall_s"], pt["seed"] = time.monotonic() - t0, seed
                points.append(pt)
                print(f"[{mode} {rate}/s] {_one_line(pt)}", flush=True)
                harness.write_result(out, args.out, echo=False)
        finally:
            rc = mt.stop_server(proc)
        entry["modes"][mode]["server_exit"] = rc
        harness.write_result(out, args.out, echo=False)
    return out


def point_seed(base: int, rate: float) -> int:
    """The workload seed of a point: a function of the rate alone, so that every mode, every part and
    every run that asks for a rate replays the same sessions (an A/B at one rate and a sweep's point
    at that rate included)."""
    return base + round(1000 * rate)


async def _warm_up(url: str, v: Variant) -> None:
    """Two short sessions first (kernel compilation, allocator): not measured."""
    w = Variant(v.dataset, (1.0,), window=2.0, drain=120.0, think_time=0.1, time_scale=1.0, max_turns=2,
                max_input_tokens=64, max_output_tokens=16)
    await run_point(url, "bench-model", w, 1.0, seed=999_999)


def _one_line(pt: dict) -> str:
    n, t, c = pt["normalized_latency_s_per_token"], pt["ttft_s"], pt["context_fraction"]
    lat = f"norm p50/p90/p99 {n['p50']:.4f}/{n['p90']:.4f}/{n['p99']:.4f} s/tok, " if n else ""
    ttf = f"TTFT p50/p90/p99 {t['p50']:.3f}/{t['p90']:.3f}/{t['p99']:.3f} s, " if t else ""
    return (f"{pt['turns_ok']}/{pt['turns_sent']} turns sent ok ({pt['turns_failed']} failed, {pt['turns_cut']} cut; "
            f"{pt['turns_not_sent']} of {pt['turns_planned']} planned not sent) in "
            f"{pt['duration_s']:.1f}s, {pt['output_tokens_per_s']:.0f} tok/s, {lat}{ttf}context "
            + " ".join(f"{s} {100 * c[s]:.0f}%" for s in SOURCES))


# ----------------------------------------------------------------------------- merge
def merge(parts: list[dict]) -> dict:
    """Parts into one result: points keyed by (variant, mode, rate), the later part winning; then each
    mode's capacity and each variant's capacity ratios against pensieve."""
    out: dict = {"parts": [], "variants": {}}
    for part in parts:
        out["parts"].append({"command": part.get("command"), "machine": part.get("machine")})
        for name, var in part.get("variants", {}).items():
            dst = out["variants"].setdefault(name, {"workload": var["workload"], "sizing": var["sizing"], "modes": {}})
            if dst["sizing"] != var["sizing"]:
                raise SystemExit(f"variant {name}: parts sized differently ({dst['sizing']} vs {var['sizing']})")
            for mode, m in var["modes"].items():
                d = dst["modes"].setdefault(mode, {"server_args": m["server_args"], "points": []})
                by_rate = {p["rate"]: p for p in d["points"]}
                by_rate.update({p["rate"]: p for p in m["points"]})
                d["points"] = [by_rate[r] for r in sorted(by_rate)]
    for var in out["variants"].values():
        for m in var["modes"].values():
            m["capacity_at_slo"] = capacity_at_slo(m["points"])
            # the SLO is 1.5x the low-load latency; looser factors show where the modes part
            # when batch growth alone already costs 1.5x (a decode step of 64 sequences is ~1.5x one of 1)
            m["capacity_by_latency_factor"] = {str(f): capacity_at_slo(m["points"], latency_factor=f)["rate"]
                                               for f in LOOSER_FACTORS}
        caps = {mode: m["capacity_at_slo"]["rate"] for mode, m in var["modes"].items()}
        if "pensieve" in caps:
            var["capacity_ratio_pensieve_over"] = _ratios(caps)
            var["capacity_ratio_pensieve_over_by_latency_factor"] = {
                str(f): _ratios({mode: m["capacity_by_latency_factor"][str(f)] for mode, m in var["modes"].items()})
                for f in LOOSER_FACTORS}
    return out


LOOSER_FACTORS = (1.5, 2.0, 3.0)


def _ratios(caps: dict) -> dict:
    return {mode: (caps["pensieve"] / c if c else None) for mode, c in caps.items() if mode != "pensieve"}


def table(result: dict) -> str:
    """Capacities as Markdown (the results README quotes it)."""
    lines = ["| variant | mode | capacity at SLO (sessions/s) | first violation | CPU-tier share at the top rate "
             "| capacity at 2x / 3x low-load latency |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, var in result["variants"].items():
        for mode, m in var["modes"].items():
            c = m["capacity_at_slo"]
            top = m["points"][-1]["context_fraction"]["cpu"] if m["points"] else 0.0
            looser = m.get("capacity_by_latency_factor", {})
            lines.append(f"| {name} | {mode} | {'>= ' if not c['saturated'] else ''}{c['rate']:g} | "
                         f"{c['first_violation'] or '-'} | {100 * top:.1f}% | "
                         f"{_g(looser.get('2.0'))} / {_g(looser.get('3.0'))} |")
    return "\n".join(lines)


def _g(x) -> str:
    return "-" if x is None else f"{x:g}"


# ----------------------------------------------------------------------------- plots
def plot(result: dict, out_dir: str) -> list[str]:
    """Per variant: normalized latency against throughput, TTFT p90 against rate, context sources per
    rate (stacked, one panel per mode). Returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, var in result["variants"].items():
        modes = var["modes"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for mode, m in modes.items():
            pts = m["points"]
            ax.plot([p["output_tokens_per_s"] for p in pts], [1e3 * p["normalized_latency_p90"] for p in pts],
                    "o-", label=f"{mode} p90")
            ax.plot([p["output_tokens_per_s"] for p in pts],
                    [1e3 * p["normalized_latency_s_per_token"].get("p50", math.nan) for p in pts],
                    ".--", color=ax.lines[-1].get_color(), alpha=0.6, label=f"{mode} p50")
        ax.set(xlabel="throughput (output tokens/s)", ylabel="normalized latency (ms/token)",
               title=f"{name}: latency against throughput")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(_save(fig, out_dir, f"{name}_latency_throughput.png"))

        fig, ax = plt.subplots(figsize=(6, 4))
        for mode, m in modes.items():
            pts = m["points"]
            ax.plot([p["rate"] for p in pts], [p["ttft_p90"] for p in pts], "o-", label=mode)
        ax.axhline(1.0, color="grey", ls=":", label="SLO 1 s")
        ax.set(xlabel="session arrival rate (1/s)", ylabel="TTFT p90 (s, at the client)", title=f"{name}: TTFT p90")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(_save(fig, out_dir, f"{name}_ttft_p90.png"))

        fig, axes = plt.subplots(1, len(modes), figsize=(4 * len(modes), 3.6), sharey=True, squeeze=False)
        for ax, (mode, m) in zip(axes[0], modes.items()):
            pts = m["points"]
            xs = [str(p["rate"]) for p in pts]
            bottom = [0.0] * len(pts)
            for src in SOURCES:
                ys = [100 * p["context_fraction"][src] for p in pts]
                ax.bar(xs, ys, bottom=bottom, label=src)
                bottom = [b + y for b, y in zip(bottom, ys)]
            ax.set(title=mode, xlabel="rate (1/s)")
        axes[0][0].set_ylabel("prompt tokens (%)")
        axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.suptitle(f"{name}: where the context came from")
        paths.append(_save(fig, out_dir, f"{name}_context_sources.png"))
    return paths


def _save(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = harness.parser(__doc__, shape=False, out_required=True)
    ap.add_argument("part", choices=["run", "merge", "plot", "table"])
    ap.add_argument("inputs", nargs="*", help="merge: parts' JSON files; plot/table: the merged JSON")
    ap.add_argument("--variant", choices=[k for k in VARIANTS if k != "smoke"], default="sharegpt")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated cache modes")
    ap.add_argument("--rates", type=float, nargs="*", help="a subset of the variant's rates (default: all)")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--pressure", type=float, default=4.0, help="live context over the GPU tier at the top rate")
    ap.add_argument("--cpu-share", type=float, default=0.9, help="CPU tier over live context at the top rate")
    ap.add_argument("--max-cpu-gib", type=float, default=64.0, help="cap of the CPU tier (host memory)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=float, help="override the variant's seconds of arrivals per point")
    ap.add_argument("--drain", type=float, help="override the variant's seconds after the window")
    ap.add_argument("--time-scale", type=float, help="override the variant's think-time scale")
    ap.add_argument("--sizing-rate", type=float, help="size the tiers for this rate (default: the variant's)")
    ap.add_argument("--server-extra", default="", help="more `serve` flags for every mode (e.g. --swap-impl dma)")
    ap.add_argument("--tpot", type=float, help="override the assumed seconds per output token (sizing)")
    ap.add_argument("--log-dir", default="/tmp/pensieve-sweep-logs")
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    ap.add_argument("--smoke", action="store_true", help="the tiny checkpoint on the CPU, seconds per point")
    ap.add_argument("--shape", default=None, help="override the variant's model shape (bench/shapes.py, or 'tiny')")
    args = ap.parse_args(argv)
    if args.part == "run":
        harness.write_result(run_part(args), args.out, echo=False)
    elif args.part == "merge":
        parts = [json.loads(Path(p).read_text()) for p in args.inputs]
        harness.write_result(merge(parts), args.out, echo=False)
    elif args.part == "plot":
        for path in plot(json.loads(Path(args.inputs[0]).read_text()), args.out):
            print(path)
    else:
        Path(args.out).write_text(table(json.loads(Path(args.inputs[0]).read_text())) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
