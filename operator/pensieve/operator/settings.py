"""Operator settings, read from PENSIEVE_OPERATOR_* environment variables.

The Helm chart's values.yaml mirrors these names (camelCase without the prefix).
Loaded by the shared loader (``pensieve.common.flags``, environment then
default); int fields are Kubernetes quantities (``4Gi``).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from pensieve.common import flags
from pensieve.common.memory import ENGINE_OVERHEAD_BYTES, NODE_RESERVE_FRACTION
from pensieve.common.quantity import parse_bytes

PREFIX = "PENSIEVE_OPERATOR_"
LOG_FORMATS = ("plain", "full", "json")


@dataclasses.dataclass(frozen=True)
class Settings:
    # Namespaces to watch: empty = the whole cluster.
    namespaces: tuple[str, ...] = ()
    engine_image: str = "ghcr.io/pensieve-ai/pensieve-engine:0.1.0"
    router_image: str = "ghcr.io/pensieve-ai/pensieve-router:0.1.0"
    # Seconds between periodic level-based resyncs of every PensieveDeployment.
    resync_seconds: float = 60.0
    # Seconds between refreshes of the engine pods' controller.kubernetes.io/pod-deletion-cost
    # from their live sessions (pensieve_sessions_active), and the scrape timeout per pod.
    deletion_cost_seconds: float = 15.0
    deletion_cost_timeout_seconds: float = 2.0
    # Memory each node keeps for the system and other pods (bytes), on top of
    # what the node's allocatable already excludes, as a fraction of allocatable.
    node_memory_reserve_fraction: float = NODE_RESERVE_FRACTION
    # Engine process memory outside the CPU cache (Python, tokenizer, CUDA context,
    # pinned staging buffers), bytes.
    engine_memory_overhead_bytes: int = ENGINE_OVERHEAD_BYTES
    # Smallest CPU cache worth running with, and smallest GPU memory share.
    min_cpu_cache_bytes: int = 1 * 2**30
    min_gpu_memory_bytes: int = 2 * 2**30
    # Engine pods' memory limit when the PensieveDeployment uses no GPU and no
    # node reports its memory (kind, demos), bytes.
    cpu_only_pod_memory_bytes: int = 8 * 2**30
    # Seconds the preStop hook waits before the engine gets SIGTERM, so the router
    # and EndpointSlices drop the pod before it stops accepting.
    prestop_seconds: int = 5
    # Liveness probe address served by kopf (host:port), empty = off.
    liveness: str = "0.0.0.0:8080"
    # Create a ServiceMonitor only when spec.monitoring.serviceMonitor and the CRD exists.
    service_monitor: bool = True
    # The operator's own namespace: its pods may reach the engines (pod-deletion-cost scrapes
    # /metrics) through the engine NetworkPolicy. The chart sets the release namespace.
    operator_namespace: str = "pensieve-system"
    # Namespace whose pods (Prometheus) may scrape the engines through the NetworkPolicy,
    # unless a PensieveDeployment names another; empty = none.
    monitoring_namespace: str = "monitoring"
    # The ClusterRole (installed with the operator) each router's RoleBinding refers to; the
    # operator may bind only this one (RBAC `bind` with resourceNames).
    router_cluster_role: str = "pensieve-router"
    # Operator log lines: plain | full | json (kopf's formats; one handler, each line once).
    log_format: str = "plain"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        s = flags.load(cls, PREFIX, environ=env, parsers={int: parse_bytes})
        s.validate()
        return s

    def validate(self) -> None:
        if not 0 <= self.node_memory_reserve_fraction < 0.9:
            raise ValueError(f"{PREFIX}NODE_MEMORY_RESERVE_FRACTION must be in [0, 0.9)")
        if self.resync_seconds <= 0:
            raise ValueError(f"{PREFIX}RESYNC_SECONDS must be > 0")
        if self.deletion_cost_seconds <= 0 or self.deletion_cost_timeout_seconds <= 0:
            raise ValueError(f"{PREFIX}DELETION_COST_SECONDS and _TIMEOUT_SECONDS must be > 0")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"{PREFIX}LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")

