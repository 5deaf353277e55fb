import pytest

from pensieve.operator.sizing import compute_sizing

from pdep_helpers import A10, H100, NODES, make_spec, node

GiB, MiB = 2**30, 2**20
RESERVE, OVERHEAD = 0.95, 4 * GiB


def mib_floor(x):
    return int(x) // MiB * MiB


@pytest.mark.parametrize("shape, gpus_per_pod, pods, share, util", [
    ("8xH100", 1, 8, mib_floor(2015 * GiB * RESERVE / 8), 0.9),
    ("8xH100", 2, 4, mib_floor(2015 * GiB * RESERVE / 4), 0.9),
    ("8xH100", 8, 1, mib_floor(2015 * GiB * RESERVE), 0.9),
    ("A10", 1, 1, mib_floor(62 * GiB * RESERVE), 0.9),
    ("T4-sliced-x4", 1, 4, mib_floor(60 * GiB * RESERVE / 4), 0.225),
])
def test_node_shapes(shape, gpus_per_pod, pods, share, util, settings):
    spec = make_spec(replicas=1, resources={"gpusPerPod": gpus_per_pod})
    s = compute_sizing([NODES[shape]()], spec, settings)
    assert s.fits, s.message
    assert s.capacity_pods == pods
    assert s.memory_limit_bytes == s.memory_request_bytes == share
    # one engine process per GPU of the pod (tensor parallelism), each with the engine overhead
    overhead = OVERHEAD * gpus_per_pod
    assert s.cpu_cache_bytes == share - overhead
    assert s.gpu_memory_utilization == pytest.approx(util)
    st = s.to_status()
    assert st["cpuCacheBytes"] == share - overhead and st["explanation"] and st["podMemoryLimit"].endswith("Mi")


def test_time_sliced_explained(settings):
    s = compute_sizing([NODES["T4-sliced-x4"]()], make_spec(), settings)
    assert any("gpu.replicas 4" in line and "time-sliced" in line for line in s.explanation)


def test_node_too_small_for_engine(settings):
    s = compute_sizing([NODES["small"]()], make_spec(), settings)
    assert not s.fits and s.reason == "NodesTooSmall"
    assert "small-0" in s.message and "minimum CPU cache" in s.message


def test_time_sliced_gpu_share_too_small(settings):
    n = node("t4-8", memory="120Gi", gpus=8, product="Tesla-T4", gpu_mib=15360, replicas=8)
    s = compute_sizing([n], make_spec(cache={"gpuMemoryUtilization": 0.5}), settings)
    assert not s.fits and "GPU memory share" in s.message


def test_explicit_cpu_cache_too_big(settings):
    s = compute_sizing([NODES["A10"]()], make_spec(cache={"cpuCache": "500Gi"}), settings)
    assert not s.fits and s.reason == "NodesTooSmall" and "needed" in s.message


def test_explicit_cpu_cache(settings):
    s = compute_sizing([NODES["8xH100"]()], make_spec(cache={"cpuCache": "64Gi"}), settings)
    assert s.fits and s.cpu_cache_bytes == 64 * GiB and s.memory_limit_bytes == 68 * GiB


def test_gpu_only_mode_has_no_cpu_cache(settings):
    s = compute_sizing([NODES["A10"]()], make_spec(engine={"cacheMode": "gpu-only"}), settings)
    assert s.fits and s.cpu_cache_bytes == 0 and s.memory_limit_bytes == OVERHEAD


def test_product_mismatch(settings):
    s = compute_sizing([NODES["8xH100"](), NODES["A10"]()], make_spec(resources={"gpuProduct": "NVIDIA-B200"}), settings)
    assert not s.fits and s.reason == "NoMatchingNodes" and "NVIDIA-B200" in s.message


def test_mixed_cluster_takes_smallest_fitting_share(settings):
    nodes = [NODES["8xH100"](), NODES["A10"](), NODES["small"]()]
    s = compute_sizing(nodes, make_spec(), settings)
    assert s.fits and s.capacity_pods == 9  # 8 + 1; the small node is left out
    assert s.memory_limit_bytes == mib_floor(62 * GiB * RESERVE)
    assert any("small-0: skipped" in line for line in s.explanation)
    only_h100 = compute_sizing(nodes, make_spec(resources={"gpuProduct": H100}), settings)
    assert only_h100.capacity_pods == 8 and only_h100.memory_limit_bytes == mib_floor(2015 * GiB * RESERVE / 8)


def test_node_selector_taints_and_cordon(settings):
    tainted = node("g", memory="62Gi", gpus=1, product=A10, gpu_mib=23028, labels={"pool": "serving"},
                   taints=[{"key": "nvidia.com/gpu", "effect": "NoSchedule"}])
    cordoned = node("c", memory="62Gi", gpus=1, product=A10, gpu_mib=23028, labels={"pool": "serving"}, unschedulable=True)
    other = node("o", memory="62Gi", gpus=1, product=A10, gpu_mib=23028, labels={"pool": "batch"})
    spec = make_spec(resources={"nodeSelector": {"pool": "serving"}})
    assert not compute_sizing([tainted, cordoned, other], spec, settings).fits
    tol = make_spec(resources={"nodeSelector": {"pool": "serving"},
                               "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]})
    s = compute_sizing([tainted, cordoned, other], tol, settings)
    assert s.fits and s.capacity_pods == 1 and [n.name for n in s.nodes if n.fits] == ["g"]


def test_tensor_parallel_pod_counts_every_rank(settings):
    """gpusPerPod 4: one engine of 4 processes; an explicit CPU cache is the whole pod's."""
    s = compute_sizing([NODES["8xH100"]()], make_spec(resources={"gpusPerPod": 4}, cache={"cpuCache": "64Gi"}),
                       settings)
    assert s.fits and s.capacity_pods == 2
    assert s.cpu_cache_bytes == 64 * GiB and s.memory_limit_bytes == 64 * GiB + 4 * OVERHEAD
    assert any("× 4" in line and "tensor-parallel" in line for line in s.explanation)
    none = compute_sizing([NODES["8xH100"]()], make_spec(resources={"gpusPerPod": 4}, engine={"cacheMode": "none"}),
                          settings)
    assert none.memory_limit_bytes == 4 * OVERHEAD and none.cpu_cache_bytes == 0


def test_not_enough_gpus(settings):
    s = compute_sizing([NODES["A10"]()], make_spec(resources={"gpusPerPod": 2}), settings)
    assert not s.fits and "pod needs 2" in s.message


def test_more_replicas_than_capacity_warns(settings):
    s = compute_sizing([NODES["A10"]()], make_spec(replicas=3), settings)
    assert s.fits and s.warnings and "3 replicas requested" in s.warnings[0]


def test_cpu_only_pods(settings):
    s = compute_sizing([NODES["cpu"]()], make_spec(resources={"gpusPerPod": 0}), settings)
    assert s.fits and s.memory_limit_bytes == 8 * GiB and s.cpu_cache_bytes == 4 * GiB and s.capacity_pods == 3


def test_no_nodes(settings):
    s = compute_sizing([], make_spec(), settings)
    assert not s.fits and s.reason == "NoMatchingNodes"
