"""Issue "Operator in production" on a real control plane (see conftest.py): stable sizing,
prompt recovery, honest status, no finalizer, one log line per event, capabilities
re-discovered, and reconcile()'s typed outcome."""
from __future__ import annotations

import json
import time

import pytest

from conftest import H100, wait_for
from pensieve.operator.kube import Kube, raw_request
from pensieve.operator.reconcile import Outcome, reconcile
from pensieve.operator.settings import Settings
from pensieve.operator.status import Refusal
from test_operator_cluster import (ENGINE_SEL, G, P, SAMPLE, V, _start_operator_process, condition, create_pdep,
                                   get_pdep, http_get, wait_ready)

pytestmark = pytest.mark.usefixtures("operator_runner")


def sample(**spec_over):
    body = json.loads(json.dumps(SAMPLE))
    body["spec"]["autoscaling"]["enabled"] = False
    body["spec"].update(spec_over)
    return body


def engine_pods(core, ns):
    return {p.metadata.uid for p in core.list_namespaced_pod(ns, label_selector=ENGINE_SEL.format("chat")).items}


def degraded(co, ns, reason, name="chat"):
    def check():
        o = get_pdep(co, ns, name)
        return o if condition(o, "Degraded").get("reason") == reason else None
    return check


# 1 -------------------------------------------------------------------------------------------------
def test_a_smaller_node_joining_does_not_roll_serving_pods(api, co, apps, core, namespace):
    create_pdep(co, namespace, sample())
    o = wait_ready(co, namespace, "chat", timeout=90)
    applied = o["status"]["sizing"]["podMemoryLimit"]
    dep = apps.read_namespaced_deployment("chat-engine", namespace)
    pods = engine_pods(core, namespace)
    small = "gpu-h100-small"
    core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": small, "labels": {
        "kubernetes.io/hostname": small, "nvidia.com/gpu.product": H100, "nvidia.com/gpu.memory": "81559",
        "nvidia.com/gpu.count": "8"}}})
    try:
        alloc = {"cpu": "96", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": "8"}
        core.patch_node_status(small, {"status": {"capacity": alloc, "allocatable": alloc}})
        # Within a resync the status says what a re-size would give ...
        o = wait_for(lambda: (lambda o: o if (o["status"]["sizing"].get("resize") or {}).get("podMemoryLimit") else None)(
            get_pdep(co, namespace, "chat")), 20, "status.sizing.resize")
        sizing = o["status"]["sizing"]
        assert sizing["kept"] is True and sizing["podMemoryLimit"] == applied
        assert sizing["resize"]["podMemoryLimit"] == "62259Mi"  # 512Gi x 0.95 / 8 pods
        time.sleep(6)  # ... and, a resync later, nothing was rolled.
        after = apps.read_namespaced_deployment("chat-engine", namespace)
        assert after.metadata.generation == dep.metadata.generation
        assert after.spec.template.spec.containers[0].resources.limits["memory"] == applied
        assert engine_pods(core, namespace) == pods
        assert condition(get_pdep(co, namespace, "chat"), "Ready")["status"] == "True"
        # A change of the spec's sizing inputs re-sizes (to what the nodes give now).
        co.patch_namespaced_custom_object(G, V, namespace, P, "chat", {"spec": {"cache": {"gpuMemoryUtilization": 0.85}}})
        wait_for(lambda: apps.read_namespaced_deployment("chat-engine", namespace).spec.template.spec.containers[0]
                 .resources.limits["memory"] == "62259Mi", 20, "re-size after a spec change")
        assert "resize" not in get_pdep(co, namespace, "chat")["status"]["sizing"]
    finally:
        raw_request(api, "DELETE", f"/apis/{G}/{V}/namespaces/{namespace}/{P}/chat")
        core.delete_node(small)


# 2 -------------------------------------------------------------------------------------------------
def test_a_fixed_spec_is_acted_on_at_once(co, namespace, operator_runner, tmp_path):
    """With the production resync period (60 s), fixing a refused spec is acted on within 5 s."""
    operator_runner.stop()
    proc = _start_operator_process(tmp_path, 0, PENSIEVE_OPERATOR_RESYNC_SECONDS="60")
    try:
        create_pdep(co, namespace, sample())
        wait_ready(co, namespace, "chat", timeout=90)
        co.patch_namespaced_custom_object(G, V, namespace, P, "chat", {"spec": {"cache": {"cpuCache": "4Ti"}}})
        wait_for(degraded(co, namespace, "NodesTooSmall"), 10, "Degraded/NodesTooSmall")
        co.patch_namespaced_custom_object(G, V, namespace, P, "chat", {"spec": {"cache": {"cpuCache": "auto"}}})
        t0 = time.time()
        wait_for(degraded(co, namespace, "AsExpected"), 5, "the fixed spec acted on")
        wait_ready(co, namespace, "chat", timeout=5)
        print(f"fixed spec Ready and not Degraded after {time.time() - t0:.2f} s")
    finally:
        proc.terminate()
        proc.wait(10)
        operator_runner.start()


# 4 -------------------------------------------------------------------------------------------------
def test_unfit_edit_keeps_ready_while_old_pods_serve(co, apps, namespace):
    create_pdep(co, namespace, sample())
    wait_ready(co, namespace, "chat", timeout=90)
    before = apps.read_namespaced_deployment("chat-engine", namespace).metadata.generation
    co.patch_namespaced_custom_object(G, V, namespace, P, "chat", {"spec": {"cache": {"cpuCache": "4Ti"}}})
    o = wait_for(degraded(co, namespace, "NodesTooSmall"), 10, "Degraded/NodesTooSmall")
    assert "4" in condition(o, "Degraded")["message"]
    for _ in range(8):  # the old pods still serve: Ready stays True throughout
        o = get_pdep(co, namespace, "chat")
        assert condition(o, "Ready")["status"] == "True", o["status"]
        assert condition(o, "Progressing")["reason"] == "NodesTooSmall"
        time.sleep(0.25)
    assert apps.read_namespaced_deployment("chat-engine", namespace).metadata.generation == before  # untouched


# 3 -------------------------------------------------------------------------------------------------
SERVICE_MONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
             "names": {"kind": "ServiceMonitor", "plural": "servicemonitors", "singular": "servicemonitor",
                       "listKind": "ServiceMonitorList"},
             "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                 "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}}


def test_service_monitor_appears_within_a_resync_after_its_crd(api, co, namespace):
    create_pdep(co, namespace, sample())
    o = wait_ready(co, namespace, "chat", timeout=90)
    assert o["status"]["apiVersions"]["serviceMonitor"] == "none"
    crd_path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    raw_request(api, "POST", crd_path, SERVICE_MONITOR_CRD)
    try:
        t0 = time.time()
        sm = wait_for(lambda: raw_request(api, "GET", f"/apis/monitoring.coreos.com/v1/namespaces/{namespace}/servicemonitors/chat-engine"),
                      5 + 10, "ServiceMonitor within one resync (5 s) of discovery")
        print(f"ServiceMonitor after {time.time() - t0:.1f} s")
        assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
        wait_for(lambda: get_pdep(co, namespace, "chat")["status"]["apiVersions"]["serviceMonitor"] == "monitoring.coreos.com/v1",
                 10, "status.apiVersions.serviceMonitor")
    finally:
        raw_request(api, "DELETE", f"{crd_path}/servicemonitors.monitoring.coreos.com")
    wait_for(lambda: get_pdep(co, namespace, "chat")["status"]["apiVersions"]["serviceMonitor"] == "none", 20,
             "the CRD's removal noticed")


def test_autoscaling_that_cannot_get_its_metric_is_degraded_not_unready(co, namespace, kubectl):
    body = json.loads(json.dumps(SAMPLE))  # autoscaling on; no metrics adapter in this cluster
    body["spec"]["autoscaling"].update(minReplicas=2, maxReplicas=3)
    create_pdep(co, namespace, body)
    o = wait_for(degraded(co, namespace, "AutoscalingInactive"), 60, "Degraded/AutoscalingInactive")
    d = condition(o, "Degraded")
    assert d["status"] == "True" and "ScalingActive=False" in d["message"], d
    o = wait_ready(co, namespace, "chat", timeout=60)
    assert condition(o, "Degraded")["reason"] == "AutoscalingInactive"
    row = kubectl("get", "pdep", "chat", "-n", namespace, "--no-headers").stdout.split()
    assert row[1:3] == ["True", "AutoscalingInactive"], row


# 5 -------------------------------------------------------------------------------------------------
def test_delete_works_with_the_operator_stopped(api, co, core, namespace, operator_runner):
    create_pdep(co, namespace, sample())
    o = wait_ready(co, namespace, "chat", timeout=90)
    assert not o["metadata"].get("finalizers"), o["metadata"]["finalizers"]
    operator_runner.stop()
    try:
        raw_request(api, "DELETE", f"/apis/{G}/{V}/namespaces/{namespace}/{P}/chat")
        wait_for(lambda: not co.list_namespaced_custom_object(G, V, namespace, P)["items"], 15,
                 "the PensieveDeployment gone without the operator")
        wait_for(lambda: not core.list_namespaced_pod(namespace).items, 60, "children collected")
    finally:
        operator_runner.start()


# 6 -------------------------------------------------------------------------------------------------
def test_each_log_line_once_and_log_format_wired(co, namespace, operator_runner, tmp_path):
    operator_runner.stop()
    proc = _start_operator_process(tmp_path, 0, PENSIEVE_OPERATOR_LOG_FORMAT="json")
    try:
        create_pdep(co, namespace, sample())
        wait_ready(co, namespace, "chat", timeout=90)
        time.sleep(1)
    finally:
        proc.terminate()
        proc.wait(10)
        operator_runner.start()
    text = (tmp_path / "operator-0.log").read_text()
    ours = [ln for ln in text.splitlines() if "pensieve operator: API versions" in ln or f"{namespace}/chat Reconciled" in ln]
    messages = [json.loads(ln)["message"] for ln in ours]  # JSON records: the logFormat setting is read
    startup = [m for m in messages if m.startswith("pensieve operator: API versions")]
    created = [m for m in messages if m.startswith(f"{namespace}/chat Reconciled: created ")]
    assert len(startup) == 1, text[-3000:]
    assert len(created) == 1, text[-3000:]


# 8 -------------------------------------------------------------------------------------------------
def test_reconcile_returns_a_typed_outcome(control_plane, co, namespace):
    body = sample(autoscaling={"enabled": True, "minReplicas": 5, "maxReplicas": 2})
    create_pdep(co, namespace, body)
    kube = Kube()
    apis = kube.discover()
    out = reconcile(kube, get_pdep(co, namespace, "chat"), Settings.from_env(), apis)
    assert isinstance(out, Outcome)
    assert isinstance(out.refusal, Refusal) and out.refusal.reason == "InvalidSpec"
    assert "minReplicas (5) must not exceed maxReplicas (2)" in out.refusal.message
    assert out.actions == []
    assert condition({"status": out.status}, "Degraded")["reason"] == "InvalidSpec"
    co.patch_namespaced_custom_object(G, V, namespace, P, "chat", {"spec": {"autoscaling": {"enabled": False, "minReplicas": 1}}})
    o = wait_ready(co, namespace, "chat", timeout=90)
    out = reconcile(kube, o, Settings.from_env(), apis)
    assert out.refusal is None and out.actions == [] and out.events == []  # level-based: nothing to do
    assert condition({"status": out.status}, "Ready")["status"] == "True"


# 9 -------------------------------------------------------------------------------------------------
INFERENCE_POOL_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    # A k8s.io group needs the API-approval annotation, as the project's own CRD carries.
    "metadata": {"name": "inferencepools.inference.networking.k8s.io", "annotations": {
        "api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/gateway-api-inference-extension/pull/1173"}},
    "spec": {"group": "inference.networking.k8s.io", "scope": "Namespaced",
             "names": {"kind": "InferencePool", "plural": "inferencepools", "singular": "inferencepool",
                       "listKind": "InferencePoolList", "shortNames": ["infpool"]},
             "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                           "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}}


def test_inference_pool_reconciled_where_its_crd_is_served(api, co, namespace):
    crd_path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    raw_request(api, "POST", crd_path, INFERENCE_POOL_CRD)
    pool_path = f"/apis/inference.networking.k8s.io/v1/namespaces/{namespace}/inferencepools/chat"
    try:
        create_pdep(co, namespace, sample())
        wait_ready(co, namespace, "chat", timeout=90)
        pool = wait_for(lambda: raw_request(api, "GET", pool_path), 20, "the InferencePool")
        assert pool["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "engine"
        assert pool["spec"]["targetPorts"] == [{"number": 8000}]
        assert pool["spec"]["endpointPickerRef"]["name"] == "chat-epp"
        assert [r["kind"] for r in pool["metadata"]["ownerReferences"]] == ["PensieveDeployment"]
        # (the reconcile that created the pool writes the status after it: an earlier one may have said none)
        wait_for(lambda: get_pdep(co, namespace, "chat")["status"]["apiVersions"]["inferencePool"]
                 == "inference.networking.k8s.io/v1", 20, "status.apiVersions.inferencePool")
        # Drift is repaired (at the next resync: the operator does not watch a CRD that may come and go).
        raw_request(api, "PATCH", pool_path, {"spec": {"targetPorts": [{"number": 1234}]}},
                    content_type="application/merge-patch+json")
        wait_for(lambda: raw_request(api, "GET", pool_path)["spec"]["targetPorts"] == [{"number": 8000}], 15,
                 "the InferencePool patched back")
        # Switched off: removed.
        co.patch_namespaced_custom_object(G, V, namespace, P, "chat", {"spec": {"inferencePool": {"enabled": False}}})
        wait_for(lambda: not raw_request(api, "GET", f"/apis/inference.networking.k8s.io/v1/namespaces/{namespace}/inferencepools")
                 ["items"], 15, "the InferencePool removed")
    finally:
        raw_request(api, "DELETE", f"{crd_path}/inferencepools.inference.networking.k8s.io")


# 7 -------------------------------------------------------------------------------------------------
def test_model_cache_downloads_once_for_scale_up_and_rollout(api, co, apps, core, namespace, tmp_path):
    """A hostPath PersistentVolume stands in for ReadWriteMany storage; the stand-in download Job
    counts itself in the volume."""
    store = tmp_path / "model-cache"
    store.mkdir()
    store.chmod(0o777)
    pv = f"pv-{namespace}"[:63]
    core.create_persistent_volume({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv}, "spec": {
        "capacity": {"storage": "100Gi"}, "accessModes": ["ReadWriteMany", "ReadWriteOnce"], "storageClassName": "",
        "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(store)}}})
    try:
        body = sample(replicas=1)
        body["spec"]["model"]["cache"] = {"size": "20Gi"}
        create_pdep(co, namespace, body)
        seen = set()

        def cache_ready():
            st = get_pdep(co, namespace, "chat").get("status", {}).get("modelCache") or {}
            seen.add(st.get("phase"))
            return st if st.get("phase") == "Ready" else None
        st = wait_for(cache_ready, 90, "status.modelCache Ready")
        assert st["claim"] == "chat-model-cache" and st["job"] == "chat-model-fetch"
        assert st["source"] == "Qwen/Qwen2.5-0.5B-Instruct@main"
        assert seen & {"Pending", "Downloading"}, seen  # the download was seen under way first
        wait_ready(co, namespace, "chat", timeout=90)
        downloads = lambda: (store / ".standin-downloads").read_text().splitlines()  # noqa: E731
        assert len(downloads()) == 1
        assert (store / "model" / "config.json").exists()
        # A second pod, then a rollout (new engine image): both start from the cache, no new download.
        co.patch_namespaced_custom_object(G, V, namespace, P, "chat", {"spec": {"replicas": 2}})
        wait_ready(co, namespace, "chat", timeout=90)
        co.patch_namespaced_custom_object(G, V, namespace, P, "chat", {"spec": {"engine": {"image": "pensieve-engine:v2"}}})
        wait_ready(co, namespace, "chat", timeout=120)
        pods = [p for p in core.list_namespaced_pod(namespace, label_selector=ENGINE_SEL.format("chat")).items
                if not p.metadata.deletion_timestamp]
        assert len(pods) == 2 and all(p.spec.containers[0].image == "pensieve-engine:v2" for p in pods)
        for p in pods:
            env = json.loads(http_get(f"http://{p.status.pod_ip}:8000/debug/env")[1])["env"]
            assert env["PENSIEVE_STANDIN_MOUNTS"] == f"/models={store}"  # the engine reads the claim
        assert len(downloads()) == 1, downloads()
        # A new source (revision) is a new download, and the pods roll onto it.
        co.patch_namespaced_custom_object(G, V, namespace, P, "chat", {"spec": {"model": {"source": {
            "huggingFace": {"id": "Qwen/Qwen2.5-0.5B-Instruct", "revision": "v2"}}}}})
        wait_for(lambda: (get_pdep(co, namespace, "chat")["status"].get("modelCache") or {}).get("source", "").endswith("@v2")
                 and get_pdep(co, namespace, "chat")["status"]["modelCache"]["phase"] == "Ready", 60, "the v2 download")
        wait_ready(co, namespace, "chat", timeout=120)
        assert [d.split()[0] for d in downloads()] == ["Qwen/Qwen2.5-0.5B-Instruct@main", "Qwen/Qwen2.5-0.5B-Instruct@v2"]
    finally:
        raw_request(api, "DELETE", f"/apis/{G}/{V}/namespaces/{namespace}/{P}/chat")
        wait_for(lambda: not core.list_namespaced_persistent_volume_claim(namespace).items, 30, "the claim collected")
        core.delete_persistent_volume(pv)
