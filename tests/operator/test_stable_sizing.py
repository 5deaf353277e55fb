"""Stable sizing: the applied size is kept while the spec's sizing inputs are unchanged and it
places the wanted replicas; a smaller node joining only shows up as status.sizing.resize."""
from pensieve.operator.render import render_engine_deployment
from pensieve.operator.sizing import SIZING_ANNOTATION, AppliedSize, compute_sizing, sizing_inputs, stable_sizing

from pdep_helpers import H100, NODES, make_spec, node

GiB = 2**30


def applied_from_render(spec, sizing, settings):
    return AppliedSize.from_deployment(render_engine_deployment(spec, sizing, settings))


def test_a_smaller_node_joining_keeps_the_applied_size(settings):
    spec = make_spec(replicas=2, resources={"gpuProduct": H100})
    big = [NODES["8xH100"]("h100-0"), NODES["8xH100"]("h100-1")]
    first = stable_sizing(compute_sizing(big, spec, settings), None, spec)
    applied = applied_from_render(spec, first, settings)
    assert applied is not None and applied.memory_bytes == first.memory_limit_bytes
    small = node("h100-small", memory="512Gi", gpus=8, product=H100, gpu_mib=81559)
    fresh = compute_sizing(big + [small], spec, settings)
    assert fresh.memory_limit_bytes < first.memory_limit_bytes  # what today's sizing would roll the pods to
    kept = stable_sizing(fresh, applied, spec)
    assert kept.kept and kept.memory_limit_bytes == first.memory_limit_bytes
    assert kept.cpu_cache_bytes == first.cpu_cache_bytes
    assert kept.capacity_pods == 16 + 2  # the small node holds two pods of the kept size
    st = kept.to_status()
    assert st["kept"] is True and st["resize"]["podMemoryLimit"] == fresh.to_status()["podMemoryLimit"]
    assert st["resize"]["capacityPods"] == 24
    assert render_engine_deployment(spec, kept, settings) == render_engine_deployment(spec, first, settings)


def test_resize_on_spec_change(settings):
    spec = make_spec(replicas=2, resources={"gpuProduct": H100})
    nodes = [NODES["8xH100"]("h100-0")]
    applied = applied_from_render(spec, compute_sizing(nodes, spec, settings), settings)
    changed = make_spec(replicas=2, resources={"gpuProduct": H100}, cache={"cpuCache": "64Gi"})
    assert sizing_inputs(changed) != sizing_inputs(spec)
    s = stable_sizing(compute_sizing(nodes, changed, settings), applied, changed)
    assert not s.kept and s.cpu_cache_bytes == 64 * GiB
    # Replicas alone (the HPA) never re-size.
    assert sizing_inputs(make_spec(replicas=7, resources={"gpuProduct": H100})) == sizing_inputs(spec)


def test_resize_when_the_kept_size_cannot_place_the_replicas(settings):
    spec = make_spec(replicas=8, resources={"gpuProduct": H100})
    big = [NODES["8xH100"]("h100-0")]
    applied = applied_from_render(spec, compute_sizing(big, spec, settings), settings)
    # The big node leaves; two small ones come: the kept size places no pod there.
    small = [node(f"h100-s{i}", memory="512Gi", gpus=8, product=H100, gpu_mib=81559) for i in range(2)]
    s = stable_sizing(compute_sizing(small, spec, settings), applied, spec)
    assert not s.kept and s.capacity_pods == 16 and s.memory_limit_bytes < applied.memory_bytes
    assert "re-sized" in s.explanation[-1]


def test_unreadable_annotation_sizes_afresh():
    assert AppliedSize.from_deployment({"metadata": {"annotations": {SIZING_ANNOTATION: "{bad"}}}) is None
    assert AppliedSize.from_deployment(None) is None
