import pytest

from pensieve.operator.discovery import ApiRef, ApiVersions, choose_versions
from pensieve.operator.reconcile import drift_patch, is_subset
from pensieve.operator.render import (POD_DELETION_COST, config_hash, endpoint_url, engine_env, pod_deletion_cost_patch,
                                      render_children, selector_string)
from pensieve.operator.sizing import compute_sizing

from pdep_helpers import H100, NODES, make_body, make_spec

OWNER = make_body()


def apis(old=True, monitoring=False):
    served = {
        ("autoscaling", "v2beta2" if old else "v2"): ["horizontalpodautoscalers"],
        ("policy", "v1beta1" if old else "v1"): ["poddisruptionbudgets"],
        ("discovery.k8s.io", "v1beta1" if old else "v1"): ["endpointslices"],
    }
    if monitoring:
        served[("monitoring.coreos.com", "v1")] = ["servicemonitors", "podmonitors"]
    return choose_versions(lambda g, v: served.get((g, v)))


def render(settings, nodes=None, old=True, sm_crd=False, **over):
    spec = make_spec(settings, **over)
    sizing = compute_sizing(nodes or [NODES["8xH100"]()], spec, settings)
    assert sizing.fits
    children, absent, notes = render_children(spec, sizing, settings, apis(old, sm_crd), owner=OWNER)
    return spec, sizing, {c.key: c for c in children}, absent, notes


def test_discovery_prefers_newest():
    assert apis(old=True).to_status() == {"horizontalPodAutoscaler": "autoscaling/v2beta2", "podDisruptionBudget": "policy/v1beta1",
                                          "endpointSlice": "discovery.k8s.io/v1beta1", "serviceMonitor": "none",
                                          "inferencePool": "none"}
    new = apis(old=False, monitoring=True)
    assert new.hpa.api_version == "autoscaling/v2" and new.pdb.api_version == "policy/v1" and new.service_monitor
    both = choose_versions(lambda g, v: {"autoscaling": ["horizontalpodautoscalers"], "policy": ["poddisruptionbudgets"],
                                         "discovery.k8s.io": ["endpointslices"]}.get(g))
    assert both.hpa.version == "v2" and both.pdb.version == "v1"
    assert ApiRef("apps", "v1", "deployments", "Deployment").path("ns", "x", "scale") == "/apis/apps/v1/namespaces/ns/deployments/x/scale"


def test_children_labels_and_owner(settings):
    spec, sizing, ch, absent, _ = render(settings)
    assert set(ch) == {"ConfigMap/chat-engine", "Service/chat-engine", "Deployment/chat-engine", "PodDisruptionBudget/chat-engine",
                       "ServiceAccount/chat-router", "RoleBinding/chat-router", "Deployment/chat-router",
                       "Service/chat", "NetworkPolicy/chat-engine"}
    for c in ch.values():
        meta = c.body["metadata"]
        assert meta["namespace"] == "default"
        assert meta["labels"]["app.kubernetes.io/instance"] == "chat"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "pensieve-operator"
        assert meta["ownerReferences"] == [{"apiVersion": "pensieve.ai/v1alpha1", "kind": "PensieveDeployment", "name": "chat",
                                            "uid": "uid-1", "controller": True, "blockOwnerDeletion": True}]
    assert {(a.kind, n) for a, n in absent} == {("HorizontalPodAutoscaler", "chat"), ("Job", "chat-model-fetch"),
                                                ("PersistentVolumeClaim", "chat-model-cache"),
                                                ("StatefulSet", "chat-sessions"), ("Service", "chat-sessions")}


def test_engine_deployment(settings):
    spec, sizing, ch, _, _ = render(settings, resources={"gpusPerPod": 2, "gpuProduct": H100},
                                    engine={"extraArgs": ["--max-num-batched-tokens", "4096"], "drainSeconds": 30})
    dep = ch["Deployment/chat-engine"].body
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"] == ["python", "-m", "pensieve.engine", "serve"]
    assert c["args"] == ["--model", "/models/model", "--max-num-batched-tokens", "4096"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert c["resources"]["limits"]["memory"] == c["resources"]["requests"]["memory"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready" and c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(settings.prestop_seconds)]
    assert pod["terminationGracePeriodSeconds"] == settings.prestop_seconds + 30 + 5
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": H100}
    assert pod["initContainers"][0]["name"] == "fetch-model"
    assert dep["spec"]["template"]["metadata"]["annotations"]["pensieve.ai/config-hash"] == config_hash(engine_env(spec, sizing))
    env = ch["ConfigMap/chat-engine"].body["data"]
    assert env["PENSIEVE_CPU_CACHE_BYTES"] == str(sizing.cpu_cache_bytes)
    assert env["PENSIEVE_GPU_MEMORY_UTILIZATION"] == "0.9"
    assert env["PENSIEVE_CACHE_MODE"] == "pensieve" and env["PENSIEVE_BLOCK_SIZE"] == "32"


def test_model_sources(settings):
    _, _, ch, _, _ = render(settings, model={"source": {"pvc": {"claimName": "w", "subPath": "m"}}})
    pod = ch["Deployment/chat-engine"].body["spec"]["template"]["spec"]
    assert pod["volumes"][0] == {"name": "model", "persistentVolumeClaim": {"claimName": "w", "readOnly": True}}
    assert pod["containers"][0]["volumeMounts"][0]["subPath"] == "m" and "initContainers" not in pod
    _, _, ch, _, _ = render(settings, model={"source": {"hostPath": {"path": "/data/m"}}})
    assert ch["Deployment/chat-engine"].body["spec"]["template"]["spec"]["volumes"][0]["hostPath"]["path"] == "/data/m"


def test_services_router_and_selector(settings):
    spec, _, ch, _, _ = render(settings, router={"serviceType": "LoadBalancer", "replicas": 2})
    headless = ch["Service/chat-engine"].body["spec"]
    assert headless["clusterIP"] == "None" and headless["selector"]["app.kubernetes.io/component"] == "engine"
    assert ch["Service/chat"].body["spec"]["type"] == "LoadBalancer"
    router = ch["Deployment/chat-router"].body["spec"]
    assert router["replicas"] == 2
    rc = router["template"]["spec"]["containers"][0]
    assert rc["command"] == ["python", "-m", "pensieve.router"]
    assert {"name": "PENSIEVE_ROUTER_SERVICE", "value": "chat-engine"} in rc["env"]
    binding = ch["RoleBinding/chat-router"].body
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "pensieve-router"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "chat-router", "namespace": "default"}]
    assert not any(k.startswith(("Role/", "ClusterRole")) for k in ch)  # no Role is made at run time
    assert endpoint_url(spec) == "http://chat.default.svc"
    assert selector_string("chat") == "app.kubernetes.io/component=engine,app.kubernetes.io/instance=chat,app.kubernetes.io/name=pensieve"


@pytest.mark.parametrize("old", [True, False])
def test_hpa_targets_scale_subresource(settings, old):
    _, _, ch, absent, _ = render(settings, old=old, autoscaling={"enabled": True, "minReplicas": 2, "maxReplicas": 6, "target": "3"})
    hpa = ch["HorizontalPodAutoscaler/chat"].body
    assert hpa["apiVersion"] == ("autoscaling/v2beta2" if old else "autoscaling/v2")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "pensieve.ai/v1alpha1", "kind": "PensieveDeployment", "name": "chat"}
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "pensieve_num_requests_waiting"
    assert ch["PodDisruptionBudget/chat-engine"].body["apiVersion"] == ("policy/v1beta1" if old else "policy/v1")
    assert not any(a.kind == "HorizontalPodAutoscaler" for a, _ in absent)


def test_service_monitor_only_where_crd_exists(settings):
    _, _, ch, _, notes = render(settings, sm_crd=False, **{"monitoring": {"serviceMonitor": True}})
    assert not any(k.startswith("ServiceMonitor") for k in ch) and "ServiceMonitor" in notes[0]
    _, _, ch, _, _ = render(settings, old=False, **{"monitoring": {"serviceMonitor": True}})
    assert not any(k.startswith("ServiceMonitor") for k in ch)  # served() said no monitoring group
    spec = make_spec(settings, monitoring={"serviceMonitor": True})
    sizing = compute_sizing([NODES["A10"]()], spec, settings)
    children, _, _ = render_children(spec, sizing, settings, apis(old=False, monitoring=True), owner=OWNER)
    sm = {c.key: c for c in children}["ServiceMonitor/chat-engine"].body
    assert sm["spec"]["endpoints"][0] == {"port": "http", "path": "/metrics", "interval": "15s"}


def test_cpu_cache_change_rolls_pods(settings):
    _, _, a, _, _ = render(settings, cache={"cpuCache": "64Gi"})
    _, _, b, _, _ = render(settings, cache={"cpuCache": "96Gi"})
    ann = lambda ch: ch["Deployment/chat-engine"].body["spec"]["template"]["metadata"]["annotations"]["pensieve.ai/config-hash"]
    assert ann(a) != ann(b)


def test_drift_detection_ignores_server_defaults():
    desired = {"apiVersion": "v1", "kind": "X", "metadata": {"name": "a", "labels": {"l": "1"}},
               "spec": {"replicas": 2, "template": {"spec": {"nodeSelector": {"a": "1"}, "containers": [
                   {"name": "c", "resources": {"limits": {"memory": "1024Mi", "cpu": "0.5"}}}]}}}}
    actual = {"metadata": {"name": "a", "labels": {"l": "1", "extra": "x"}, "uid": "u"},
              "spec": {"replicas": 2, "revisionHistoryLimit": 10, "template": {"spec": {"nodeSelector": {"a": "1"}, "containers": [
                  {"name": "c", "terminationMessagePath": "/dev/x", "resources": {"limits": {"memory": "1Gi", "cpu": "500m"}}}]}}}}
    assert drift_patch(desired, actual) is None
    actual["spec"]["template"]["spec"]["nodeSelector"]["stale"] = "1"
    patch = drift_patch(desired, actual)
    assert patch["spec"]["template"]["spec"]["nodeSelector"] == {"a": "1", "stale": None}
    actual["spec"]["template"]["spec"]["nodeSelector"].pop("stale")
    actual["spec"]["replicas"] = 5
    assert drift_patch(desired, actual)["spec"]["replicas"] == 2
    assert is_subset({"a": [1, 2]}, {"a": [1, 2]}) and not is_subset({"a": [1, 2]}, {"a": [1]})


def test_pod_deletion_cost_hook():
    assert pod_deletion_cost_patch(7) == {"metadata": {"annotations": {POD_DELETION_COST: "7"}}}


def test_inference_pool_where_its_crd_is_served(settings):
    served = {("autoscaling", "v2"): ["horizontalpodautoscalers"], ("policy", "v1"): ["poddisruptionbudgets"],
              ("discovery.k8s.io", "v1"): ["endpointslices"],
              ("inference.networking.k8s.io", "v1"): ["inferencepools", "inferencepools/status"],
              ("inference.networking.x-k8s.io", "v1alpha2"): ["inferencepools"]}
    with_pool = choose_versions(lambda g, v: served.get((g, v)))
    assert with_pool.to_status()["inferencePool"] == "inference.networking.k8s.io/v1"
    spec = make_spec(settings, engine={"port": 8100})
    sizing = compute_sizing([NODES["8xH100"]()], spec, settings)
    children, absent, _ = render_children(spec, sizing, settings, with_pool, owner=OWNER)
    ch = {c.key: c.body for c in children}
    pool = ch["InferencePool/chat"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"] == {"selector": {"matchLabels": {"app.kubernetes.io/name": "pensieve", "app.kubernetes.io/instance": "chat",
                                                         "app.kubernetes.io/component": "engine"}},
                            "targetPorts": [{"number": 8100}],
                            "endpointPickerRef": {"name": "chat-epp", "port": {"number": 9002}, "failureMode": "FailClose"}}
    # The gateway's namespace (here: the deployment's own) may reach the engines.
    sources = ch["NetworkPolicy/chat-engine"]["spec"]["ingress"][0]["from"]
    assert sources[-1] == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "default"}}}
    # Switched off: not rendered, and removed if this object made one.
    spec = make_spec(settings, inferencePool={"enabled": False})
    children, absent, _ = render_children(spec, sizing, settings, with_pool, owner=OWNER)
    assert "InferencePool/chat" not in {c.key for c in children} and ("InferencePool", "chat") in {(a.kind, n) for a, n in absent}
    # Only the alpha group served: no InferencePool (one pinned version).
    alpha_only = choose_versions(lambda g, v: {k: v2 for k, v2 in served.items() if k[0] != "inference.networking.k8s.io"}.get((g, v)))
    assert alpha_only.inference_pool is None
    children, _, _ = render_children(make_spec(settings), sizing, settings, alpha_only, owner=OWNER)
    assert not any(c.api.kind == "InferencePool" for c in children)
