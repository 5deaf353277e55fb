"""Pod sizes derived from the Nodes that match a PensieveDeployment's placement.

For each matching node (schedulable, labels match nodeSelector and gpuProduct,
taints tolerated, enough `nvidia.com/gpu`):

* engine pods per node = allocatable GPU units // gpusPerPod (CPU-only pods:
  usable memory // PENSIEVE_OPERATOR_CPU_ONLY_POD_MEMORY_BYTES, at least 1);
* usable memory = allocatable memory × (1 − node reserve fraction);
* a pod's memory share = usable memory / pods per node;
* CPU cache: `auto` → share − engine overhead; a quantity → as given, and the pod
  needs cache + overhead; cacheMode gpu-only/none → no CPU cache; the engine
  overhead is per engine process: gpusPerPod > 1 runs one tensor-parallel engine
  of gpusPerPod processes, so the overhead counts gpusPerPod times and the CPU
  cache is the whole pod's (the ranks split every block by KV head);
  (the reserve and the overhead are ``pensieve.common.memory``, the formula the
  engine's own ``--cpu-cache-bytes auto`` uses);
* memory request = limit = cache + overhead (Guaranteed QoS: the CPU tier is pinned
  host memory and must never be overcommitted);
* GPU memory utilization = spec value / gpu.replicas (time-sliced GPUs are shared
  by gpu.replicas pods, each may take only its share); the resulting share of
  `nvidia.com/gpu.memory` (MiB) must reach the minimum GPU memory.

One pod template serves every node, so the pod size is the smallest that fits on
all fitting nodes; nodes too small are reported and left out. Nothing fits → the
result says so (`fits=False`) and the operator refuses with a condition and an event.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Iterable, Mapping

from pensieve.common.memory import cpu_tier_bytes, engine_overhead_bytes, usable_memory

from .quantity import format_bytes, human_bytes, parse_bytes, parse_quantity
from .settings import Settings
from .spec import PensieveSpec

GPU_RESOURCE = "nvidia.com/gpu"
LABEL_GPU_MEMORY = "nvidia.com/gpu.memory"  # MiB, per physical GPU
LABEL_GPU_PRODUCT = "nvidia.com/gpu.product"
LABEL_GPU_REPLICAS = "nvidia.com/gpu.replicas"  # time-slicing: pods sharing one GPU
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class NodeFit:
    name: str
    fits: bool
    reason: str
    pods: int = 0
    share_bytes: int = 0
    gpu_memory_bytes: int | None = None
    gpu_replicas: int = 1
    product: str = ""
    usable_bytes: int = 0  # allocatable memory less the node reserve
    gpu_ok: bool = True  # the GPU memory share reaches the minimum


@dataclasses.dataclass(frozen=True)
class Sizing:
    fits: bool
    reason: str  # "Sized" | "NoMatchingNodes" | "NodesTooSmall"
    message: str
    memory_request_bytes: int = 0
    memory_limit_bytes: int = 0
    cpu_cache_bytes: int = 0
    gpu_memory_utilization: float = 0.0
    capacity_pods: int = 0
    nodes: tuple[NodeFit, ...] = ()
    explanation: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    # Stable sizing (see `stable_sizing`): whether the applied size was kept rather than
    # recomputed, and what a re-size would give now when that differs.
    kept: bool = False
    resize: Mapping[str, Any] | None = None

    def to_status(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"kept": self.kept}
        if self.resize is not None:
            extra["resize"] = dict(self.resize)
        return extra | {
            "fits": self.fits,
            "reason": self.reason,
            "podMemoryRequest": format_bytes(self.memory_request_bytes),
            "podMemoryLimit": format_bytes(self.memory_limit_bytes),
            "cpuCacheBytes": self.cpu_cache_bytes,
            "cpuCache": format_bytes(self.cpu_cache_bytes),
            "gpuMemoryUtilization": self.gpu_memory_utilization,
            "capacityPods": self.capacity_pods,
            "nodesConsidered": len(self.nodes),
            "nodesFitting": sum(1 for n in self.nodes if n.fits),
            "explanation": list(self.explanation),
            "warnings": list(self.warnings),
        }


def _labels(node: Mapping[str, Any]) -> Mapping[str, str]:
    return (node.get("metadata") or {}).get("labels") or {}


def _tolerated(taint: Mapping[str, Any], tolerations: Iterable[Mapping[str, Any]]) -> bool:
    if taint.get("effect") not in ("NoSchedule", "NoExecute"):
        return True
    for t in tolerations:
        if t.get("effect") and t.get("effect") != taint.get("effect"):
            continue
        if t.get("operator") == "Exists" and (not t.get("key") or t.get("key") == taint.get("key")):
            return True
        if t.get("key") == taint.get("key") and t.get("value", "") == taint.get("value", ""):
            return True
    return False


def node_matches(node: Mapping[str, Any], spec: PensieveSpec) -> tuple[bool, str]:
    """Whether the scheduler could place an engine pod of `spec` on `node` (placement only)."""
    labels = _labels(node)
    if (node.get("spec") or {}).get("unschedulable"):
        return False, "cordoned"
    for k, v in spec.resources.node_selector:
        if labels.get(k) != v:
            return False, f"label {k}={v} missing"
    if spec.resources.gpu_product and labels.get(LABEL_GPU_PRODUCT) != spec.resources.gpu_product:
        return False, f"{LABEL_GPU_PRODUCT} is {labels.get(LABEL_GPU_PRODUCT)!r}, not {spec.resources.gpu_product!r}"
    for taint in (node.get("spec") or {}).get("taints") or []:
        if not _tolerated(taint, spec.resources.tolerations):
            return False, f"taint {taint.get('key')}:{taint.get('effect')} not tolerated"
    return True, ""


def _fit_node(node: Mapping[str, Any], spec: PensieveSpec, s: Settings) -> NodeFit:
    name = (node.get("metadata") or {}).get("name", "?")
    labels = _labels(node)
    ok, why = node_matches(node, spec)
    if not ok:
        return NodeFit(name, False, why)
    alloc = (node.get("status") or {}).get("allocatable") or {}
    try:
        memory = parse_bytes(alloc.get("memory", "0"))
    except ValueError:
        memory = 0
    usable = usable_memory(memory, s.node_memory_reserve_fraction)
    k = spec.resources.gpus_per_pod
    product = labels.get(LABEL_GPU_PRODUCT, "")
    replicas = 1
    try:
        replicas = max(1, int(labels.get(LABEL_GPU_REPLICAS, "1")))
    except ValueError:
        pass
    gpu_mem = None
    if LABEL_GPU_MEMORY in labels:
        try:
            gpu_mem = int(labels[LABEL_GPU_MEMORY]) * MIB
        except ValueError:
            gpu_mem = None
    if k > 0:
        units = int(parse_quantity(alloc.get(GPU_RESOURCE, "0")))
        if units < k:
            return NodeFit(name, False, f"{units} allocatable {GPU_RESOURCE}, pod needs {k}", product=product)
        pods = units // k
    else:
        pods = max(1, usable // s.cpu_only_pod_memory_bytes) if s.cpu_only_pod_memory_bytes else 1
    share = usable // pods if k > 0 else min(usable, s.cpu_only_pod_memory_bytes or usable)
    fit = NodeFit(name, True, "", pods=pods, share_bytes=share, gpu_memory_bytes=gpu_mem,
                  gpu_replicas=replicas, product=product, usable_bytes=usable)
    need = _pod_memory_need(spec, s)
    if need is not None and share < need:
        return dataclasses.replace(fit, fits=False, reason=(
            f"memory share {human_bytes(share)} per pod < {human_bytes(need)} needed"))
    if need is None and cpu_tier_bytes(share, pod_overhead(spec, s)) < s.min_cpu_cache_bytes:
        return dataclasses.replace(fit, fits=False, reason=(
            f"memory share {human_bytes(share)} per pod leaves less than the minimum CPU cache "
            f"{human_bytes(s.min_cpu_cache_bytes)} after the engine overhead {human_bytes(pod_overhead(spec, s))}"))
    if k > 0 and gpu_mem is not None:
        gpu_share = gpu_mem * spec.cache.gpu_memory_utilization / replicas
        if gpu_share < s.min_gpu_memory_bytes:
            return dataclasses.replace(fit, fits=False, gpu_ok=False, reason=(
                f"GPU memory share {human_bytes(gpu_share)} (gpu.memory {human_bytes(gpu_mem)} × "
                f"{spec.cache.gpu_memory_utilization} / gpu.replicas {replicas}) < {human_bytes(s.min_gpu_memory_bytes)}"))
    return fit


def pod_overhead(spec: PensieveSpec, s: Settings) -> int:
    """Memory outside the CPU tier: the engine overhead once per process (tensor-parallel rank)."""
    return engine_overhead_bytes(spec.resources.tensor_parallel_size, s.engine_memory_overhead_bytes)


def _pod_memory_need(spec: PensieveSpec, s: Settings) -> int | None:
    """Fixed memory a pod needs, or None when the CPU cache is sized from the node (auto)."""
    if spec.engine.cache_mode != "pensieve":
        return pod_overhead(spec, s)
    if spec.cache.cpu_cache_bytes is not None:
        return spec.cache.cpu_cache_bytes + pod_overhead(spec, s)
    return None


def compute_sizing(nodes: Iterable[Mapping[str, Any]], spec: PensieveSpec, settings: Settings) -> Sizing:
    fits = [_fit_node(n, spec, settings) for n in nodes]
    fits.sort(key=lambda f: f.name)
    good = [f for f in fits if f.fits]
    matching = [f for f in fits if f.pods or f.fits]
    explanation: list[str] = []
    placement = []
    if spec.resources.gpus_per_pod:
        placement.append(f"{spec.resources.gpus_per_pod} {GPU_RESOURCE} per pod")
    if spec.resources.gpu_product:
        placement.append(f"{LABEL_GPU_PRODUCT}={spec.resources.gpu_product}")
    placement += [f"{k}={v}" for k, v in spec.resources.node_selector]
    explanation.append(f"placement: {', '.join(placement) or 'any node'}; {len(fits)} nodes read, "
                       f"{len(matching)} match, {len(good)} fit")
    for f in fits:
        if f.fits:
            explanation.append(
                f"node {f.name}: {f.pods} pods, {human_bytes(f.share_bytes)} memory each"
                + (f", GPU {f.product or '?'} {human_bytes(f.gpu_memory_bytes)}" if f.gpu_memory_bytes else "")
                + (f", time-sliced ×{f.gpu_replicas}" if f.gpu_replicas > 1 else ""))
        else:
            explanation.append(f"node {f.name}: skipped, {f.reason}")
    if not good:
        reason = "NodesTooSmall" if matching else "NoMatchingNodes"
        why = "; ".join(f"{f.name}: {f.reason}" for f in fits[:8]) or "no nodes"
        msg = (f"no node can hold an engine pod ({', '.join(placement) or 'any node'}): {why}"
               if matching else f"no node matches the placement ({', '.join(placement) or 'any node'}): {why}")
        return Sizing(False, reason, msg, nodes=tuple(fits), explanation=tuple(explanation))

    s = settings
    overhead = pod_overhead(spec, s)
    if spec.resources.tensor_parallel_size > 1:
        explanation.append(f"gpusPerPod {spec.resources.gpus_per_pod}: one engine of {spec.resources.gpus_per_pod} "
                           f"tensor-parallel processes; engine overhead {human_bytes(s.engine_memory_overhead_bytes)} "
                           f"× {spec.resources.gpus_per_pod}; the CPU cache is shared by the ranks")
    need = _pod_memory_need(spec, s)
    smallest = min(good, key=lambda f: f.share_bytes)
    if need is None:
        limit = (smallest.share_bytes // MIB) * MIB
        cache = cpu_tier_bytes(limit, overhead)
        explanation.append(
            f"cpuCache auto: smallest fitting share {human_bytes(smallest.share_bytes)} (node {smallest.name}: "
            f"allocatable × {1 - s.node_memory_reserve_fraction:.2f} / {smallest.pods} pods) − engine overhead "
            f"{human_bytes(overhead)} = CPU cache {human_bytes(cache)}")
    elif spec.engine.cache_mode != "pensieve":
        limit, cache = overhead, 0
        explanation.append(f"cacheMode {spec.engine.cache_mode}: no CPU tier; pod memory = engine overhead {human_bytes(overhead)}")
    else:
        cache = spec.cache.cpu_cache_bytes or 0
        limit = need
        explanation.append(f"cpuCache {spec.cache.cpu_cache} = {human_bytes(cache)} + engine overhead "
                           f"{human_bytes(overhead)} = {human_bytes(limit)} per pod")
    explanation.append(f"pod memory request = limit = {format_bytes(limit)} (Guaranteed QoS: pinned host memory)")
    replicas_max = max(f.gpu_replicas for f in good)
    util = spec.cache.gpu_memory_utilization
    if spec.resources.gpus_per_pod:
        util = round(spec.cache.gpu_memory_utilization / replicas_max, 4)
        if replicas_max > 1:
            explanation.append(f"GPU memory utilization {spec.cache.gpu_memory_utilization} / gpu.replicas "
                               f"{replicas_max} (time-sliced) = {util}")
        else:
            explanation.append(f"GPU memory utilization {util} (whole GPUs)")
    capacity = sum(f.pods for f in good)
    warnings = []
    if spec.replicas > capacity:
        warnings.append(f"{spec.replicas} replicas requested but the fitting nodes hold {capacity} engine pods")
    msg = (f"pods get {format_bytes(limit)} memory, CPU cache {human_bytes(cache)}, GPU utilization {util}; "
           f"capacity {capacity} pods on {len(good)} nodes")
    return Sizing(True, "Sized", msg, memory_request_bytes=limit, memory_limit_bytes=limit, cpu_cache_bytes=cache,
                  gpu_memory_utilization=util, capacity_pods=capacity, nodes=tuple(fits),
                  explanation=tuple(explanation), warnings=tuple(warnings))


# Stable sizing ----------------------------------------------------------------------------------------
# Sizing follows the smallest fitting node, so a smaller node joining would shrink every pod and
# roll every serving engine (losing its CPU tier). The size actually applied is recorded on the
# engine Deployment and kept until the spec's sizing inputs change or the kept size cannot place
# the wanted replicas; status.sizing.resize says what a re-size would give meanwhile.
SIZING_ANNOTATION = "pensieve.ai/sizing"


@dataclasses.dataclass(frozen=True)
class AppliedSize:
    """The size rendered into the engine Deployment, and the spec inputs it was computed from."""
    inputs: str
    memory_bytes: int
    cpu_cache_bytes: int
    gpu_memory_utilization: float

    def to_annotation(self) -> str:
        return json.dumps({"inputs": self.inputs, "memory": self.memory_bytes, "cpuCache": self.cpu_cache_bytes,
                           "gpuMemoryUtilization": self.gpu_memory_utilization}, sort_keys=True)

    @classmethod
    def from_deployment(cls, dep: Mapping[str, Any] | None) -> "AppliedSize | None":
        raw = (((dep or {}).get("metadata") or {}).get("annotations") or {}).get(SIZING_ANNOTATION)
        if not raw:
            return None
        try:
            d = json.loads(raw)
            return cls(str(d["inputs"]), int(d["memory"]), int(d["cpuCache"]), float(d["gpuMemoryUtilization"]))
        except (ValueError, KeyError, TypeError):
            return None  # unreadable: size afresh

    @classmethod
    def of(cls, spec: PensieveSpec, sizing: Sizing) -> "AppliedSize":
        return cls(sizing_inputs(spec), sizing.memory_limit_bytes, sizing.cpu_cache_bytes, sizing.gpu_memory_utilization)


def sizing_inputs(spec: PensieveSpec) -> str:
    """Digest of the spec fields that sizing depends on (replicas excluded: scaling alone never re-sizes)."""
    r, c = spec.resources, spec.cache
    key = [r.gpus_per_pod, r.gpu_product, list(r.node_selector), [sorted(t.items()) for t in r.tolerations],
           c.gpu_memory_utilization, c.cpu_cache, spec.engine.cache_mode]
    return hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()[:16]


def capacity_at(nodes: Iterable[NodeFit], memory_bytes: int) -> int:
    """Engine pods of `memory_bytes` the nodes hold (placement, GPU units and GPU memory as computed)."""
    total = 0
    for f in nodes:
        if f.pods and f.gpu_ok and memory_bytes > 0:
            total += min(f.pods, f.usable_bytes // memory_bytes)
    return total


def _summary(s: Sizing) -> dict[str, Any]:
    return {"podMemoryLimit": format_bytes(s.memory_limit_bytes), "cpuCache": format_bytes(s.cpu_cache_bytes),
            "gpuMemoryUtilization": s.gpu_memory_utilization, "capacityPods": s.capacity_pods}


def stable_sizing(fresh: Sizing, applied: AppliedSize | None, spec: PensieveSpec) -> Sizing:
    """The size to render: the applied one while the spec's sizing inputs are unchanged and it places
    `spec.replicas` pods; otherwise `fresh`. A kept size carries what a re-size would give."""
    if applied is None or applied.inputs != sizing_inputs(spec):
        return fresh
    capacity = capacity_at(fresh.nodes, applied.memory_bytes)
    if capacity == 0 and spec.replicas > 0 and not fresh.fits:
        return fresh  # nowhere to run at all: refused with fresh's reason
    if capacity < spec.replicas and fresh.fits and fresh.capacity_pods > capacity:
        return dataclasses.replace(fresh, explanation=fresh.explanation + (
            f"re-sized: the applied size {human_bytes(applied.memory_bytes)} places {capacity} of {spec.replicas} pods",))
    kept = dataclasses.replace(
        fresh, fits=True, reason="Sized", kept=True,
        memory_request_bytes=applied.memory_bytes, memory_limit_bytes=applied.memory_bytes,
        cpu_cache_bytes=applied.cpu_cache_bytes, gpu_memory_utilization=applied.gpu_memory_utilization,
        capacity_pods=capacity,
        message=(f"kept the applied size: pods get {format_bytes(applied.memory_bytes)} memory, CPU cache "
                 f"{human_bytes(applied.cpu_cache_bytes)}; capacity {capacity} pods"),
        warnings=(f"{spec.replicas} replicas requested but the fitting nodes hold {capacity} engine pods",)
        if spec.replicas > capacity else ())
    kept = dataclasses.replace(kept, explanation=fresh.explanation + (
        f"kept the applied size {format_bytes(applied.memory_bytes)} (spec unchanged, {capacity} pods placeable): "
        "healthy serving pods are not re-sized because the cluster changed",))
    if fresh.fits and (fresh.memory_limit_bytes, fresh.cpu_cache_bytes, fresh.gpu_memory_utilization) != (
            applied.memory_bytes, applied.cpu_cache_bytes, applied.gpu_memory_utilization):
        kept = dataclasses.replace(kept, resize=_summary(fresh))
    return kept
