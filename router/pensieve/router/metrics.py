"""The router's own Prometheus metrics (its own registry: nothing else in the process
leaks into /metrics)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("pensieve_router_requests", "Requests answered, by the endpoint that answered "
                                "(\"none\" when the router answered itself) and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.session_requests = Counter("pensieve_router_session_requests", "Requests that named a session",
                                        registry=r)
        self.affinity_hits = Counter("pensieve_router_affinity_hits", "Session requests sent to the session's "
                                     "rendezvous owner", registry=r)
        self.rehomed = Counter("pensieve_router_rehomed_sessions", "Session requests sent to another endpoint than "
                               "the one that served the session's previous request", registry=r)
        self.upstream_errors = Counter("pensieve_router_upstream_errors", "Failures talking to an engine, by kind "
                                       "(connect, refused_503, timeout, disconnect)", ["endpoint", "kind"], registry=r)
        self.retries = Counter("pensieve_router_retries", "Requests sent again to another endpoint after a refusal",
                               registry=r)
        self.in_flight = Gauge("pensieve_router_in_flight_requests", "Requests in flight, by endpoint", ["endpoint"],
                               registry=r)
        self.ready_endpoints = Gauge("pensieve_router_ready_endpoints", "Engine endpoints the router may send to",
                                     registry=r)
        self.latency = Histogram("pensieve_router_request_latency_seconds", "Time from request to the end of the "
                                 "response (streams included)", registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))

    def render(self) -> bytes:
        return generate_latest(self.registry)
