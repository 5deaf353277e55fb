"""pensieve_requests_total{status="error"} counts requests that fail inside the engine,
streamed (the 200 is already sent: the stream ends with an error event) and not streamed
(HTTP 500) alike. A real server and engine in this process; the fault is injected into the
engine's step, the only thing replaced."""
from __future__ import annotations

import asyncio
import json

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server_helpers import MODEL


def requests_total(text: str) -> dict[str, float]:
    return {s.labels["status"]: s.value for fam in text_string_to_metric_families(text)
            if fam.name == "pensieve_requests" for s in fam.samples if s.name == "pensieve_requests_total"}


async def scenario(ckpt):
    from pensieve.engine import EngineConfig, LLMEngine
    from pensieve.engine.server import ServerConfig, start_server

    engine = LLMEngine(EngineConfig(model=str(ckpt), served_model_name=MODEL, device="cpu", num_gpu_blocks=64))
    real_step = engine.step
    fail = {"on": False}

    def step():
        if fail["on"]:
            raise RuntimeError("injected fault")
        return real_step()

    engine.step = step
    server, runner, port = await start_server(engine, ServerConfig(host="127.0.0.1", port=0))
    url = f"http://127.0.0.1:{port}"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            ok = await c.post("/v1/chat/completions", json=body)
            assert ok.status_code == 200
            before = requests_total((await c.get("/metrics")).text)
            fail["on"] = True
            plain = await c.post("/v1/chat/completions", json=body)
            streamed = await c.post("/v1/chat/completions", json={**body, "stream": True})
            after = requests_total((await c.get("/metrics")).text)
    finally:
        await runner.cleanup()
        server.stop_worker()
    return before, plain, streamed, after


def test_failures_of_streamed_and_plain_requests_are_counted(tiny_ckpt):
    before, plain, streamed, after = asyncio.run(scenario(tiny_ckpt))
    assert plain.status_code == 500 and plain.json()["error"]["code"] == "internal_error"
    assert streamed.status_code == 200
    events = [line[len("data: "):] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[-2])["error"]["code"] == "internal_error" and events[-1] == "[DONE]"
    assert before.get("error", 0) == 0 and after["error"] == 2, after
    assert after["stop"] + after["length"] == before["stop"] + before["length"]
    assert "500" not in after  # a failure is "error", whichever way it surfaced
