"""The listening socket, with a cap on open connections.

aiohttp has no connection limit of its own. ``CappedTCPSite`` hands each
accepted connection to aiohttp's protocol factory while fewer than
``max_connections`` are open (aiohttp's own count, which a connection joins
as soon as it is set up); past that it answers ``503`` with an
OpenAI-shaped error and closes, so a flood of idle or slow connections costs
one small write each instead of a request handler. The header and body read
timeouts (``header_timeout``, ``body_timeout``) are what frees the slots
that slow clients hold.
"""
from __future__ import annotations

import asyncio
import json

from aiohttp import web

_BODY = json.dumps({"error": {"message": "too many open connections; retry later", "type": "service_unavailable",
                              "param": None, "code": "too_many_connections"}}).encode()
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
           b"Connection: close\r\nContent-Length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY)


class _Refused(asyncio.Protocol):
    """One connection too many: the 503 is written and the connection closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(REFUSAL)  # type: ignore[attr-defined]
        transport.close()


class CappedTCPSite(web.BaseSite):
    def __init__(self, runner: web.BaseRunner, host: str, port: int, max_connections: int, backlog: int = 128):
        super().__init__(runner, backlog=backlog)
        self._host, self._port, self._max = host, port, max_connections
        self.refused = 0

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        self._server = await asyncio.get_running_loop().create_server(
            self._protocol, self._host, self._port, backlog=self._backlog, reuse_address=True)

    def _protocol(self) -> asyncio.BaseProtocol:
        server = self._runner.server
        assert server is not None
        if len(server.connections) >= self._max:
            self.refused += 1
            return _Refused()
        return server()
