"""Cost of recomputing one chunk as a function of its context position.

Retention value V = Cost(position) / idle time: a chunk deep in a long
context is expensive to recompute (its attention reads everything before it),
a leading chunk is cheap. The cost comes from a start-up profile (time of one
chunk's forward pass at power-of-two context lengths, interpolated linearly),
cached on disk per model and device; without a profile an analytic FLOP count
stands in (same shape: affine in the position).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("pensieve.engine")


@dataclass
class CostModel:
    positions: list[int]   # ascending context positions
    costs: list[float]     # seconds (profiled) or FLOPs (analytic) for one chunk there
    source: str = "analytic"

    def chunk_cost(self, position: int) -> float:
        xs, ys = self.positions, self.costs
        if position <= xs[0]:
            return ys[0]
        i = bisect.bisect_right(xs, position)
        if i >= len(xs):  # extrapolate with the last slope
            x0, x1, y0, y1 = xs[-2], xs[-1], ys[-2], ys[-1]
        else:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (position - x0) / (x1 - x0)

    @classmethod
    def analytic(cls, model_cfg: dict, block_size: int, max_len: int) -> "CostModel":
        """FLOPs of one chunk: its linear layers plus attention over the context before it."""
        hidden = model_cfg["hidden_size"]
        layers = model_cfg["num_hidden_layers"]
        heads = model_cfg["num_attention_heads"]
        head_dim = model_cfg.get("head_dim") or hidden // heads
        inter = model_cfg.get("intermediate_size") or model_cfg.get("ffn_dim") or 4 * hidden
        kv_heads = model_cfg.get("num_key_value_heads") or heads
        per_token_linear = 2 * layers * (hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
                                         + 3 * hidden * inter)
        per_token_per_ctx = 4 * layers * heads * head_dim
        positions = _powers_of_two(max_len)
        costs = [block_size * (per_token_linear + per_token_per_ctx * (p + block_size / 2)) for p in positions]
        return cls(positions, costs, "analytic")


def _powers_of_two(max_len: int) -> list[int]:
    out, p = [0], 32
    while p < max_len:
        out.append(p)
        p *= 2
    out.append(max(max_len, 1))
    return sorted(set(out))


def profile_cache_path(model_cfg: dict, device_name: str, dtype: str, block_size: int) -> Path:
    key = json.dumps({k: model_cfg.get(k) for k in sorted(model_cfg) if k != "architecture"}, sort_keys=True, default=str)
    digest = hashlib.sha256(f"{key}|{device_name}|{dtype}|{block_size}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("PENSIEVE_CACHE", Path.home() / ".cache" / "pensieve"))
    return root / "cost-profiles" / f"{digest}.json"


def load_or_profile(path: Path, measure, max_len: int) -> CostModel:
    """Read a cached profile, or call ``measure(position) -> seconds`` at power-of-two positions and cache it."""
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            return CostModel(data["positions"], data["costs"], "profile(cached)")
        except (json.JSONDecodeError, KeyError):
            log.warning("%s: unreadable cost profile, measuring again", path)
    start = time.perf_counter()
    positions = _powers_of_two(max_len)
    costs = [measure(p) for p in positions]
    # Timing noise must not make a later chunk look cheaper than an earlier one.
    for i in range(1, len(costs)):
        costs[i] = max(costs[i], costs[i - 1])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"positions": positions, "costs": costs}))
    log.info("chunk cost profile: %d points in %.1fs, cached at %s", len(positions), time.perf_counter() - start, path)
    return CostModel(positions, costs, "profile")
