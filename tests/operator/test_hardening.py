"""Issue "Hardening" 6-9 in the rendered manifests: pod security, keys from a Secret, the
engines' NetworkPolicy (the operator's RBAC: test_manifests.py)."""
import re

import pytest

from pensieve.operator.discovery import choose_versions
from pensieve.operator.render import render_children
from pensieve.operator.settings import Settings
from pensieve.operator.sizing import compute_sizing

from pdep_helpers import NODES, make_spec


def children(settings=None, **over):
    settings = settings or Settings()
    spec = make_spec(settings, **over)
    served = {("autoscaling", "v2beta2"): ["horizontalpodautoscalers"], ("policy", "v1beta1"): ["poddisruptionbudgets"],
              ("discovery.k8s.io", "v1beta1"): ["endpointslices"]}
    apis = choose_versions(lambda g, v: served.get((g, v)))
    ch, absent, _ = render_children(spec, compute_sizing([NODES["8xH100"]()], spec, settings), settings, apis,
                                    owner={"metadata": {"name": "chat", "uid": "u"}})
    return {c.key: c.body for c in ch}, {(a.kind, n) for a, n in absent}


def pods(ch):
    return {k: v["spec"]["template"]["spec"] for k, v in ch.items() if k.startswith("Deployment/")}


def test_every_container_is_hardened():
    ch, _ = children()
    for key, pod in pods(ch).items():
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001 and sc["seccompProfile"] == {"type": "RuntimeDefault"}
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"] + pod.get("initContainers", []):
            csc = c["securityContext"]
            assert csc["readOnlyRootFilesystem"] is True, (key, c["name"])
            assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"] == {"drop": ["ALL"]}
            assert csc["seccompProfile"] == {"type": "RuntimeDefault"}
            # Whatever a container writes goes to an emptyDir (or the model volume it fills).
            writable = [m for m in c["volumeMounts"] if not m.get("readOnly")]
            assert writable and all("emptyDir" in volumes[m["name"]] for m in writable), (key, c["name"], writable)
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["HOME"] == "/tmp" and {"name": "scratch", "mountPath": "/tmp"} in c["volumeMounts"]
    p = pods(ch)
    assert p["Deployment/chat-engine"]["automountServiceAccountToken"] is False  # engines never call the API
    assert p["Deployment/chat-router"]["automountServiceAccountToken"] is True  # the router watches EndpointSlices
    assert p["Deployment/chat-engine"]["initContainers"][0]["name"] == "fetch-model"


def test_api_keys_come_from_the_secret_for_router_and_engines():
    ch, _ = children(auth={"apiKeySecret": {"name": "chat-keys", "key": "keys"}})
    ref = {"secretKeyRef": {"name": "chat-keys", "key": "keys"}}
    p = pods(ch)
    engine_env = {e["name"]: e for e in p["Deployment/chat-engine"]["containers"][0]["env"]}
    router_env = {e["name"]: e for e in p["Deployment/chat-router"]["containers"][0]["env"]}
    assert engine_env["PENSIEVE_API_KEY"] == {"name": "PENSIEVE_API_KEY", "valueFrom": ref}
    assert router_env["PENSIEVE_ROUTER_API_KEY"] == {"name": "PENSIEVE_ROUTER_API_KEY", "valueFrom": ref}
    assert "PENSIEVE_API_KEY" not in ch["ConfigMap/chat-engine"]["data"]  # never a plain value
    # Without spec.auth: no keys anywhere (the engines and router run open, as before).
    ch, _ = children()
    assert not any("API_KEY" in e["name"] for pod in pods(ch).values() for e in pod["containers"][0]["env"])


@pytest.mark.parametrize("bad, needle", [
    ({"apiKeySecret": {"name": "Bad_Name"}}, "spec.auth.apiKeySecret.name"),
    ({"apiKeySecret": {"name": "ok", "key": "a/b"}}, "spec.auth.apiKeySecret.key"),
    ({"apiKeySecret": {}}, "spec.auth.apiKeySecret.name: required"),
])
def test_bad_auth_is_rejected(bad, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        make_spec(auth=bad)


def test_plain_api_key_env_is_refused():
    with pytest.raises(ValueError, match="PENSIEVE_API_KEY is set by the operator"):
        make_spec(engine={"env": [{"name": "PENSIEVE_API_KEY", "value": "secret"}]})


def test_network_policy_by_default():
    ch, absent = children()
    np = ch["NetworkPolicy/chat-engine"]["spec"]
    assert np["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "engine"
    assert np["policyTypes"] == ["Ingress"]
    (rule,) = np["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]
    router, operator, monitoring = rule["from"]
    assert router == {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "pensieve", "app.kubernetes.io/instance": "chat",
                                                      "app.kubernetes.io/component": "router"}}}
    assert operator["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "pensieve-system"}
    assert monitoring == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ch, _ = children(networkPolicy={"monitoringNamespace": "prom"})
    assert ch["NetworkPolicy/chat-engine"]["spec"]["ingress"][0]["from"][2]["namespaceSelector"]["matchLabels"] == \
        {"kubernetes.io/metadata.name": "prom"}
    ch, absent = children(networkPolicy={"enabled": False})
    assert "NetworkPolicy/chat-engine" not in ch and ("NetworkPolicy", "chat-engine") in absent
    ch, _ = children(Settings(monitoring_namespace=""))
    assert len(ch["NetworkPolicy/chat-engine"]["spec"]["ingress"][0]["from"]) == 2
