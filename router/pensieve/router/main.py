"""Starting the router: discovery (static list or EndpointSlice watch) feeding the
endpoint set, and the aiohttp server. SIGTERM/SIGINT: /ready turns false at once
(the Service stops sending new connections), then in-flight streams get up to
``drain_seconds`` to finish."""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import Sequence

from aiohttp import web

from .app import Router
from .config import RouterConfig, parse_args
from .endpoints import EndpointSet
from .static import StaticDiscovery

log = logging.getLogger("pensieve.router")


async def start_router(config: RouterConfig, endpoints: EndpointSet | None = None):
    """Start discovery and the server; returns (router, runner, port, stop) where
    ``await stop()`` tears everything down. ``endpoints`` lets tests inject the set."""
    loop = asyncio.get_running_loop()
    endpoints = endpoints if endpoints is not None else EndpointSet(eject_seconds=config.eject_seconds)
    router = Router(config, endpoints)
    stoppers = []
    mode = config.resolved_discovery()
    if mode == "static":
        static = StaticDiscovery(endpoints, config.endpoint_list(), config.health_interval,
                                 timeout=min(2.0, config.connect_timeout))
        await static.start()
        stoppers.append(static.stop)
    elif mode == "endpointslices":
        from .kube import EndpointSliceWatcher, default_namespace

        def on_view(view, meta):
            loop.call_soon_threadsafe(endpoints.replace, view, meta)

        watcher = EndpointSliceWatcher(config.namespace or default_namespace(), config.service, on_view,
                                       engine_port=config.engine_port or None,
                                       kubeconfig=config.kubeconfig or None).start()

        async def stop_watcher():
            await asyncio.to_thread(watcher.stop)
        stoppers.append(stop_watcher)
    runner = web.AppRunner(router.make_app(), handler_cancellation=True, access_log=None, shutdown_timeout=30.0)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else config.port

    async def stop():
        await runner.cleanup()
        for s in stoppers:
            await s()
    return router, runner, port, stop


async def serve(config: RouterConfig) -> int:
    router, runner, port, stop = await start_router(config)
    log.info("router on http://%s:%d, discovery %s, load factor %.2f", config.host, port,
             config.resolved_discovery(), config.load_factor)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal():
        router.draining = True
        done.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await done.wait()
    # /ready is false now; give the Service's endpoints a moment to drop this pod
    # before the listening socket closes, then let in-flight streams finish.
    log.info("stopping: finishing in-flight requests")
    await asyncio.sleep(config.drain_delay)
    await stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(level=getattr(logging, config.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(config))
