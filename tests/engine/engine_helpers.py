"""Helpers for the engine tests (imported by name: tests/engine is on sys.path under pytest)."""
from __future__ import annotations

import torch

FAMILIES = ("llama", "qwen2", "mistral", "opt")


def hf_greedy(model_dir: str, token_ids: list[int], n: int) -> list[int]:
    """Greedy continuation by transformers, recomputing the full sequence each step (the oracle)."""
    from transformers import AutoModelForCausalLM

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
