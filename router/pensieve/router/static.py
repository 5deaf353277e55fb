"""Static discovery: a fixed list of engines, each probed on GET /ready every
``interval`` seconds (a draining or dead engine leaves the ready set, and comes back
when it answers 200 again). With interval 0 every listed endpoint counts as ready.

A definite answer (a non-200 status, a refused connection) counts at once; a probe
that only times out counts after ``timeout_threshold`` in a row, as Kubernetes'
failureThreshold does: a busy engine answers slowly, and moving its sessions away
would cost each of them a full re-prefill."""
from __future__ import annotations

import asyncio
import logging

import aiohttp

from .endpoints import EndpointSet

log = logging.getLogger("pensieve.router")


class StaticDiscovery:
    def __init__(self, endpoints: EndpointSet, addresses: list[str], interval: float = 2.0, timeout: float = 2.0,
                 timeout_threshold: int = 3):
        self.endpoints = endpoints
        self.addresses = list(addresses)
        self.interval = interval
        self.timeout = timeout
        self.timeout_threshold = timeout_threshold
        self._timeouts = {a: 0 for a in self.addresses}
        self._ready = {a: False for a in self.addresses}
        self.task: asyncio.Task | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self.interval <= 0:
            self.endpoints.replace({a: True for a in self.addresses})
            return
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        await self.probe_all()
        self.task = asyncio.create_task(self._loop())

    async def probe(self, address: str) -> bool:
        assert self.session is not None
        try:
            async with self.session.get(f"http://{address}/ready") as r:
                await r.read()
                ready = r.status == 200
        except asyncio.TimeoutError:
            self._timeouts[address] += 1
            if self._timeouts[address] < self.timeout_threshold:
                return self._ready[address]  # slow, not gone: keep the last verdict for now
            ready = False
        except (aiohttp.ClientError, OSError):
            ready = False
        else:
            self._timeouts[address] = 0
        self._ready[address] = ready
        return ready

    async def probe_all(self) -> None:
        results = await asyncio.gather(*(self.probe(a) for a in self.addresses))
        view = dict(zip(self.addresses, results))
        self.endpoints.replace(view)
        for a, ok in view.items():
            if ok:  # answered: lift a passive ejection early
                self.endpoints.reinstate(a)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.probe_all()
            except Exception:  # noqa: BLE001
                log.exception("health probe round failed")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        if self.session is not None:
            await self.session.close()
