"""Starting, running and draining the server."""
from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import signal

from aiohttp import web

from ..config import EngineConfig, dataclass_from_args
from ..heap import freeze_startup_heap
from . import memory
from .app import PensieveServer
from .config import ServerConfig
from .engine_process import EngineProcess, EngineStartError, start_engine_process
from .listener import CappedTCPSite
from .worker import EngineClient, EngineThread

log = logging.getLogger("pensieve.server")


async def start_server(engine, config: ServerConfig) -> tuple[PensieveServer, web.AppRunner, int]:
    """Start listening with ``engine`` (an LLMEngine of this process, run in a thread; or, from
    ``run_server``, an EngineProcess); returns the server, its runner and the bound port."""
    loop = asyncio.get_running_loop()
    if isinstance(engine, EngineProcess):
        client = engine.client
        client.loop = loop
    else:
        client = EngineClient(loop)
        engine = EngineThread(engine, client, config.max_waiting_requests)
    server = PensieveServer(engine.info, client, config, loop)
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its request.
    # keepalive_timeout: aiohttp closes a connection that has not delivered a complete request head
    # this long after opening or after its previous response, which is the header read timeout.
    # lingering_time: after an early answer (408, 413) the unread body is drained for at most 2 s
    # (aiohttp's 10 s would let a slow client keep its connection that much longer).
    runner = web.AppRunner(server.make_app(), handler_cancellation=True, access_log=None, shutdown_timeout=5.0,
                           keepalive_timeout=config.header_timeout, lingering_time=2.0)
    await runner.setup()
    site = CappedTCPSite(runner, config.host, config.port, config.max_connections)
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
    in-flight ones get ``drain_timeout`` seconds to finish. Returns the exit code: 0, or 1 when
    the engine died (its requests failed with 503 and the server stopped)."""
    server, runner, port = await start_server(engine, config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.begin_drain)
    auth = f"{len(config.api_key)} API key(s)" if config.api_key else "no authentication"
    log.info("serving %r on http://%s:%d (%s, engine %s, max %d waiting requests, max %d connections, "
             "header/body timeouts %gs/%gs)", server.info.served_model_name, config.host, port, auth,
             "process" if isinstance(server.worker.transport, EngineProcess) else "thread",
             config.max_waiting_requests, config.max_connections, config.header_timeout, config.body_timeout)
    try:
        await server.drained.wait()
    finally:
        await runner.cleanup()
        server.stop_worker()
    log.info("stopped")
    return server.exit_code


def _raise_fd_limit(max_connections: int) -> None:
    """Each connection is a file descriptor: lift the soft limit to fit ``max_connections`` plus a
    reserve for the model files and logs, as far as the hard limit allows."""
    want = max_connections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    new = want if hard == resource.RLIM_INFINITY else min(hard, want)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < want:
        log.warning("the open-file limit (%d) is below --max-connections %d plus a reserve of 256", new,
                    max_connections)


def run_server(args: argparse.Namespace) -> int:
    engine_config = dataclass_from_args(EngineConfig, args)
    server_config = dataclass_from_args(ServerConfig, args)
    _raise_fd_limit(server_config.max_connections)
    memory.limit_arenas()  # before any thread of ours starts allocating
    if server_config.engine_process == "on":
        try:
            engine = start_engine_process(engine_config, server_config.max_waiting_requests,
                                          EngineClient(None))
        except EngineStartError as e:
            log.error("%s", e)
            return 1
    else:
        from ..engine import LLMEngine

        engine = LLMEngine(engine_config)
    freeze_startup_heap()  # no full garbage collection walks start-up objects while serving (heap.py)
    try:
        return asyncio.run(serve(engine, server_config))
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", server_config.host, server_config.port, e)
        return 1
