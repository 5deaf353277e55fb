"""The default process the stand-in kubelet runs for a pod: a tiny aiohttp app that
answers /health, /ready and /metrics with the engine contract's metric names
(and a chat completion stub), so the cluster tier runs without the engine or torch.

    python standin_app.py --role engine|router --host 0.0.0.0 --port 8000

On SIGTERM it turns /ready false and exits after PENSIEVE_STANDIN_DRAIN_SECONDS
(default 0.5), like the engine's drain. GET /debug/env returns its PENSIEVE_* env.
With PENSIEVE_API_KEY (comma-separated keys) set, /v1/chat/completions needs one as a bearer
token, as the engine does. `pensieve_sessions_active` is PENSIEVE_STANDIN_SESSIONS_ACTIVE (default 0), changed at run
time with POST /debug/sessions {"active": N}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket

from aiohttp import web

METRICS = """# TYPE pensieve_num_requests_running gauge
pensieve_num_requests_running 0
# TYPE pensieve_num_requests_waiting gauge
pensieve_num_requests_waiting 0
# TYPE pensieve_num_requests_swapped gauge
pensieve_num_requests_swapped 0
# TYPE pensieve_gpu_cache_usage_ratio gauge
pensieve_gpu_cache_usage_ratio 0
# TYPE pensieve_cpu_cache_usage_ratio gauge
pensieve_cpu_cache_usage_ratio 0
# TYPE pensieve_gpu_cache_blocks gauge
pensieve_gpu_cache_blocks 128
# TYPE pensieve_cpu_cache_blocks gauge
pensieve_cpu_cache_blocks {cpu_blocks}
# TYPE pensieve_sessions_active gauge
pensieve_sessions_active {sessions}
# TYPE pensieve_prompt_tokens_total counter
pensieve_prompt_tokens_total {prompt}
# TYPE pensieve_generation_tokens_total counter
pensieve_generation_tokens_total {generated}
# TYPE pensieve_requests_total counter
pensieve_requests_total{{status="ok"}} {requests}
# TYPE pensieve_cache_config_info gauge
pensieve_cache_config_info{{model="{model}",block_size="{block}",gpu_blocks="128",cpu_blocks="{cpu_blocks}",cache_mode="{mode}"}} 1
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", default="engine")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    state = {"ready": True, "requests": 0, "prompt": 0, "generated": 0,
             "sessions": int(os.environ.get("PENSIEVE_STANDIN_SESSIONS_ACTIVE", "0"))}
    env = {k: v for k, v in os.environ.items() if k.startswith("PENSIEVE_") or k in ("POD_NAME", "POD_NAMESPACE")}

    async def health(_):
        return web.json_response({"status": "ok", "role": args.role})

    async def ready(_):
        return web.json_response({"ready": state["ready"]}, status=200 if state["ready"] else 503)

    async def metrics(_):
        block = int(env.get("PENSIEVE_BLOCK_SIZE", "32"))
        cpu_bytes = int(env.get("PENSIEVE_CPU_CACHE_BYTES", "0") or 0)
        text = METRICS.format(cpu_blocks=cpu_bytes // (block * 131072) if cpu_bytes else 0, prompt=state["prompt"],
                              generated=state["generated"], requests=state["requests"], block=block, sessions=state["sessions"],
                              model=env.get("PENSIEVE_SERVED_MODEL_NAME", "standin"), mode=env.get("PENSIEVE_CACHE_MODE", "pensieve"))
        return web.Response(text=text, content_type="text/plain")

    async def debug_env(_):
        return web.json_response({"env": env, "hostname": socket.gethostname(), "role": args.role, "pid": os.getpid()})

    async def set_sessions(request):
        state["sessions"] = int((await request.json())["active"])
        return web.json_response({"active": state["sessions"]})

    keys = {k.strip() for k in env.get("PENSIEVE_API_KEY", "").split(",") if k.strip()}

    async def chat(request):
        # The engine's contract: with PENSIEVE_API_KEY set, /v1/* needs one of its keys as a bearer token.
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if keys and (scheme.lower() != "bearer" or token.strip() not in keys):
            return web.json_response({"error": {"message": "incorrect API key", "type": "authentication_error",
                                                "param": None, "code": "invalid_api_key"}}, status=401)
        body = await request.json()
        state["requests"] += 1
        state["prompt"] += sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        state["generated"] += 1
        sid = request.headers.get("X-Session-ID", body.get("session_id", ""))
        return web.json_response({
            "id": "chatcmpl-standin", "object": "chat.completion", "model": body.get("model", ""),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"standin {env.get('POD_NAME', '')}"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2,
                      "prompt_tokens_details": {"cached_tokens": 0}}}, headers={"X-Session-ID": sid} if sid else None)

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/debug/env", debug_env)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/debug/sessions", set_sessions)

    async def run() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_term() -> None:
            state["ready"] = False  # drain: out of the endpoints first, then exit
            loop.call_later(float(os.environ.get("PENSIEVE_STANDIN_DRAIN_SECONDS", "0.5")), stop.set)

        loop.add_signal_handler(signal.SIGTERM, on_term)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(run())


if __name__ == "__main__":
    main()
