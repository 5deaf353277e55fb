"""Typed PensieveDeployment spec, parsed and validated at the boundary.

The CRD's structural schema rejects most bad input at admission and fills in
defaults; `parse_spec` re-applies the same defaults (so the operator also works on
objects created before a default existed) and checks what a schema cannot say
(cross-field rules, quantities). Errors are collected, not raised one at a time,
so the Degraded condition lists all of them.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from .quantity import parse_bytes, parse_quantity
from .sessions import SessionsSpec, parse_sessions

CACHE_MODES = ("pensieve", "gpu-only", "none")
EVICTIONS = ("retention", "lru")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
METRICS = ("pensieve_num_requests_waiting", "pensieve_num_requests_running", "pensieve_gpu_cache_usage_ratio")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
# Engine settings the operator owns (computed or taken from typed fields).
RESERVED_ENV = {
    "PENSIEVE_MODEL", "PENSIEVE_PORT", "PENSIEVE_HOST", "PENSIEVE_CPU_CACHE_BYTES",
    "PENSIEVE_GPU_MEMORY_UTILIZATION", "PENSIEVE_CACHE_MODE", "PENSIEVE_BLOCK_SIZE", "PENSIEVE_EVICTION",
    "PENSIEVE_API_KEY",  # spec.auth: from a Secret, never a plain value
    "PENSIEVE_SESSION_STORE", "PENSIEVE_SESSION_IDLE_TIMEOUT", "PENSIEVE_MAX_SESSIONS_PER_KEY",
    "PENSIEVE_TENSOR_PARALLEL_SIZE",  # spec.resources.gpusPerPod
}


class SpecError(ValueError):
    """An invalid spec; `.errors` lists every problem as 'field: message'."""

    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclasses.dataclass(frozen=True)
class ModelSource:
    kind: str  # "pvc" | "hostPath" | "huggingFace"
    claim_name: str = ""
    sub_path: str = ""
    path: str = ""
    hf_id: str = ""
    revision: str = "main"
    token_secret: str = ""


@dataclasses.dataclass(frozen=True)
class ModelCacheSpec:
    """A Hugging Face model downloaded once, by a Job, into a PersistentVolumeClaim that every
    engine pod mounts read-only (instead of every pod fetching it at every start)."""
    enabled: bool = False
    size: str = "50Gi"
    storage_class: str = ""  # empty: the cluster's default
    access_mode: str = "ReadWriteMany"  # ReadWriteOnce: every engine pod on the PVC's node


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    image: str
    image_pull_policy: str = "IfNotPresent"
    cache_mode: str = "pensieve"
    block_size: int = 32
    dtype: str = "auto"
    load_format: str = "auto"
    max_model_len: int | None = None
    port: int = 8000
    drain_seconds: int = 60
    extra_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class ResourcesSpec:
    gpus_per_pod: int = 1
    gpu_product: str = ""
    cpu: str = ""
    node_selector: tuple[tuple[str, str], ...] = ()
    tolerations: tuple[Mapping[str, Any], ...] = ()

    @property
    def tensor_parallel_size(self) -> int:
        """One engine spans the pod's GPUs: one process (rank) per GPU; CPU-only pods: 1."""
        return max(1, self.gpus_per_pod)


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    gpu_memory_utilization: float = 0.9
    cpu_cache: str = "auto"  # "auto" or a quantity
    cpu_cache_bytes: int | None = None  # parsed quantity, None for auto
    eviction: str = "retention"


@dataclasses.dataclass(frozen=True)
class AutoscalingSpec:
    enabled: bool = False
    min_replicas: int = 1
    max_replicas: int = 4
    metric: str = "pensieve_num_requests_waiting"
    target: str = "4"


@dataclasses.dataclass(frozen=True)
class RouterSpec:
    image: str
    replicas: int = 1
    service_type: str = "ClusterIP"
    port: int = 80


@dataclasses.dataclass(frozen=True)
class MonitoringSpec:
    service_monitor: bool = False
    interval: str = "15s"


@dataclasses.dataclass(frozen=True)
class AuthSpec:
    """API keys (comma-separated in one Secret key), enforced by the router and the engines."""
    secret_name: str = ""  # empty: no authentication
    secret_key: str = "api-keys"

    @property
    def enabled(self) -> bool:
        return bool(self.secret_name)


@dataclasses.dataclass(frozen=True)
class NetworkPolicySpec:
    """The engine pods' ingress policy: router pods, the operator and the monitoring namespace only."""
    enabled: bool = True
    monitoring_namespace: str = ""  # empty: the operator's PENSIEVE_OPERATOR_MONITORING_NAMESPACE


@dataclasses.dataclass(frozen=True)
class InferencePoolSpec:
    """An InferencePool over the engine pods, made where the cluster serves its CRD."""
    enabled: bool = True
    endpoint_picker: str = ""  # the endpoint picker's Service; empty: <name>-epp
    endpoint_picker_port: int = 9002
    failure_mode: str = "FailClose"
    gateway_namespace: str = ""  # admitted by the NetworkPolicy; empty: this namespace


@dataclasses.dataclass(frozen=True)
class PensieveSpec:
    name: str
    namespace: str
    replicas: int
    served_name: str
    source: ModelSource
    engine: EngineSpec
    resources: ResourcesSpec
    cache: CacheSpec
    autoscaling: AutoscalingSpec
    router: RouterSpec
    monitoring: MonitoringSpec
    auth: AuthSpec = AuthSpec()
    network_policy: NetworkPolicySpec = NetworkPolicySpec()
    inference_pool: InferencePoolSpec = InferencePoolSpec()
    model_cache: ModelCacheSpec = ModelCacheSpec()
    sessions: SessionsSpec = SessionsSpec()
    num_key_value_heads: int | None = None  # the model's, when the spec states it (checks gpusPerPod)

    @property
    def model_dir(self) -> str:
        return "/models/model"


class _Reader:
    def __init__(self, errors: list[str]):
        self.errors = errors

    def obj(self, d: Any, path: str) -> Mapping[str, Any]:
        if d is None:
            return {}
        if not isinstance(d, Mapping):
            self.errors.append(f"{path}: must be an object")
            return {}
        return d

    def int(self, d: Mapping, key: str, path: str, default: int | None, lo: int | None = None,
            hi: int | None = None, choices: tuple[int, ...] | None = None) -> int | None:
        v = d.get(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            self.errors.append(f"{path}.{key}: must be an integer, got {v!r}")
            return default
        if lo is not None and v < lo:
            self.errors.append(f"{path}.{key}: must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            self.errors.append(f"{path}.{key}: must be <= {hi}, got {v}")
        if choices is not None and v not in choices:
            self.errors.append(f"{path}.{key}: must be one of {list(choices)}, got {v}")
        return v

    def str(self, d: Mapping, key: str, path: str, default: str = "", choices: tuple[str, ...] | None = None,
            required: bool = False) -> str:
        v = d.get(key, default)
        if v is None or v == "":
            if required:
                self.errors.append(f"{path}.{key}: required")
            return default if v is None else v
        if not isinstance(v, str):
            self.errors.append(f"{path}.{key}: must be a string, got {v!r}")
            return default
        if choices is not None and v not in choices:
            self.errors.append(f"{path}.{key}: must be one of {list(choices)}, got {v!r}")
        return v

    def bool(self, d: Mapping, key: str, path: str, default: bool) -> bool:
        v = d.get(key, default)
        if not isinstance(v, bool):
            self.errors.append(f"{path}.{key}: must be true or false, got {v!r}")
            return default
        return v

    def float(self, d: Mapping, key: str, path: str, default: float, lo: float, hi: float) -> float:
        v = d.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.errors.append(f"{path}.{key}: must be a number, got {v!r}")
            return default
        if not lo <= v <= hi:
            self.errors.append(f"{path}.{key}: must be in [{lo}, {hi}], got {v}")
        return float(v)


def parse_spec(body: Mapping[str, Any], *, default_engine_image: str, default_router_image: str) -> PensieveSpec:
    """Parse a PensieveDeployment body (or just its metadata+spec) into a PensieveSpec."""
    errors: list[str] = []
    r = _Reader(errors)
    meta = body.get("metadata") or {}
    name = meta.get("name", "")
    namespace = meta.get("namespace", "default")
    if not name or not _DNS1123.match(name) or len(name) > 40:
        errors.append(f"metadata.name: must be a DNS-1123 label of at most 40 characters (children append suffixes), got {name!r}")
    spec = r.obj(body.get("spec"), "spec")

    replicas = r.int(spec, "replicas", "spec", 1, lo=0, hi=1024)

    model = r.obj(spec.get("model"), "spec.model")
    if not model:
        errors.append("spec.model: required")
    served_name = r.str(model, "servedName", "spec.model", name) or name
    kv_heads = r.int(model, "numKeyValueHeads", "spec.model", None, lo=1)
    src = r.obj(model.get("source"), "spec.model.source")
    kinds = [k for k in ("pvc", "hostPath", "huggingFace") if src.get(k) is not None]
    source = ModelSource(kind="")
    if len(kinds) != 1:
        errors.append(f"spec.model.source: exactly one of pvc, hostPath, huggingFace is required, got {kinds or 'none'}")
    else:
        k = kinds[0]
        s = r.obj(src[k], f"spec.model.source.{k}")
        p = f"spec.model.source.{k}"
        if k == "pvc":
            source = ModelSource(kind=k, claim_name=r.str(s, "claimName", p, required=True), sub_path=r.str(s, "subPath", p))
        elif k == "hostPath":
            path = r.str(s, "path", p, required=True)
            if path and not path.startswith("/"):
                errors.append(f"{p}.path: must be absolute, got {path!r}")
            source = ModelSource(kind=k, path=path)
        else:
            source = ModelSource(kind=k, hf_id=r.str(s, "id", p, required=True), revision=r.str(s, "revision", p, "main"),
                                 token_secret=r.str(s, "tokenSecret", p))

    e = r.obj(spec.get("engine"), "spec.engine")
    env_items: list[tuple[str, str]] = []
    for i, item in enumerate(e.get("env") or []):
        item = r.obj(item, f"spec.engine.env[{i}]")
        n = item.get("name", "")
        if not isinstance(n, str) or not _ENV_NAME.match(n):
            errors.append(f"spec.engine.env[{i}].name: not a valid variable name: {n!r}")
            continue
        if n in RESERVED_ENV:
            errors.append(f"spec.engine.env[{i}].name: {n} is set by the operator; use the typed field instead")
        env_items.append((n, str(item.get("value", ""))))
    extra = e.get("extraArgs") or []
    if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
        errors.append("spec.engine.extraArgs: must be a list of strings")
        extra = []
    engine = EngineSpec(
        image=r.str(e, "image", "spec.engine", default_engine_image) or default_engine_image,
        image_pull_policy=r.str(e, "imagePullPolicy", "spec.engine", "IfNotPresent", ("Always", "IfNotPresent", "Never")),
        cache_mode=r.str(e, "cacheMode", "spec.engine", "pensieve", CACHE_MODES),
        block_size=r.int(e, "blockSize", "spec.engine", 32, choices=(16, 32, 64)),
        dtype=r.str(e, "dtype", "spec.engine", "auto", ("auto", "float16", "bfloat16", "float32")),
        load_format=r.str(e, "loadFormat", "spec.engine", "auto", ("auto", "dummy")),
        max_model_len=r.int(e, "maxModelLen", "spec.engine", None, lo=1),
        port=r.int(e, "port", "spec.engine", 8000, lo=1, hi=65535),
        drain_seconds=r.int(e, "drainSeconds", "spec.engine", 60, lo=0, hi=3600),
        extra_args=tuple(extra),
        env=tuple(env_items),
    )

    res = r.obj(spec.get("resources"), "spec.resources")
    ns_sel = r.obj(res.get("nodeSelector"), "spec.resources.nodeSelector")
    cpu = r.str(res, "cpu", "spec.resources")
    if cpu:
        try:
            parse_quantity(cpu)
        except ValueError:
            errors.append(f"spec.resources.cpu: not a quantity: {cpu!r}")
    tolerations = res.get("tolerations") or []
    if not isinstance(tolerations, list):
        errors.append("spec.resources.tolerations: must be a list")
        tolerations = []
    resources = ResourcesSpec(
        gpus_per_pod=r.int(res, "gpusPerPod", "spec.resources", 1, lo=0, hi=16),
        gpu_product=r.str(res, "gpuProduct", "spec.resources"),
        cpu=cpu,
        node_selector=tuple(sorted((str(k), str(v)) for k, v in ns_sel.items())),
        tolerations=tuple(dict(t) for t in tolerations if isinstance(t, Mapping)),
    )

    _check_tensor_parallel(resources, kv_heads, engine, errors)

    c = r.obj(spec.get("cache"), "spec.cache")
    cpu_cache = r.str(c, "cpuCache", "spec.cache", "auto") or "auto"
    cpu_cache_bytes = None
    if cpu_cache != "auto":
        try:
            cpu_cache_bytes = parse_bytes(cpu_cache)
        except ValueError as err:  # the shared parser says why ("64m" is milli-bytes)
            errors.append(f'spec.cache.cpuCache: must be "auto" or a whole byte quantity such as 64Gi: {err}')
    cache = CacheSpec(
        gpu_memory_utilization=r.float(c, "gpuMemoryUtilization", "spec.cache", 0.9, 0.05, 0.99),
        cpu_cache=cpu_cache,
        cpu_cache_bytes=cpu_cache_bytes,
        eviction=r.str(c, "eviction", "spec.cache", "retention", EVICTIONS),
    )
    if engine.cache_mode != "pensieve" and cpu_cache_bytes:
        errors.append(f"spec.cache.cpuCache: a CPU cache needs engine.cacheMode pensieve, got {engine.cache_mode}")

    a = r.obj(spec.get("autoscaling"), "spec.autoscaling")
    autoscaling = AutoscalingSpec(
        enabled=r.bool(a, "enabled", "spec.autoscaling", False),
        min_replicas=r.int(a, "minReplicas", "spec.autoscaling", 1, lo=1),
        max_replicas=r.int(a, "maxReplicas", "spec.autoscaling", 4, lo=1),
        metric=r.str(a, "metric", "spec.autoscaling", METRICS[0], METRICS),
        target=r.str(a, "target", "spec.autoscaling", "4"),
    )
    if autoscaling.min_replicas is not None and autoscaling.max_replicas is not None \
            and autoscaling.min_replicas > autoscaling.max_replicas:
        errors.append(f"spec.autoscaling: minReplicas ({autoscaling.min_replicas}) must not exceed maxReplicas ({autoscaling.max_replicas})")
    try:
        if parse_quantity(autoscaling.target) <= 0:
            errors.append("spec.autoscaling.target: must be > 0")
    except ValueError:
        errors.append(f"spec.autoscaling.target: not a quantity: {autoscaling.target!r}")

    ro = r.obj(spec.get("router"), "spec.router")
    router = RouterSpec(
        image=r.str(ro, "image", "spec.router", default_router_image) or default_router_image,
        replicas=r.int(ro, "replicas", "spec.router", 1, lo=0, hi=64),
        service_type=r.str(ro, "serviceType", "spec.router", "ClusterIP", SERVICE_TYPES),
        port=r.int(ro, "port", "spec.router", 80, lo=1, hi=65535),
    )
    mo = r.obj(spec.get("monitoring"), "spec.monitoring")
    monitoring = MonitoringSpec(
        service_monitor=r.bool(mo, "serviceMonitor", "spec.monitoring", False),
        interval=r.str(mo, "interval", "spec.monitoring", "15s"),
    )
    auth = _parse_auth(r, spec)
    network_policy = _parse_network_policy(r, spec)
    inference_pool = _parse_inference_pool(r, spec)
    model_cache = _parse_model_cache(r, model, source)
    sessions = parse_sessions(r, spec, replicas, errors)
    if errors:
        raise SpecError(errors)
    return PensieveSpec(
        name=name, namespace=namespace, replicas=replicas, served_name=served_name, source=source, engine=engine,
        resources=resources, cache=cache, autoscaling=autoscaling, router=router, monitoring=monitoring,
        auth=auth, network_policy=network_policy, inference_pool=inference_pool, model_cache=model_cache,
        sessions=sessions, num_key_value_heads=kv_heads,
    )


def _check_tensor_parallel(resources: ResourcesSpec, kv_heads: int | None, engine: EngineSpec,
                           errors: list[str]) -> None:
    """gpusPerPod is the engine's tensor-parallel size: it must split the KV heads evenly."""
    size = resources.tensor_parallel_size
    if kv_heads and size > 1 and kv_heads % size:
        errors.append(f"spec.resources.gpusPerPod: {size} GPUs per pod shard one engine {size} ways "
                      f"(tensor parallelism), which does not divide the model's {kv_heads} KV heads "
                      f"(spec.model.numKeyValueHeads); use a divisor of {kv_heads}")
    if any(a == "--tensor-parallel-size" or a.startswith("--tensor-parallel-size=") for a in engine.extra_args):
        errors.append("spec.engine.extraArgs: --tensor-parallel-size is set by the operator from "
                      "spec.resources.gpusPerPod")


def _parse_auth(r: _Reader, spec: Mapping[str, Any]) -> AuthSpec:
    a = r.obj(spec.get("auth"), "spec.auth")
    if a.get("apiKeySecret") is None:
        return AuthSpec()
    ref = r.obj(a.get("apiKeySecret"), "spec.auth.apiKeySecret")
    name = r.str(ref, "name", "spec.auth.apiKeySecret", required=True)
    key = r.str(ref, "key", "spec.auth.apiKeySecret", "api-keys") or "api-keys"
    if name and not _DNS1123_SUBDOMAIN.match(name):
        r.errors.append(f"spec.auth.apiKeySecret.name: not a Secret name: {name!r}")
    if not _SECRET_KEY.match(key):
        r.errors.append(f"spec.auth.apiKeySecret.key: not a Secret key: {key!r}")
    return AuthSpec(secret_name=name, secret_key=key)


def _parse_network_policy(r: _Reader, spec: Mapping[str, Any]) -> NetworkPolicySpec:
    n = r.obj(spec.get("networkPolicy"), "spec.networkPolicy")
    ns = r.str(n, "monitoringNamespace", "spec.networkPolicy")
    if ns and not _DNS1123.match(ns):
        r.errors.append(f"spec.networkPolicy.monitoringNamespace: not a namespace name: {ns!r}")
    return NetworkPolicySpec(enabled=r.bool(n, "enabled", "spec.networkPolicy", True), monitoring_namespace=ns)


def _parse_inference_pool(r: _Reader, spec: Mapping[str, Any]) -> InferencePoolSpec:
    p = "spec.inferencePool"
    ip = r.obj(spec.get("inferencePool"), p)
    epp = r.str(ip, "endpointPicker", p)
    gw = r.str(ip, "gatewayNamespace", p)
    for field, v in (("endpointPicker", epp), ("gatewayNamespace", gw)):
        if v and not _DNS1123.match(v):
            r.errors.append(f"{p}.{field}: not a DNS-1123 name: {v!r}")
    return InferencePoolSpec(
        enabled=r.bool(ip, "enabled", p, True), endpoint_picker=epp,
        endpoint_picker_port=r.int(ip, "endpointPickerPort", p, 9002, lo=1, hi=65535),
        failure_mode=r.str(ip, "failureMode", p, "FailClose", ("FailClose", "FailOpen")), gateway_namespace=gw)


def _parse_model_cache(r: _Reader, model: Mapping[str, Any], source: ModelSource) -> ModelCacheSpec:
    p = "spec.model.cache"
    if model.get("cache") is None:
        return ModelCacheSpec()
    c = r.obj(model.get("cache"), p)
    size = r.str(c, "size", p, "50Gi") or "50Gi"
    try:
        if parse_bytes(size) <= 0:
            r.errors.append(f"{p}.size: must be > 0")
    except ValueError:
        r.errors.append(f"{p}.size: not a quantity: {size!r}")
    cache = ModelCacheSpec(enabled=r.bool(c, "enabled", p, True), size=size,
                           storage_class=r.str(c, "storageClassName", p),
                           access_mode=r.str(c, "accessMode", p, "ReadWriteMany", ("ReadWriteMany", "ReadWriteOnce")))
    if cache.enabled and source.kind and source.kind != "huggingFace":
        r.errors.append(f"{p}: caches a huggingFace source; the {source.kind} source is already local")
    return cache
