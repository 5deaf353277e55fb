"""Helpers for the engine tests (imported by name: tests/engine is on sys.path under pytest)."""
from __future__ import annotations

import torch

FAMILIES = ("llama", "qwen2", "mistral", "opt")


def prefill_logits(engine, ids: list[int]) -> torch.Tensor:
    """Every position's float32 logits of ``ids``, from one prefill step through the runner
    (the request is aborted afterwards, leaving the engine as it was)."""
    from pensieve.engine import SamplingParams
    from pensieve.engine.scheduler import ScheduledChunk, SchedulerOutput

    rid = engine.add_request(ids, SamplingParams(max_tokens=1))
    req = engine.requests[rid]
    assert engine.cache.grow(req, len(ids))
    logits = engine.runner.execute(SchedulerOutput([ScheduledChunk(req, 0, len(ids))]), all_logits=True)
    engine.abort(rid)
    return logits


def hf_greedy(model_dir: str, token_ids: list[int], n: int) -> list[int]:
    """Greedy continuation by transformers, recomputing the full sequence each step (the oracle)."""
    model = _hf_model(model_dir)
    ids = list(token_ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            tok = int(torch.argmax(logits))
            out.append(tok)
            ids.append(tok)
    return out


_HF_CACHE: dict = {}


def _hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    if model_dir not in _HF_CACHE:
        _HF_CACHE[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return _HF_CACHE[model_dir]


def run_to_end(engine, request_ids=None) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return out


def assert_greedy_until_near_tie(hf_model, prompt: list[int], tokens: list[int], near_tie: float) -> None:
    """``tokens`` (greedy, from a half-precision engine) must equal ``hf_model``'s greedy
    continuation of ``prompt``, recomputed each step, until the first step whose top two
    logits are closer than ``near_tie``: there rounding may pick either."""
    device = next(hf_model.parameters()).device
    ids = list(prompt)
    with torch.no_grad():
        for i, tok in enumerate(tokens):
            logits = hf_model(torch.tensor([ids], device=device)).logits[0, -1].float()
            if tok != int(logits.argmax()):
                top2 = torch.topk(logits, 2).values
                assert float(top2[0] - top2[1]) < near_tie, f"token {i} differs without a near-tie"
                return
            ids.append(tok)
