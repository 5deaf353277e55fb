"""The router's HTTP side: aiohttp server in front of the engines.

Every engine route (``/v1/*``) is proxied; the router answers ``/health``, ``/ready``
and ``/metrics`` itself. Per request:

1. Session id: the ``X-Session-ID`` header, else (for ``/v1/sessions/{id}``) the path,
   else the JSON body's ``session_id`` (the body is parsed only when the header is
   absent and it is JSON).
2. Candidates: ``hashing.choose`` over the routable endpoints (rendezvous order with
   bounded load; least loaded without a session).
3. Send to the first. If it refuses *before answering* (connection failure, or a 503:
   draining / not ready) the engine never took the request, so the next candidate gets
   it, up to ``retries`` more times. This is what re-homes a session whose engine
   disappeared: its new owner re-prefills from the history the client sends.
4. Stream the answer back as it arrives (SSE included: no buffering), with
   ``X-Pensieve-Endpoint``. A client that goes away cancels the handler
   (``handler_cancellation``), which closes the upstream request, which aborts the
   engine's generation.

Router-side failures are OpenAI-shaped JSON: 502 (engine failed / dropped the
connection before answering), 503 (no ready endpoint, or all refused), 504 (engine
silent longer than ``upstream_timeout``).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections import OrderedDict

import aiohttp
from aiohttp import web

from . import hashing
from .config import RouterConfig
from .endpoints import EndpointSet
from .metrics import CONTENT_TYPE_LATEST, RouterMetrics

log = logging.getLogger("pensieve.router")

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}
ENDPOINT_HEADER = "X-Pensieve-Endpoint"


def error_response(status: int, message: str, code: str, type_: str | None = None,
                   headers: dict | None = None) -> web.Response:
    type_ = type_ or {502: "bad_gateway", 503: "service_unavailable", 504: "gateway_timeout"}.get(status, "router_error")
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


class Refused(Exception):
    """The endpoint did not take the request (nothing was processed): try another."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


class Router:
    def __init__(self, config: RouterConfig, endpoints: EndpointSet | None = None,
                 metrics: RouterMetrics | None = None):
        self.config = config
        self.endpoints = endpoints or EndpointSet(eject_seconds=config.eject_seconds)
        self.metrics = metrics or RouterMetrics()
        self.sessions: OrderedDict[str, str] = OrderedDict()  # session -> endpoint of its last request
        self.client: aiohttp.ClientSession | None = None
        self.draining = False
        self.endpoints.on_change(self._update_gauges)
        self._keys = [k.encode("utf-8", "surrogateescape") for k in config.api_keys()]

    # -- lifecycle -----------------------------------------------------------------------------
    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.metrics_endpoint)
        app.router.add_route("*", "/v1/{tail:.*}", self.proxy)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        if self.client is None:
            self.client = aiohttp.ClientSession(
                # One connection per request (force_close): a pooled keep-alive connection to an
                # engine that just died can be reused before its close is seen, and the reset then
                # looks like a failure after sending (502). A fresh connect to a dead engine is
                # refused before anything is sent, so the session is re-homed. In-cluster connects
                # cost far less than a model turn.
                connector=aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True, force_close=True),
                auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
        self._update_gauges()

    async def _cleanup(self, app: web.Application) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    def _update_gauges(self) -> None:
        self.metrics.ready_endpoints.set(len(self.endpoints.ready_addresses()))

    # -- own endpoints ---------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.endpoints.ready_addresses()
        ok = bool(ready) and not self.draining
        body = {"ready": ok, "endpoints": len(ready), "draining": self.draining}
        return web.json_response(body, status=200 if ok else 503)

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        self._update_gauges()
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- routing -----------------------------------------------------------------------------------
    @staticmethod
    def session_of(request: web.Request, body: bytes) -> str | None:
        sid = request.headers.get("X-Session-ID")
        if sid:
            return sid
        tail = request.match_info.get("tail", "")
        if tail.startswith("sessions/"):
            rest = tail[len("sessions/"):].split("/", 1)[0]
            return rest or None
        if body and (request.content_type or "").endswith("json"):
            try:
                doc = json.loads(body)
            except ValueError:
                return None  # the engine answers the 400
            sid = doc.get("session_id") if isinstance(doc, dict) else None
            if isinstance(sid, str) and sid:
                return sid
        return None

    def candidates(self, session_id: str | None) -> list[str]:
        ready = self.endpoints.ready_addresses()
        prefer = self.sessions.get(session_id) if session_id is not None else None
        in_flight = self.endpoints.in_flight()
        order = hashing.choose(session_id, ready, in_flight, self.config.load_factor, prefer, self.config.load_floor)
        if session_id is not None and order and log.isEnabledFor(logging.DEBUG):
            first = prefer if prefer in ready else hashing.owner(session_id, ready)
            if order[0] != first:
                log.debug("session %s spilled from %s to %s (in flight %s)", session_id, first, order[0],
                          {e: in_flight.get(e, 0) for e in ready})
        return order

    def _remember(self, session_id: str, endpoint: str) -> None:
        prev = self.sessions.get(session_id)
        if prev is not None and prev != endpoint:
            self.metrics.rehomed.inc()
        self.sessions[session_id] = endpoint
        self.sessions.move_to_end(session_id)
        while len(self.sessions) > self.config.session_memory:
            self.sessions.popitem(last=False)

    def _authorized(self, request: web.Request) -> bool:
        """A bearer token among the keys (the engines check it again: the header is passed on)."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token_b = token.strip().encode("utf-8", "surrogateescape")
        found = False
        for key in self._keys:  # every key compared: the time taken says nothing about which matched
            found |= hmac.compare_digest(key, token_b)
        return scheme.lower() == "bearer" and bool(token_b) and found

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        start = time.monotonic()
        if self._keys and not self._authorized(request):
            self.metrics.requests.labels("none", "401").inc()
            return error_response(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                                  "invalid_api_key", "authentication_error")
        body = await request.read()
        sid = self.session_of(request, body)
        candidates = self.candidates(sid)
        if not candidates:
            self.metrics.requests.labels("none", "503").inc()
            return error_response(503, "no engine endpoint is ready", "no_ready_endpoint", headers={"Retry-After": "1"})
        if sid is not None:
            self.metrics.session_requests.inc()
        tries = candidates[: 1 + max(0, self.config.retries)]
        last: Refused | None = None
        for i, endpoint in enumerate(tries):
            if i:
                self.metrics.retries.inc()
            try:
                resp = await self._forward(request, body, endpoint, sid, start)
            except Refused as e:
                last = e
                log.info("endpoint %s refused %s %s (%s: %s)%s", endpoint, request.method, request.path, e.kind, e,
                         "; trying the next" if i + 1 < len(tries) else "")
                continue
            return resp
        self.metrics.requests.labels("none", "503").inc()
        return error_response(503, f"every engine endpoint tried refused the request (last: {last})",
                              "upstream_refused", headers={"Retry-After": "1"})

    async def _forward(self, request: web.Request, body: bytes, endpoint: str, sid: str | None,
                       start: float) -> web.StreamResponse:
        assert self.client is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["X-Forwarded-For"] = ", ".join(filter(None, [request.headers.get("X-Forwarded-For"), request.remote]))
        url = f"http://{endpoint}{request.rel_url}"
        timeout = aiohttp.ClientTimeout(total=None, connect=self.config.connect_timeout,
                                        sock_read=self.config.upstream_timeout)
        owner = hashing.owner(sid, self.endpoints.ready_addresses()) if sid is not None else None
        self.endpoints.acquire(endpoint)
        self.metrics.in_flight.labels(endpoint).inc()
        status = "none"
        try:
            try:
                upstream_cm = self.client.request(request.method, url, headers=headers, data=body or None,
                                                  timeout=timeout, allow_redirects=False)
                upstream = await upstream_cm.__aenter__()
            except (aiohttp.ClientConnectorError, aiohttp.ClientConnectionResetError,
                    aiohttp.ConnectionTimeoutError) as e:  # nothing was sent: another endpoint may take it
                self.metrics.upstream_errors.labels(endpoint, "connect").inc()
                self.endpoints.eject(endpoint)
                raise Refused("connect", str(e)) from None
            except asyncio.TimeoutError:
                self.metrics.upstream_errors.labels(endpoint, "timeout").inc()
                status = "504"
                return error_response(504, f"engine {endpoint} did not answer within {self.config.upstream_timeout}s",
                                      "upstream_timeout", headers={ENDPOINT_HEADER: endpoint})
            except aiohttp.ClientError as e:
                # Connected, sent, and the engine went away before any answer.
                self.metrics.upstream_errors.labels(endpoint, "disconnect").inc()
                self.endpoints.eject(endpoint)
                status = "502"
                return error_response(502, f"engine {endpoint} failed before answering: {e!r}", "upstream_failed",
                                      headers={ENDPOINT_HEADER: endpoint})
            try:
                if upstream.status == 503:
                    await upstream.read()
                    self.metrics.upstream_errors.labels(endpoint, "refused_503").inc()
                    raise Refused("http_503", f"{endpoint} answered 503")
                if sid is not None:
                    if endpoint == owner:
                        self.metrics.affinity_hits.inc()
                    self._remember(sid, endpoint)
                status = str(upstream.status)
                return await self._relay(request, upstream, endpoint)
            finally:
                await upstream_cm.__aexit__(None, None, None)
        finally:
            self.endpoints.release(endpoint)
            self.metrics.in_flight.labels(endpoint).dec()
            if status != "none":
                self.metrics.requests.labels(endpoint, status).inc()
                self.metrics.latency.observe(time.monotonic() - start)

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse, endpoint: str) -> web.StreamResponse:
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for k, v in upstream.headers.items():
            if k.lower() not in HOP_BY_HOP:
                resp.headers.add(k, v)
        resp.headers[ENDPOINT_HEADER] = endpoint
        if upstream.content_length is not None:
            resp.content_length = upstream.content_length
        await resp.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)  # one write per arrival: SSE events leave as they come
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
            # The engine died or went silent mid-answer; headers are out, so the only
            # honest signal left is to cut the client's connection.
            kind = "timeout" if isinstance(e, asyncio.TimeoutError) else "disconnect"
            self.metrics.upstream_errors.labels(endpoint, kind).inc()
            if kind == "disconnect":
                self.endpoints.eject(endpoint)
            log.warning("engine %s broke off its answer to %s: %r", endpoint, request.path, e)
            if request.transport is not None:
                request.transport.abort()
            return resp
        await resp.write_eof()
        return resp
