from __future__ import annotations

import pytest

from pensieve.operator.settings import Settings
from pensieve.operator.spec import parse_spec

GiB = 2**30


def node(name: str, *, memory: str, gpus: int = 0, product: str | None = None, gpu_mib: int | None = None,
         replicas: int | None = None, labels: dict | None = None, taints: list | None = None,
         unschedulable: bool = False) -> dict:
    lab = {"kubernetes.io/hostname": name, **(labels or {})}
    alloc = {"cpu": "96", "memory": memory, "pods": "110"}
    if gpus:
        alloc["nvidia.com/gpu"] = str(gpus)
        lab["nvidia.com/gpu.count"] = str(gpus // (replicas or 1))
    if product:
        lab["nvidia.com/gpu.product"] = product
    if gpu_mib:
        lab["nvidia.com/gpu.memory"] = str(gpu_mib)
    if replicas:
        lab["nvidia.com/gpu.replicas"] = str(replicas)
    return {"metadata": {"name": name, "labels": lab},
            "spec": {"unschedulable": unschedulable, "taints": taints or []},
            "status": {"allocatable": alloc, "capacity": alloc}}


# Node shapes used across the tests.
H100 = "NVIDIA-H100-80GB-HBM3"
A10 = "NVIDIA-A10"
T4 = "Tesla-T4"
NODES = {
    "8xH100": lambda n="h100-0": node(n, memory="2015Gi", gpus=8, product=H100, gpu_mib=81559),
    "A10": lambda n="a10-0": node(n, memory="62Gi", gpus=1, product=A10, gpu_mib=23028),
    "T4-sliced-x4": lambda n="t4-0": node(n, memory="60Gi", gpus=4, product=T4, gpu_mib=15360, replicas=4),
    "small": lambda n="small-0": node(n, memory="4Gi", gpus=1, product=A10, gpu_mib=23028),
    "cpu": lambda n="cpu-0": node(n, memory="31Gi"),
}


@pytest.fixture
def settings() -> Settings:
    return Settings()


def make_body(name: str = "chat", namespace: str = "default", **spec_over) -> dict:
    spec = {"replicas": 2, "model": {"source": {"huggingFace": {"id": "Qwen/Qwen2.5-0.5B-Instruct"}}}}
    for k, v in spec_over.items():
        spec[k] = v
    return {"apiVersion": "pensieve.ai/v1alpha1", "kind": "PensieveDeployment",
            "metadata": {"name": name, "namespace": namespace, "uid": "uid-1", "generation": 1}, "spec": spec}


def make_spec(settings: Settings | None = None, **spec_over):
    s = settings or Settings()
    return parse_spec(make_body(**spec_over), default_engine_image=s.engine_image, default_router_image=s.router_image)
