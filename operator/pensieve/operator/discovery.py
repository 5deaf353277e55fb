"""API versions chosen by discovery, so one operator works on Kubernetes 1.20
(autoscaling/v2beta2, policy/v1beta1, discovery.k8s.io/v1beta1) and on current clusters."""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable


@dataclasses.dataclass(frozen=True)
class ApiRef:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if sub:
            base += f"/{sub}"
        return base


@dataclasses.dataclass(frozen=True)
class ApiVersions:
    hpa: ApiRef
    pdb: ApiRef
    endpointslice: ApiRef
    service_monitor: ApiRef | None
    inference_pool: ApiRef | None = None

    def to_status(self) -> dict[str, str]:
        return {
            "horizontalPodAutoscaler": self.hpa.api_version,
            "podDisruptionBudget": self.pdb.api_version,
            "endpointSlice": self.endpointslice.api_version,
            "serviceMonitor": self.service_monitor.api_version if self.service_monitor else "none",
            "inferencePool": self.inference_pool.api_version if self.inference_pool else "none",
        }


# The Gateway API Inference Extension's InferencePool, pinned to inference.networking.k8s.io/v1:
# its first stable version (the project's v1.0 release), under the k8s.io group that carries
# API-review compatibility guarantees. The earlier inference.networking.x-k8s.io/v1alpha2 had
# another shape (a label map selector, targetPortNumber, extensionRef) and is experimental;
# rendering one shape for one version keeps drift comparison exact. A cluster that serves only
# the alpha version gets no InferencePool (status.apiVersions.inferencePool: none).
INFERENCE_POOL = ApiRef("inference.networking.k8s.io", "v1", "inferencepools", "InferencePool")


class NoUsableVersion(RuntimeError):
    pass


_CANDIDATES = {
    "hpa": ("autoscaling", ("v2", "v2beta2"), "horizontalpodautoscalers", "HorizontalPodAutoscaler"),
    "pdb": ("policy", ("v1", "v1beta1"), "poddisruptionbudgets", "PodDisruptionBudget"),
    "endpointslice": ("discovery.k8s.io", ("v1", "v1beta1"), "endpointslices", "EndpointSlice"),
}


def choose_versions(served: Callable[[str, str], Iterable[str] | None]) -> ApiVersions:
    """`served(group, version)` returns the resource plurals served there, or None if the group/version is absent."""
    picked: dict[str, ApiRef] = {}
    for key, (group, versions, plural, kind) in _CANDIDATES.items():
        for v in versions:
            resources = served(group, v)
            if resources is not None and plural in resources:
                picked[key] = ApiRef(group, v, plural, kind)
                break
        else:
            raise NoUsableVersion(f"the cluster serves none of {group}/{{{','.join(versions)}}} {plural}")
    sm = served("monitoring.coreos.com", "v1")
    service_monitor = ApiRef("monitoring.coreos.com", "v1", "servicemonitors", "ServiceMonitor") \
        if sm is not None and "servicemonitors" in sm else None
    ip = served(INFERENCE_POOL.group, INFERENCE_POOL.version)
    inference_pool = INFERENCE_POOL if ip is not None and INFERENCE_POOL.plural in ip else None
    return ApiVersions(hpa=picked["hpa"], pdb=picked["pdb"], endpointslice=picked["endpointslice"],
                       service_monitor=service_monitor, inference_pool=inference_pool)
