"""Issue "Hardening" 6-9 on a real control plane (see conftest.py): the operator runs under
manifests/rbac.yaml with a service-account token (no Forbidden anywhere), applies the engines'
NetworkPolicy, and the sample's keys from a Secret are enforced by the router and the engines
(the real `python -m pensieve.router` in front of the stand-in engines)."""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest
import yaml
from kubernetes import client

from conftest import ROOT, SAMPLE_API_KEYS, wait_for
from pensieve.operator.kube import ApiError, Conflict, raw_request
from test_operator_cluster import ENGINE_SEL, SAMPLE, _start_operator_process, create_pdep, wait_ready

pytestmark = pytest.mark.usefixtures("operator_runner")
OPERATOR_NS, OPERATOR_SA = "pensieve-system", "pensieve-operator"
PATHS = {"ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
         "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
         "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings"}


@pytest.fixture
def operator_rbac(api, control_plane, tmp_path):
    """manifests/rbac.yaml applied, and a kubeconfig holding the operator ServiceAccount's token."""
    try:
        raw_request(api, "POST", "/api/v1/namespaces", {"metadata": {"name": OPERATOR_NS}})
    except Conflict:
        pass
    objs = [d for d in yaml.safe_load_all((ROOT / "manifests" / "rbac.yaml").read_text()) if d]
    made = []
    for o in objs:
        path = PATHS[o["kind"]].format(ns=o["metadata"].get("namespace"))
        raw_request(api, "POST", path, o)
        made.append(f"{path}/{o['metadata']['name']}")
    token = raw_request(api, "POST", f"/api/v1/namespaces/{OPERATOR_NS}/serviceaccounts/{OPERATOR_SA}/token",
                        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                         "spec": {"audiences": ["https://kubernetes.default.svc.cluster.local"], "expirationSeconds": 3600}}
                        )["status"]["token"]
    cfg = yaml.safe_load(control_plane.kubeconfig.read_text())
    for u in cfg["users"]:
        u["user"] = {"token": token}
    path = tmp_path / "operator.kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    yield path
    for p in reversed(made):  # Helm (test_chart_cluster) installs the same names later
        try:
            raw_request(api, "DELETE", p)
        except ApiError:
            pass


def post_chat(url, key=None):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + "/v1/chat/completions", method="POST", headers=headers,
                                 data=json.dumps({"model": "qwen2.5-0.5b-instruct",
                                                  "messages": [{"role": "user", "content": "hi"}]}).encode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_operator_under_its_rbac_applies_policy_and_keys(api, namespace, operator_rbac, operator_runner, tmp_path):
    co, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    operator_runner.stop()
    proc = _start_operator_process(tmp_path, 0, KUBECONFIG=str(operator_rbac))
    try:
        create_pdep(co, namespace, SAMPLE)  # the sample as shipped: auth from the chat-api-keys Secret
        o = wait_ready(co, namespace, "chat", timeout=90)
        assert o["metadata"].get("finalizers") in (None, [])
        # The NetworkPolicy, as the API server stored it.
        np = raw_request(api, "GET", f"/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies/chat-engine")
        assert np["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "engine"
        sources = np["spec"]["ingress"][0]["from"]
        assert sources[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "router"
        assert sources[-1]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
        # The router's RoleBinding points at the pre-installed ClusterRole; no Role was made.
        rb = raw_request(api, "GET", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings/chat-router")
        assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "pensieve-router"}
        assert raw_request(api, "GET", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles")["items"] == []
        # Keys from the Secret, never in plain text in a pod spec.
        pods = core.list_namespaced_pod(namespace, label_selector=ENGINE_SEL.format("chat")).items
        envs = [e for p in pods for e in p.spec.containers[0].env]
        key_env = [e for e in envs if e.name == "PENSIEVE_API_KEY"]
        assert key_env and all(e.value is None and e.value_from.secret_key_ref.name == "chat-api-keys" for e in key_env)
        assert not pods[0].spec.automount_service_account_token
        # A chat through the router: refused without a key or with a wrong one (by the router),
        # served with either key; an engine pod refuses a direct request without a key.
        svc = core.read_namespaced_service("chat", namespace)
        router_pod = core.list_namespaced_pod(namespace, label_selector="app.kubernetes.io/instance=chat,"
                                                                           "app.kubernetes.io/component=router").items[0]
        url = f"http://{router_pod.status.pod_ip}:8080"
        assert svc.spec.ports[0].target_port == "http"
        wait_for(lambda: post_chat(url, SAMPLE_API_KEYS[0])[0] == 200, 30, "a chat through the router with a key")
        assert post_chat(url)[0] == 401 and post_chat(url, "wrong")[0] == 401
        code, doc = post_chat(url, SAMPLE_API_KEYS[1])
        assert code == 200 and doc["choices"][0]["message"]["content"].startswith("standin chat-engine-")
        code, doc = post_chat(f"http://{pods[0].status.pod_ip}:8000")
        assert code == 401 and doc["error"]["code"] == "invalid_api_key"
        assert post_chat(f"http://{pods[0].status.pod_ip}:8000", SAMPLE_API_KEYS[0])[0] == 200
    finally:
        proc.terminate()
        proc.wait(10)
        operator_runner.start()
    log = (tmp_path / "operator-0.log").read_text()
    assert "Forbidden" not in log and " 403" not in log and "403:" not in log, log[-3000:]
    assert os.path.getsize(tmp_path / "operator-0.log") > 0
