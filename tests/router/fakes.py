"""In-process fake engines and a router on loopback for the router's fast tests."""
from __future__ import annotations

import asyncio
import json
import socket

from aiohttp import web

from pensieve.router.config import RouterConfig
from pensieve.router.endpoints import EndpointSet
from pensieve.router.main import start_router


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeEngine:
    """Answers /v1/* with who it is; modes: ok | refuse (503) | slow; records what it saw."""

    def __init__(self, name: str, mode: str = "ok"):
        self.name = name
        self.mode = mode
        self.seen: list[dict] = []
        self.cancelled = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.address = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append({"path": request.path, "headers": dict(request.headers), "body": body})
        if self.mode == "refuse":
            return web.json_response({"error": {"message": "draining", "type": "unavailable", "param": None,
                                                "code": "draining"}}, status=503)
        if self.mode == "slow":
            await asyncio.sleep(30)
        doc = json.loads(body) if body else {}
        if doc.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            try:
                for i in range(doc.get("chunks", 3)):
                    await resp.write(f"data: {json.dumps({'i': i, 'engine': self.name})}\n\n".encode())
                    await asyncio.sleep(doc.get("gap", 0.0))
                await resp.write(b"data: [DONE]\n\n")
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return resp
        return web.json_response({"engine": self.name, "path": request.path,
                                  "session": request.headers.get("X-Session-ID")},
                                 headers={"X-Session-ID": request.headers.get("X-Session-ID", "")})

    async def ready(self, request: web.Request) -> web.Response:
        return web.json_response({}, status=503 if self.mode == "refuse" else 200)

    async def start(self) -> "FakeEngine":
        app = web.Application()
        app.router.add_route("*", "/v1/{tail:.*}", self.handle)
        app.router.add_get("/ready", self.ready)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.address = f"127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def make_router(addresses: list[str], **overrides):
    """A router whose endpoint set the test controls (no health probing)."""
    cfg = RouterConfig(port=0, static_endpoints=",".join(addresses), health_interval=0, **overrides)
    endpoints = EndpointSet(eject_seconds=cfg.eject_seconds)
    router, runner, port, stop = await start_router(cfg, endpoints)
    return router, f"http://127.0.0.1:{port}", stop
