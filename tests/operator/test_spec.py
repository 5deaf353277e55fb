import pytest

from pensieve.operator.settings import Settings
from pensieve.operator.spec import SpecError, parse_spec

from pdep_helpers import make_body, make_spec


def parse(body):
    s = Settings()
    return parse_spec(body, default_engine_image=s.engine_image, default_router_image=s.router_image)


def test_defaults():
    spec = make_spec()
    assert spec.replicas == 2
    assert spec.served_name == "chat"
    assert spec.source.kind == "huggingFace" and spec.source.revision == "main"
    assert spec.engine.cache_mode == "pensieve" and spec.engine.block_size == 32 and spec.engine.port == 8000
    assert spec.engine.image == Settings().engine_image
    assert spec.resources.gpus_per_pod == 1
    assert spec.cache.cpu_cache == "auto" and spec.cache.cpu_cache_bytes is None
    assert spec.cache.gpu_memory_utilization == 0.9 and spec.cache.eviction == "retention"
    assert not spec.autoscaling.enabled and not spec.monitoring.service_monitor
    assert spec.router.replicas == 1 and spec.router.service_type == "ClusterIP"


def test_quantities_and_sources():
    spec = make_spec(cache={"cpuCache": "64Gi"}, model={"source": {"pvc": {"claimName": "weights", "subPath": "llama"}},
                                                        "servedName": "llama"})
    assert spec.cache.cpu_cache_bytes == 64 * 2**30
    assert spec.source.kind == "pvc" and spec.source.claim_name == "weights" and spec.served_name == "llama"


@pytest.mark.parametrize("over, needle", [
    ({"replicas": -1}, "spec.replicas: must be >= 0"),
    ({"replicas": "two"}, "spec.replicas: must be an integer"),
    ({"engine": {"cacheMode": "magic"}}, "spec.engine.cacheMode: must be one of"),
    ({"engine": {"blockSize": 48}}, "spec.engine.blockSize: must be one of [16, 32, 64]"),
    ({"cache": {"cpuCache": "lots"}}, 'spec.cache.cpuCache: must be "auto" or a whole byte quantity'),
    ({"cache": {"gpuMemoryUtilization": 1.5}}, "spec.cache.gpuMemoryUtilization: must be in"),
    ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, "minReplicas (5) must not exceed maxReplicas (2)"),
    ({"model": {"source": {}}}, "exactly one of pvc, hostPath, huggingFace"),
    ({"model": {"source": {"pvc": {"claimName": "a"}, "hostPath": {"path": "/m"}}}}, "exactly one of"),
    ({"model": {"source": {"hostPath": {"path": "relative"}}}}, "must be absolute"),
    ({"engine": {"env": [{"name": "PENSIEVE_CPU_CACHE_BYTES", "value": "1"}]}}, "is set by the operator"),
    ({"engine": {"cacheMode": "none"}, "cache": {"cpuCache": "8Gi"}}, "needs engine.cacheMode pensieve"),
    ({"router": {"serviceType": "Ingress"}}, "spec.router.serviceType: must be one of"),
    ({"resources": {"cpu": "many"}}, "spec.resources.cpu: not a quantity"),
    ({"resources": {"gpusPerPod": 3}, "model": {"source": {"hostPath": {"path": "/m"}}, "numKeyValueHeads": 8}},
     "spec.resources.gpusPerPod: 3 GPUs per pod shard one engine 3 ways (tensor parallelism), which does not "
     "divide the model's 8 KV heads"),
    ({"model": {"source": {"hostPath": {"path": "/m"}}, "numKeyValueHeads": 0}}, "spec.model.numKeyValueHeads: must be >= 1"),
    ({"engine": {"env": [{"name": "PENSIEVE_TENSOR_PARALLEL_SIZE", "value": "2"}]}}, "is set by the operator"),
    ({"engine": {"extraArgs": ["--tensor-parallel-size", "2"]}}, "--tensor-parallel-size is set by the operator"),
])
def test_invalid_specs_are_reported(over, needle):
    with pytest.raises(SpecError) as e:
        make_spec(**over)
    assert any(needle in err for err in e.value.errors), e.value.errors


@pytest.mark.parametrize("gpus, kv_heads, size", [(4, 8, 4), (2, None, 2), (0, 8, 1), (1, 3, 1), (8, 8, 8)])
def test_gpus_per_pod_is_the_tensor_parallel_size(gpus, kv_heads, size):
    model = {"source": {"hostPath": {"path": "/m"}}}
    if kv_heads:
        model["numKeyValueHeads"] = kv_heads
    spec = make_spec(resources={"gpusPerPod": gpus}, model=model)
    assert spec.resources.tensor_parallel_size == size and spec.num_key_value_heads == kv_heads


def test_all_errors_are_collected():
    with pytest.raises(SpecError) as e:
        make_spec(replicas=-3, engine={"cacheMode": "x", "blockSize": 7})
    assert len(e.value.errors) == 3


def test_bad_name():
    body = make_body(name="Not_A_Name")
    with pytest.raises(SpecError, match="metadata.name"):
        parse(body)


def test_missing_model():
    body = make_body()
    del body["spec"]["model"]
    with pytest.raises(SpecError, match="spec.model: required"):
        parse(body)


def test_settings_from_env():
    s = Settings.from_env({"PENSIEVE_OPERATOR_ENGINE_IMAGE": "e:1", "PENSIEVE_OPERATOR_NAMESPACES": "a, b",
                           "PENSIEVE_OPERATOR_ENGINE_MEMORY_OVERHEAD_BYTES": "2Gi",
                           "PENSIEVE_OPERATOR_SERVICE_MONITOR": "false", "PENSIEVE_OPERATOR_RESYNC_SECONDS": "5"})
    assert s.engine_image == "e:1" and s.namespaces == ("a", "b") and s.engine_memory_overhead_bytes == 2 * 2**30
    assert s.service_monitor is False and s.resync_seconds == 5.0
    with pytest.raises(ValueError):
        Settings.from_env({"PENSIEVE_OPERATOR_NODE_MEMORY_RESERVE_FRACTION": "0.95"})
