"""Issue 6 acceptance on a real control plane (see conftest.py)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from conftest import ROOT, wait_for
from pensieve.operator.kube import raw_request

G, V, P = "pensieve.ai", "v1alpha1", "pensievedeployments"
SAMPLE = yaml.safe_load((ROOT / "manifests" / "samples" / "pensieve.yaml").read_text())
ENGINE_SEL = "app.kubernetes.io/instance={},app.kubernetes.io/component=engine"

pytestmark = pytest.mark.usefixtures("operator_runner")


def create_pdep(co, ns, body):
    body = json.loads(json.dumps(body))
    body["metadata"]["namespace"] = ns
    return co.create_namespaced_custom_object(G, V, ns, P, body)


def get_pdep(co, ns, name):
    return co.get_namespaced_custom_object(G, V, ns, P, name)


def condition(obj, type_):
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def wait_ready(co, ns, name, timeout=60, generation=None):
    """Ready (serving) and the rollout of the current generation complete."""
    def ok():
        o = get_pdep(co, ns, name)
        gen = generation or o["metadata"]["generation"]
        return o if (condition(o, "Ready").get("status") == "True" and condition(o, "Progressing").get("reason") == "Complete"
                     and o["status"].get("observedGeneration") == gen) else None
    try:
        return wait_for(ok, timeout, f"{ns}/{name} Ready")
    except AssertionError as e:
        o = get_pdep(co, ns, name)
        pods = client.CoreV1Api(co.api_client).list_namespaced_pod(ns).items
        pod_info = [(p.metadata.name, p.spec.node_name, p.status.phase, p.status.pod_ip) for p in pods]
        raise AssertionError(f"{e}\nstatus: {json.dumps(o.get('status'), indent=1)[:3000]}\npods: {pod_info}") from None


def child_set(api, ns, name):
    """{kind/name: (uid, resourceVersion, generation)} of everything owned by the PensieveDeployment."""
    sel = f"app.kubernetes.io/instance={name},app.kubernetes.io/managed-by=pensieve-operator"
    core, apps_, rbac = client.CoreV1Api(api), client.AppsV1Api(api), client.RbacAuthorizationV1Api(api)
    out = {}
    lists = [("ConfigMap", core.list_namespaced_config_map), ("Service", core.list_namespaced_service),
             ("ServiceAccount", core.list_namespaced_service_account), ("Deployment", apps_.list_namespaced_deployment),
             ("StatefulSet", apps_.list_namespaced_stateful_set),
             ("Role", rbac.list_namespaced_role), ("RoleBinding", rbac.list_namespaced_role_binding)]
    for kind, fn in lists:
        for o in fn(ns, label_selector=sel).items:
            out[f"{kind}/{o.metadata.name}"] = (o.metadata.uid, o.metadata.resource_version, o.metadata.generation)
    for kind, path in (("PodDisruptionBudget", f"/apis/policy/v1beta1/namespaces/{ns}/poddisruptionbudgets"),
                       ("HorizontalPodAutoscaler", f"/apis/autoscaling/v2beta2/namespaces/{ns}/horizontalpodautoscalers")):
        items = raw_get(api, path + f"?labelSelector={sel}")["items"]
        for o in items:
            m = o["metadata"]
            out[f"{kind}/{m['name']}"] = (m["uid"], m["resourceVersion"], m.get("generation"))
    return out


def raw_get(api, path):
    path, _, q = path.partition("?")
    query = [tuple(kv.split("=", 1)) for kv in q.split("&")] if q else None
    return raw_request(api, "GET", path, query=query)


def http_get(url, timeout=2):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


# ---------------------------------------------------------------------------------------------------
def test_sample_creates_every_child_and_turns_ready(api, co, apps, core, namespace, kubectl):
    obj = create_pdep(co, namespace, SAMPLE)
    uid = obj["metadata"]["uid"]
    o = wait_ready(co, namespace, "chat", timeout=90)
    kids = child_set(api, namespace, "chat")
    assert set(kids) == {"ConfigMap/chat-engine", "Service/chat-engine", "Deployment/chat-engine", "PodDisruptionBudget/chat-engine",
                         "ServiceAccount/chat-router", "RoleBinding/chat-router", "Deployment/chat-router",
                         "Service/chat", "HorizontalPodAutoscaler/chat"}
    # Owner references and labels on every child.
    dep = apps.read_namespaced_deployment("chat-engine", namespace)
    for ref in [dep.metadata.owner_references, core.read_namespaced_service("chat", namespace).metadata.owner_references,
                core.read_namespaced_config_map("chat-engine", namespace).metadata.owner_references]:
        assert [(r.kind, r.name, r.uid, r.controller) for r in ref] == [("PensieveDeployment", "chat", uid, True)]
    assert dep.metadata.labels["app.kubernetes.io/managed-by"] == "pensieve-operator"
    assert dep.metadata.labels["app.kubernetes.io/part-of"] == "pensieve"
    # The engine Deployment's spec carries the sizing computed from the fake H100 nodes.
    st = o["status"]
    sizing = st["sizing"]
    assert sizing["fits"] and sizing["nodesFitting"] == 2 and sizing["capacityPods"] == 16
    c = dep.spec.template.spec.containers[0]
    assert c.resources.limits["nvidia.com/gpu"] == "1"
    assert c.resources.limits["memory"] == c.resources.requests["memory"] == sizing["podMemoryLimit"]
    assert dep.spec.template.spec.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert dep.spec.replicas == 2 and st["replicas"] == 2 and st["readyReplicas"] == 2
    assert st["endpoint"] == f"http://chat.{namespace}.svc"
    assert st["selector"] == "app.kubernetes.io/component=engine,app.kubernetes.io/instance=chat,app.kubernetes.io/name=pensieve"
    assert st["apiVersions"]["horizontalPodAutoscaler"] == "autoscaling/v2beta2"
    assert st["apiVersions"]["podDisruptionBudget"] == "policy/v1beta1"
    assert st["apiVersions"]["serviceMonitor"] == "none"  # asked for, but no such CRD here
    # Pods were placed on H100 nodes only, and carry the engine env with the computed sizes.
    pods = core.list_namespaced_pod(namespace, label_selector=ENGINE_SEL.format("chat")).items
    assert len(pods) == 2 and all(p.spec.node_name.startswith("gpu-h100") for p in pods)
    ip = pods[0].status.pod_ip
    assert not ip.startswith("127.")
    code, body = http_get(f"http://{ip}:8000/debug/env")
    env = json.loads(body)["env"]
    assert env["PENSIEVE_CPU_CACHE_BYTES"] == str(sizing["cpuCacheBytes"])
    assert env["PENSIEVE_GPU_MEMORY_UTILIZATION"] == str(sizing["gpuMemoryUtilization"])
    code, metrics = http_get(f"http://{ip}:8000/metrics")
    assert "pensieve_num_requests_waiting" in metrics
    # The headless Service's EndpointSlices list the ready engine pods: what the router discovers.
    def slice_ips():
        items = raw_get(api, f"/apis/discovery.k8s.io/v1beta1/namespaces/{namespace}/endpointslices"
                             f"?labelSelector=kubernetes.io/service-name=chat-engine")["items"]
        return sorted(a for s in items for e in s.get("endpoints") or [] if (e.get("conditions") or {}).get("ready")
                      for a in e["addresses"])
    assert wait_for(lambda: slice_ips() == sorted(p.status.pod_ip for p in pods) and slice_ips(), 30, "EndpointSlices")
    # Printer columns.
    out = kubectl("get", "pdep", "-n", namespace).stdout
    assert out.split("\n")[0].split() == ["NAME", "READY", "DEGRADED", "REPLICAS", "ENDPOINT", "AGE"]
    row = out.split("\n")[1].split()
    assert row[:2] == ["chat", "True"] and row[3:5] == ["2/2", f"http://chat.{namespace}.svc"]


def test_spec_changes_are_followed(api, co, apps, core, namespace):
    body = json.loads(json.dumps(SAMPLE))
    body["spec"]["autoscaling"]["enabled"] = False
    create_pdep(co, namespace, body)
    wait_ready(co, namespace, "chat", timeout=90)
    old_hash = apps.read_namespaced_deployment("chat-engine", namespace).spec.template.metadata.annotations["pensieve.ai/config-hash"]
    co.patch_namespaced_custom_object(G, V, namespace, P, "chat", {"spec": {
        "replicas": 3, "cache": {"cpuCache": "64Gi"}, "engine": {"image": "pensieve-engine:v2"}}})
    o = wait_ready(co, namespace, "chat", timeout=90)
    dep = apps.read_namespaced_deployment("chat-engine", namespace)
    c = dep.spec.template.spec.containers[0]
    assert dep.spec.replicas == 3 and c.image == "pensieve-engine:v2"
    assert c.resources.limits["memory"] == "68Gi"  # 64Gi cache + 4Gi engine overhead
    assert core.read_namespaced_config_map("chat-engine", namespace).data["PENSIEVE_CPU_CACHE_BYTES"] == str(64 * 2**30)
    assert dep.spec.template.metadata.annotations["pensieve.ai/config-hash"] != old_hash
    assert o["status"]["sizing"]["cpuCacheBytes"] == 64 * 2**30 and o["status"]["readyReplicas"] == 3
    # Router settings follow too.
    co.patch_namespaced_custom_object(G, V, namespace, P, "chat", {"spec": {"router": {"replicas": 2, "serviceType": "NodePort"}}})
    wait_for(lambda: apps.read_namespaced_deployment("chat-router", namespace).spec.replicas == 2, 30, "router replicas")
    wait_for(lambda: core.read_namespaced_service("chat", namespace).spec.type == "NodePort", 30, "router Service type")


def test_deleted_children_are_recreated(api, co, apps, core, namespace):
    create_pdep(co, namespace, SAMPLE)
    wait_ready(co, namespace, "chat", timeout=90)
    before = child_set(api, namespace, "chat")
    for path in (f"/api/v1/namespaces/{namespace}/services/chat-engine", f"/api/v1/namespaces/{namespace}/configmaps/chat-engine",
                 f"/apis/apps/v1/namespaces/{namespace}/deployments/chat-router"):
        raw_request(api, "DELETE", path)
    def recreated():
        after = child_set(api, namespace, "chat")
        return all(k in after and after[k][0] != before[k][0]
                   for k in ("Service/chat-engine", "ConfigMap/chat-engine", "Deployment/chat-router"))
    wait_for(recreated, 30, "deleted children recreated")
    after = child_set(api, namespace, "chat")
    assert after["Deployment/chat-engine"][0] == before["Deployment/chat-engine"][0]  # untouched
    wait_ready(co, namespace, "chat", timeout=60)


def test_drifted_child_is_patched_back(co, apps, namespace):
    body = json.loads(json.dumps(SAMPLE))
    body["spec"]["autoscaling"]["enabled"] = False
    create_pdep(co, namespace, body)
    wait_ready(co, namespace, "chat", timeout=90)
    apps.patch_namespaced_deployment("chat-engine", namespace, {"spec": {"replicas": 5}})
    wait_for(lambda: apps.read_namespaced_deployment("chat-engine", namespace).spec.replicas == 2, 30, "replicas restored")


def test_invalid_specs_rejected_by_schema(co, namespace):
    for spec_over, needle in [({"replicas": -1}, "spec.replicas"), ({"engine": {"cacheMode": "magic"}}, "spec.engine.cacheMode"),
                              ({"engine": {"blockSize": 48}}, "spec.engine.blockSize"), ({"cache": {"cpuCache": "lots"}}, "spec.cache.cpuCache"),
                              ({"model": {"source": {}}}, "spec.model.source")]:
        body = json.loads(json.dumps(SAMPLE))
        body["metadata"]["name"] = "bad"
        body["spec"].update(spec_over)
        with pytest.raises(ApiException) as e:
            create_pdep(co, namespace, body)
        assert e.value.status == 422 and needle in e.value.body, e.value.body


@pytest.mark.parametrize("spec_over, reason, needle", [
    ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, "InvalidSpec", "minReplicas (5) must not exceed maxReplicas (2)"),
    ({"resources": {"gpusPerPod": 1, "gpuProduct": "NVIDIA-B200"}}, "NoMatchingNodes", "NVIDIA-B200"),
    ({"cache": {"cpuCache": "600Gi"}, "resources": {"gpusPerPod": 1, "gpuProduct": "NVIDIA-A10"}}, "NodesTooSmall", "gpu-a10-0"),
    ({"model": {**SAMPLE["spec"]["model"], "numKeyValueHeads": 2}, "resources": {"gpusPerPod": 4}}, "InvalidSpec",
     "does not divide the model's 2 KV heads"),
])
def test_invalid_specs_reported_degraded(api, co, apps, core, namespace, spec_over, reason, needle):
    body = json.loads(json.dumps(SAMPLE))
    body["metadata"]["name"] = "bad"
    body["spec"].update(spec_over)
    create_pdep(co, namespace, body)
    def degraded():
        o = get_pdep(co, namespace, "bad")
        d = condition(o, "Degraded")
        return o if d.get("status") == "True" and d.get("reason") == reason else None
    o = wait_for(degraded, 30, f"Degraded/{reason}")
    assert needle in condition(o, "Degraded")["message"]
    assert condition(o, "Ready")["status"] == "False"
    assert child_set(api, namespace, "bad") == {}  # no children touched
    events = wait_for(lambda: [e for e in core.list_namespaced_event(namespace).items
                               if e.involved_object.name == "bad" and e.type == "Warning" and e.reason == reason], 20, "warning event")
    assert needle in events[0].message


def test_scale_subresource_and_kubectl_scale(api, co, apps, namespace, kubectl):
    body = json.loads(json.dumps(SAMPLE))
    body["spec"]["autoscaling"]["enabled"] = False
    create_pdep(co, namespace, body)
    wait_ready(co, namespace, "chat", timeout=90)
    scale = co.get_namespaced_custom_object_scale(G, V, namespace, P, "chat")
    assert scale["spec"]["replicas"] == 2 and scale["status"]["replicas"] == 2
    assert scale["status"]["selector"] == "app.kubernetes.io/component=engine,app.kubernetes.io/instance=chat,app.kubernetes.io/name=pensieve"
    kubectl("scale", "-n", namespace, "pdep/chat", "--replicas=3")
    wait_for(lambda: apps.read_namespaced_deployment("chat-engine", namespace).spec.replicas == 3, 30, "kubectl scale → 3")
    co.patch_namespaced_custom_object_scale(G, V, namespace, P, "chat", {"spec": {"replicas": 1}})
    wait_for(lambda: apps.read_namespaced_deployment("chat-engine", namespace).spec.replicas == 1, 30, "scale patch → 1")
    o = wait_ready(co, namespace, "chat", timeout=60)
    assert o["status"]["replicas"] == 1


def test_hpa_targets_the_scale_subresource(api, co, apps, namespace):
    body = json.loads(json.dumps(SAMPLE))
    body["spec"]["replicas"] = 1
    body["spec"]["autoscaling"].update(minReplicas=3, maxReplicas=5)
    create_pdep(co, namespace, body)
    hpa = wait_for(lambda: raw_get(api, f"/apis/autoscaling/v2beta2/namespaces/{namespace}/horizontalpodautoscalers/chat"), 30, "HPA")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "pensieve.ai/v1alpha1", "kind": "PensieveDeployment", "name": "chat"}
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "pensieve_num_requests_waiting"
    # The controller manager's HPA controller raises replicas to minReplicas through the scale subresource;
    # the operator carries it to the engine Deployment.
    wait_for(lambda: get_pdep(co, namespace, "chat")["spec"]["replicas"] == 3, 60, "HPA scaled the PensieveDeployment")
    wait_for(lambda: apps.read_namespaced_deployment("chat-engine", namespace).spec.replicas == 3, 30, "engine Deployment follows")
    # Switching autoscaling off removes the HPA the operator owns.
    co.patch_namespaced_custom_object(G, V, namespace, P, "chat", {"spec": {"autoscaling": {"enabled": False}}})
    wait_for(lambda: "HorizontalPodAutoscaler/chat" not in child_set(api, namespace, "chat"), 30, "HPA removed")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_operator_process(tmp_path: Path, n: int, **env_over: str):
    port = _free_port()
    env = dict(os.environ, PENSIEVE_OPERATOR_LIVENESS=f"127.0.0.1:{port}", **env_over)
    log = open(tmp_path / f"operator-{n}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pensieve.operator"], env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_for(lambda: http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200, 60, "operator liveness probe")
    code, body = http_get(f"http://127.0.0.1:{port}/healthz")
    assert "apiVersions" in body
    return proc


def test_operator_killed_and_restarted_does_not_churn(api, co, namespace, operator_runner, tmp_path):
    create_pdep(co, namespace, SAMPLE)
    wait_ready(co, namespace, "chat", timeout=90)
    time.sleep(2)
    before = child_set(api, namespace, "chat")
    operator_runner.stop()
    try:
        for n in range(2):
            proc = _start_operator_process(tmp_path, n)
            time.sleep(7)  # resume handlers plus one resync period
            proc.send_signal(signal.SIGKILL)  # killed, not stopped
            proc.wait()
            after = child_set(api, namespace, "chat")
            assert set(after) == set(before), "children added or removed"
            for k, (uid, rv, gen) in before.items():
                assert after[k][0] == uid, f"{k} was recreated"
                assert after[k][2] == gen, f"{k} spec was rewritten"
                if not k.startswith(("Deployment/", "StatefulSet/", "HorizontalPodAutoscaler/")):  # controllers write status
                    assert after[k][1] == rv, f"{k} was patched"
            log = (tmp_path / f"operator-{n}.log").read_text()
            assert "Reconciled:" not in log, log[-2000:]
    finally:
        operator_runner.start()
    assert condition(get_pdep(co, namespace, "chat"), "Ready")["status"] == "True"


def test_deleting_the_pensievedeployment_collects_children(api, co, core, namespace):
    create_pdep(co, namespace, SAMPLE)
    wait_ready(co, namespace, "chat", timeout=90)
    assert child_set(api, namespace, "chat")
    raw_request(api, "DELETE", f"/apis/{G}/{V}/namespaces/{namespace}/{P}/chat")
    wait_for(lambda: child_set(api, namespace, "chat") == {}, 60, "garbage collection of the children")
    wait_for(lambda: not core.list_namespaced_pod(namespace).items, 60, "pods gone")


def test_foreign_object_is_never_touched(api, co, core, namespace):
    foreign = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "chat-engine", "labels": {"team": "other"}},
               "data": {"owner": "someone else"}}
    before = raw_request(api, "POST", f"/api/v1/namespaces/{namespace}/configmaps", foreign)
    body = json.loads(json.dumps(SAMPLE))
    body["spec"]["autoscaling"]["enabled"] = False
    create_pdep(co, namespace, body)
    def conflict():
        d = condition(get_pdep(co, namespace, "chat"), "Degraded")
        return d if d.get("reason") == "ChildConflict" else None
    d = wait_for(conflict, 30, "Degraded/ChildConflict")
    assert "ConfigMap/chat-engine exists and is not owned" in d["message"]
    time.sleep(6)  # a resync later, still untouched
    after = raw_request(api, "GET", f"/api/v1/namespaces/{namespace}/configmaps/chat-engine")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert after["data"] == {"owner": "someone else"} and "ownerReferences" not in after["metadata"]
