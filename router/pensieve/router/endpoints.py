"""The set of engine endpoints the router may send to, and the discovery sources that
feed it.

``EndpointSet`` is the one interface between discovery and routing: a discovery
source calls ``replace(source, {address: ready})`` with its complete current view
(static list, health checks, EndpointSlice watch); tests inject changes the same way.
It lives on the event loop's thread: sources running in other threads hand their
updates over with ``loop.call_soon_threadsafe``.

An endpoint is routable when discovery says it is ready and it is not ejected. A
connection failure ejects an endpoint for ``eject_seconds`` (passive health), so a
dead engine stops receiving traffic before discovery notices.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("pensieve.router")


def normalize(address: str, default_port: int | None = None) -> str:
    """`host:port` (IPv6 as `[addr]:port`)."""
    a = address.strip()
    if a.startswith("http://"):
        a = a[len("http://"):]
    a = a.rstrip("/")
    if a.startswith("["):
        return a if "]:" in a else f"{a}:{default_port}"
    if a.count(":") == 1:
        return a
    if a.count(":") > 1:  # bare IPv6
        return f"[{a}]:{default_port}"
    if default_port is None:
        raise ValueError(f"endpoint {address!r} has no port")
    return f"{a}:{default_port}"


@dataclass
class Endpoint:
    address: str
    ready: bool = True
    in_flight: int = 0
    ejected_until: float = 0.0
    gone: bool = False  # dropped by discovery; forgotten when its last request ends
    meta: dict = field(default_factory=dict)  # e.g. the pod name, from EndpointSlices

    def routable(self, now: float) -> bool:
        return self.ready and now >= self.ejected_until


class EndpointSet:
    def __init__(self, eject_seconds: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.eject_seconds = eject_seconds
        self.clock = clock
        self.endpoints: dict[str, Endpoint] = {}
        self._listeners: list[Callable[[], None]] = []

    # -- discovery side ----------------------------------------------------------------------
    def replace(self, view: dict[str, bool], meta: dict[str, dict] | None = None) -> None:
        """Discovery's complete current view: address -> ready. Endpoints absent from it
        are forgotten once nothing is in flight to them (their in-flight counts stay
        right until their requests finish)."""
        before = self.ready_addresses()
        for addr, ready in view.items():
            ep = self.endpoints.get(addr)
            if ep is None:
                ep = self.endpoints[addr] = Endpoint(addr, ready)
            ep.ready = bool(ready)
            ep.gone = False
            if meta and addr in meta:
                ep.meta = meta[addr]
        for addr in list(self.endpoints):
            if addr not in view:
                ep = self.endpoints[addr]
                ep.ready = False
                ep.gone = True
                if ep.in_flight == 0:
                    del self.endpoints[addr]
        after = self.ready_addresses()
        if before != after:
            log.info("ready endpoints: %s", ", ".join(sorted(after)) or "(none)")
        self._notify()

    def set_ready(self, address: str, ready: bool) -> None:
        ep = self.endpoints.get(address)
        if ep is not None and ep.ready != ready:
            ep.ready = ready
            log.info("endpoint %s %s", address, "ready" if ready else "not ready")
            self._notify()

    def on_change(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    def _notify(self) -> None:
        for fn in self._listeners:
            fn()

    # -- routing side --------------------------------------------------------------------------
    def ready_addresses(self) -> list[str]:
        now = self.clock()
        return sorted(a for a, ep in self.endpoints.items() if ep.routable(now))

    def in_flight(self) -> dict[str, int]:
        return {a: ep.in_flight for a, ep in self.endpoints.items()}

    def acquire(self, address: str) -> None:
        ep = self.endpoints.get(address)
        if ep is None:  # raced with a discovery update: track it until released
            ep = self.endpoints[address] = Endpoint(address, ready=False, gone=True)
        ep.in_flight += 1

    def release(self, address: str) -> None:
        ep = self.endpoints.get(address)
        if ep is None:
            return
        ep.in_flight = max(0, ep.in_flight - 1)
        if ep.in_flight == 0 and ep.gone:
            del self.endpoints[address]

    def eject(self, address: str) -> None:
        """Passive health: the endpoint refused a connection; skip it for a while."""
        ep = self.endpoints.get(address)
        if ep is not None:
            ep.ejected_until = self.clock() + self.eject_seconds
            log.warning("endpoint %s refused a connection; ejected for %.1fs", address, self.eject_seconds)
            self._notify()

    def reinstate(self, address: str) -> None:
        ep = self.endpoints.get(address)
        if ep is not None and ep.ejected_until:
            ep.ejected_until = 0.0
            self._notify()

