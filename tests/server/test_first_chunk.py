"""The first streamed chunk marks the first sampled token, whatever its text.

A checkpoint whose model vocabulary is larger than its tokenizer's, with an LM
head that never picks a token the tokenizer knows, generates tokens that all
decode to empty text (what the benchmark shape checkpoints do with most ids).
A client timing its first chunk must still get the TTFT: completions send a
chunk with empty text at the first token, and chat sends its role chunk then,
not before (a queued request gets no chunk while it waits).
"""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from server_helpers import MODEL, start_server, stop_server

MODEL_VOCAB = 2048


@pytest.fixture(scope="module")
def silent_server(tmp_path_factory):
    from pensieve.engine.tiny import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "silent", "llama", seed=0,
                                tie_word_embeddings=False)
    n_text = Tokenizer.from_file(str(ckpt / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    assert n_text < MODEL_VOCAB // 2
    gen = torch.Generator().manual_seed(1)
    weights = load_file(str(ckpt / "model.safetensors"))
    emb = weights["model.embed_tokens.weight"]
    extra = torch.randn((MODEL_VOCAB - emb.shape[0], emb.shape[1]), generator=gen, dtype=emb.dtype)
    weights["model.embed_tokens.weight"] = torch.cat([emb, extra])
    # Every id the tokenizer knows scores 0; some id it does not know always scores higher.
    head = torch.randn((MODEL_VOCAB, emb.shape[1]), generator=gen, dtype=emb.dtype)
    head[:n_text] = 0.0
    weights["lm_head.weight"] = head
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["vocab_size"] = MODEL_VOCAB
    (ckpt / "config.json").write_text(json.dumps(cfg))
    log = tmp_path_factory.mktemp("logs") / "silent.log"
    srv = start_server(ckpt, log, "--max-num-seqs", "1", "--num-gpu-blocks", "128")
    yield srv
    stop_server(srv)


async def _events(resp: aiohttp.ClientResponse):
    async for line in resp.content:
        if line.startswith(b"data: {"):
            yield time.monotonic(), json.loads(line[6:])


def test_completion_first_chunk_at_first_token(silent_server):
    async def run():
        async with aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": "hello there", "max_tokens": 600, "temperature": 0,
                    "ignore_eos": True, "stream": True}
            async with s.post(silent_server.url + "/v1/completions", json=body) as r:
                assert r.status == 200
                chunks = [obj async for _, obj in _events(r)]
        return chunks

    chunks = asyncio.run(run())
    texts = [c["choices"][0]["text"] for c in chunks if c.get("choices")]
    assert "".join(texts) == "", "the checkpoint should generate only tokens that decode to nothing"
    first = chunks[0]["choices"][0]
    # Before the fix the only chunk was the last one (finish_reason "length"), sent after 600 tokens.
    assert first["finish_reason"] is None and first["text"] == ""
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_role_chunk_waits_for_first_token(silent_server):
    """With one running sequence, a second chat request gets its first chunk only once the first
    request is done: its first token cannot be sampled earlier."""
    state0 = silent_server.state()
    done0 = state0["requests_finished"].get("length", 0)

    async def run():
        async with aiohttp.ClientSession() as s:
            a = await s.post(silent_server.url + "/v1/completions", json={
                "model": MODEL, "prompt": "first", "max_tokens": 900, "temperature": 0, "ignore_eos": True,
                "stream": True})
            assert a.status == 200
            drain = asyncio.ensure_future(_drain(_events(a)))
            while (await asyncio.to_thread(silent_server.state))["generation_tokens"] <= state0["generation_tokens"]:
                await asyncio.sleep(0.01)  # until A runs (it holds the only sequence slot)
            t0 = time.monotonic()
            async with s.post(silent_server.url + "/v1/chat/completions", json={
                    "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                    "temperature": 0, "ignore_eos": True, "stream": True}) as b:
                assert b.status == 200
                t_first, first = await _events(b).__anext__()
                mid = await asyncio.to_thread(silent_server.state)
            await drain
            a.close()
        return first, mid, t_first - t0

    first, mid, ttfc = asyncio.run(run())
    assert first["choices"][0]["delta"].get("role") == "assistant"
    # A finished (and the snapshot after its last step was taken) before B's first token came out.
    assert mid["requests_finished"].get("length", 0) >= done0 + 1, (mid, ttfc)


async def _drain(events) -> None:
    async for _ in events:
        pass
