"""Router settings: every flag is also read from PENSIEVE_ROUTER_<FLAG> in the
environment (the operator configures the router Deployment that way). One rule,
one loader (``pensieve.common.flags``): command line, then environment, then default."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from pensieve.common import flags

ENV_PREFIX = "PENSIEVE_ROUTER_"


@dataclass
class RouterConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8080, metadata={"help": "port to listen on"})
    discovery: str = field(default="auto", metadata={
        "help": "static | endpointslices | auto (static when --static-endpoints is given, else endpointslices)",
        "choices": ("auto", "static", "endpointslices")})
    static_endpoints: str = field(default="", metadata={"help": "static mode: engine endpoints, host:port,host:port,..."})
    service: str = field(default="", metadata={
        "help": "endpointslices mode: the engine Service whose EndpointSlices are watched",
        "aliases": ("--kubernetes-service",)})
    namespace: str = field(default="", metadata={
        "help": "its namespace (default: the pod's own namespace, else 'default')"})
    engine_port: int = field(default=0, metadata={
        "help": "engine port (default: the EndpointSlice's port named 'http', else its only port, else 8000)"})
    kubeconfig: str = field(default="", metadata={
        "help": "kubeconfig file when not running in a pod (default: in-cluster config, else $KUBECONFIG)"})
    load_factor: float = field(default=1.25, metadata={
        "help": "bounded load: skip an endpoint whose in-flight count would exceed this x the mean"})
    load_floor: int = field(default=8, metadata={
        "help": "bounded load applies only from this many in-flight requests on an endpoint (0: always)"})
    upstream_timeout: float = field(default=600.0, metadata={
        "help": "seconds an engine may stay silent (before its answer or between stream chunks) before 504"})
    connect_timeout: float = field(default=5.0, metadata={"help": "seconds to open a connection to an engine"})
    retries: int = field(default=2, metadata={
        "help": "other endpoints to try when the chosen one refuses (connection failure or 503) before answering"})
    health_interval: float = field(default=2.0, metadata={
        "help": "static mode: seconds between /ready probes of each endpoint (0: never probe, all ready)"})
    eject_seconds: float = field(default=5.0, metadata={
        "help": "skip an endpoint this long after it refused a connection"})
    max_body_bytes: int = field(default=64 * 2**20, metadata={"help": "largest request body accepted"})
    session_memory: int = field(default=100_000, metadata={
        "help": "sessions whose last endpoint the router remembers (affinity across spills, re-home metrics)"})
    drain_delay: float = field(default=2.0, metadata={
        "help": "on SIGTERM, seconds /ready reports false before the listening socket closes"})
    model: str = field(default="", metadata={"help": "served model name (informational; requests pass unchanged)"})
    api_key: str = field(default="", metadata={
        "help": "accepted bearer tokens, comma-separated (the engines' keys: the header is passed on to them); "
                "empty: no authentication at the router"})
    log_level: str = field(default="info", metadata={"help": "debug | info | warning | error"})

    def endpoint_list(self) -> list[str]:
        from .endpoints import normalize

        port = self.engine_port or None
        return [normalize(a, port) for a in self.static_endpoints.split(",") if a.strip()]

    def api_keys(self) -> list[str]:
        return [k.strip() for k in self.api_key.split(",") if k.strip()]

    def resolved_discovery(self) -> str:
        if self.discovery != "auto":
            return self.discovery
        return "static" if self.static_endpoints else "endpointslices"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pensieve.router",
                                description="Pensieve's session-affine router. Every flag is also read from "
                                            f"{ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}LOAD_FACTOR).")
    flags.add_flags(p, RouterConfig, ENV_PREFIX)
    return p


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> RouterConfig:
    parser = build_parser()
    try:
        cfg = flags.load(RouterConfig, ENV_PREFIX, parser.parse_args(argv), environ)
    except flags.ConfigError as e:
        raise SystemExit(str(e)) from None
    if cfg.load_factor < 1.0:
        raise SystemExit("--load-factor must be >= 1")
    if cfg.resolved_discovery() == "static" and not cfg.endpoint_list():
        raise SystemExit("static discovery needs --static-endpoints host:port,... (or PENSIEVE_ROUTER_STATIC_ENDPOINTS)")
    if cfg.resolved_discovery() == "endpointslices" and not cfg.service:
        raise SystemExit("endpointslices discovery needs --service NAME (or PENSIEVE_ROUTER_SERVICE)")
    return cfg
