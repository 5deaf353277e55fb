"""Overload (a burst far over capacity: 429 for the excess, right answers for
the rest) and client disconnects (the request is aborted and its blocks freed)."""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import httpx

from server_helpers import MODEL

PROMPT = [{"role": "user", "content": "explain the retention value of a chunk"}]


def _req(max_tokens: int, **kw) -> dict:
    return {"model": MODEL, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **kw}


def test_burst_over_capacity_gets_429_and_correct_answers(server):
    base = server.wait_idle()
    ref = httpx.post(server.url + "/v1/chat/completions", headers=server.headers(), json=_req(48), timeout=60).json()
    expected = ref["choices"][0]["message"]["content"]
    burst = 40  # capacity: 2 running + 4 waiting

    async def one(session: aiohttp.ClientSession):
        async with session.post(server.url + "/v1/chat/completions", json=_req(48), headers=server.headers()) as r:
            return r.status, dict(r.headers), await r.json()

    async def run():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120),
                                         connector=aiohttp.TCPConnector(limit=0)) as s:
            return await asyncio.gather(*(one(s) for _ in range(burst)))

    results = asyncio.run(run())
    ok = [b for st, _, b in results if st == 200]
    rejected = [(h, b) for st, h, b in results if st == 429]
    assert len(ok) + len(rejected) == burst, [st for st, _, _ in results]
    assert len(rejected) > 0 and len(ok) >= 2
    for h, b in rejected:
        assert int(h["Retry-After"]) >= 1
        assert b["error"]["code"] == "queue_full" and b["error"]["type"] == "rate_limit_error"
    for b in ok:  # batched with others, greedy answers stay the same
        assert b["choices"][0]["message"]["content"] == expected
        assert b["usage"]["completion_tokens"] == 48
    after = server.wait_idle()
    assert after["gpu_blocks_used"] == base["gpu_blocks_used"] and after["request_blocks"] == 0
    assert httpx.get(server.url + "/ready", timeout=5).status_code == 200


def test_disconnect_mid_stream_aborts_and_frees_blocks(server):
    base = server.wait_idle()
    aborted_before = base["requests_finished"].get("abort", 0)
    gen_before = base["generation_tokens"]
    max_tokens = 900

    async def run():
        async with aiohttp.ClientSession() as s:
            r = await s.post(server.url + "/v1/chat/completions", headers=server.headers(),
                             json=_req(max_tokens, stream=True))
            assert r.status == 200
            seen = 0
            async for line in r.content:
                if line.startswith(b"data: {"):
                    seen += 1
                    if seen == 4:
                        break
            # the request is running and holds blocks now
            mid = server.state()
            assert mid["request_blocks"] > 0 and mid["num_unfinished"] == 1
            r.close()  # drop the connection mid-stream

    asyncio.run(run())
    s = _wait_aborted(server, aborted_before)
    assert s["request_blocks"] == 0
    assert s["gpu_blocks_used"] == base["gpu_blocks_used"]
    assert s["generation_tokens"] - gen_before < max_tokens  # it stopped early, it did not run to the end


def _wait_aborted(server, aborted_before: int) -> dict:
    """The server's state once the request is gone and counted as aborted."""
    deadline = time.monotonic() + 20
    while True:
        s = server.state()
        if s["num_unfinished"] == 0 and s["requests_finished"].get("abort", 0) > aborted_before:
            return s
        assert time.monotonic() < deadline, f"request not aborted: {s}"
        time.sleep(0.05)


def test_disconnect_while_waiting_non_streamed(server):
    """A non-streamed request whose client gives up is aborted too."""
    base = server.wait_idle()
    aborted_before = base["requests_finished"].get("abort", 0)

    async def run():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as s:
            try:
                async with s.post(server.url + "/v1/chat/completions", headers=server.headers(), json=_req(900)) as r:
                    await r.read()
            except asyncio.TimeoutError:
                return
            raise AssertionError("900 tokens finished within 0.3 s")

    asyncio.run(run())
    s = _wait_aborted(server, aborted_before)
    assert s["gpu_blocks_used"] == base["gpu_blocks_used"]
