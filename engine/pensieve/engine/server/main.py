"""Starting, running and draining the server."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from aiohttp import web

from ..config import EngineConfig, dataclass_from_args
from .app import PensieveServer
from .config import ServerConfig

log = logging.getLogger("pensieve.server")


async def start_server(engine, config: ServerConfig) -> tuple[PensieveServer, web.AppRunner, int]:
    """Start listening; returns the server, its runner and the bound port."""
    server = PensieveServer(engine, config, asyncio.get_running_loop())
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its request.
    runner = web.AppRunner(server.make_app(), handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        server.stop_worker()
        raise
    port = runner.addresses[0][1] if runner.addresses else config.port
    return server, runner, port


async def serve(engine, config: ServerConfig) -> int:
    """Serve until SIGTERM or SIGINT, then drain: /ready turns false, new requests get 503,
    in-flight ones get ``drain_timeout`` seconds to finish. Returns the exit code (0)."""
    server, runner, port = await start_server(engine, config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.begin_drain)
    auth = f"{len(config.api_key)} API key(s)" if config.api_key else "no authentication"
    log.info("serving %r on http://%s:%d (%s, max %d waiting requests)", engine.served_model_name,
             config.host, port, auth, config.max_waiting_requests)
    try:
        await server.drained.wait()
    finally:
        await runner.cleanup()
        server.stop_worker()
    log.info("stopped")
    return 0


def run_server(args: argparse.Namespace) -> int:
    from ..engine import LLMEngine

    engine_config = dataclass_from_args(EngineConfig, args)
    server_config = dataclass_from_args(ServerConfig, args)
    engine = LLMEngine(engine_config)
    try:
        return asyncio.run(serve(engine, server_config))
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", server_config.host, server_config.port, e)
        return 1
